"""``kvstore bench codecs``: what each codec stack costs and what it changes, on real KV.

The KV comes from a transformers Llama-architecture model built locally with
seeded random weights (nothing is downloaded): a prompt of random token ids
runs through it and its cache, ``[layers, 2, tokens, kv_heads, head_dim]``,
is cast to the stored dtype and cut into 256-token chunks. For each stack the
bench reports, side by side:

- ratio: KV bytes over encoded chunk bytes (headers included);
- encode / decode GB/s: KV bytes over the wall time of ``encode_chunk`` of
  every chunk, and of ``decode_chunk`` into a preallocated tensor (median of
  ``--repeat`` runs);
- K and V error: max and RMS of ``|x - x'|`` over all keys and all values;
- attention change: the model then decodes a continuation of ``--queries``
  tokens against the original and against the reconstructed cache (the way
  an engine uses loaded KV); for each layer the relative RMS change of its
  attention output, ``rms(o' - o) / rms(o)``, and the worst layer is
  reported. Later layers see the errors of earlier ones, as they would in
  real use. The next-token logits' relative RMS change is reported too, as
  the end-to-end effect.

Random weights give KV without the outlier channels of trained models, so the
absolute errors here say how each codec treats Gaussian-like KV; docs/codecs.md
discusses what changes on trained models.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from kvstore.bench.options import (
    CHUNK_TOKENS,
    CODEC_FULL_REPEATS,
    CODEC_FULL_TOKENS,
    CODEC_QUICK_REPEATS,
    CODEC_QUICK_TOKENS,
)
from kvstore.chunk import decode_chunk, encode_chunk, raw_chunk_size
from kvstore.codecs import KeyRing, TensorCodec, codec_stack
from kvstore.errors import ConfigError, InvalidArgumentError
from kvstore.layout import KVLayout

GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    """The Llama-architecture model the KV comes from."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


FULL_MODEL = ModelShape(
    layers=8, hidden=512, heads=8, kv_heads=4, head_dim=64, intermediate=1024, vocab=4096
)
QUICK_MODEL = ModelShape(
    layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=256, vocab=512
)
FULL_QUERIES, QUICK_QUERIES = 32, 8


@dataclass
class CodecRow:
    """One stack's measured figures."""

    stack: str
    ratio: float
    encode_gbps: float
    decode_gbps: float
    k_max_err: float
    k_rms_err: float
    v_max_err: float
    v_rms_err: float
    attn_rel_change: float
    logits_rel_change: float
    encode_s: list[float]
    decode_s: list[float]


class ModelProbe:
    """A seeded random-weight Llama model: makes KV, then decodes with any KV to compare."""

    def __init__(self, shape: ModelShape, tokens: int, queries: int, seed: int) -> None:
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError:
            raise ConfigError(
                "kvstore bench codecs needs transformers: pip install 'kvstore-llm[hf]'"
            ) from None
        config = LlamaConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            max_position_embeddings=tokens + queries,
        )
        torch.manual_seed(seed)
        self.model = LlamaForCausalLM(config)
        torch.nn.Module.eval(self.model)
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, shape.vocab, (1, tokens + queries), generator=generator)
        self.prompt, self.continuation = ids[:, :tokens], ids[:, tokens:]
        self._outputs: dict[int, torch.Tensor] = {}
        parameters = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        for index, layer in enumerate(self.model.model.layers):
            layer.self_attn.register_forward_hook(self._recorder(index))

    def _recorder(self, index: int) -> Callable[..., None]:
        def record(module: torch.nn.Module, args: Any, output: Any) -> None:
            self._outputs[index] = output[0].detach().float()

        return record

    @torch.no_grad()
    def prompt_kv(self) -> torch.Tensor:
        """The prompt's KV, float32 ``[layers, 2, tokens, kv_heads, head_dim]``."""
        cache = getattr(self.model(self.prompt, use_cache=True), self._cache_arg)
        planes = [torch.stack((layer.keys[0], layer.values[0])) for layer in cache.layers]
        return torch.stack(planes).permute(0, 1, 3, 2, 4).float().contiguous()

    @torch.no_grad()
    def decode(self, kv: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each layer's attention output and the logits for the continuation, given ``kv``."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for index in range(kv.shape[0]):
            keys = kv[index, 0].permute(1, 0, 2).unsqueeze(0)
            values = kv[index, 1].permute(1, 0, 2).unsqueeze(0)
            cache.update(keys.float(), values.float(), index)
        self._outputs.clear()
        kwargs: dict[str, Any] = {self._cache_arg: cache, "use_cache": True}
        logits = self.model(self.continuation, **kwargs).logits.float()
        return [self._outputs[i] for i in range(kv.shape[0])], logits


def _rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def _relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    scale = _rms(old)
    return _rms(new - old) / scale if scale else 0.0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_stack(
    spec: str,
    kv: torch.Tensor,
    layout: KVLayout,
    keys: KeyRing,
    repeats: int,
    reference: tuple[list[torch.Tensor], torch.Tensor],
    probe: ModelProbe,
) -> CodecRow:
    """Encode and decode ``kv`` (``[layers, 2, tokens, heads, dim]``) chunk by chunk."""
    stack = codec_stack(spec, keys)
    device = kv.device
    chunks = [
        kv[:, :, start : start + CHUNK_TOKENS] for start in range(0, kv.shape[2], CHUNK_TOKENS)
    ]
    on_host = not (stack and isinstance(stack[0], TensorCodec))
    chunk_keys = [index.to_bytes(32, "little") for index in range(len(chunks))]
    buffers = [
        torch.empty(raw_chunk_size(chunk), dtype=torch.uint8) if not stack else None
        for chunk in chunks
    ]
    out = torch.empty_like(kv)
    encode_s: list[float] = []
    decode_s: list[float] = []
    encoded: list[memoryview] = []
    for repeat in range(repeats + 1):  # the first, untimed, warms caches and buffers
        _synchronize(device)
        start = time.perf_counter()
        encoded = [
            encode_chunk(key, chunk.cpu() if on_host else chunk, codecs=stack, out=buffer)
            for key, chunk, buffer in zip(chunk_keys, chunks, buffers)
        ]
        encode_s.append(time.perf_counter() - start)
        _synchronize(device)
        start = time.perf_counter()
        for index, (key, data) in enumerate(zip(chunk_keys, encoded)):
            target = out[:, :, index * CHUNK_TOKENS : (index + 1) * CHUNK_TOKENS]
            decode_chunk(data, key=key, layout=layout, tokens=CHUNK_TOKENS, out=target, keys=keys)
        _synchronize(device)
        decode_s.append(time.perf_counter() - start)
        if repeat == 0:
            encode_s.clear()
            decode_s.clear()
    kv_bytes = kv.numel() * kv.element_size()
    error = (out.float() - kv.float()).cpu()
    attention, logits = probe.decode(out.cpu())
    return CodecRow(
        stack=spec,
        ratio=kv_bytes / sum(len(data) for data in encoded),
        encode_gbps=kv_bytes / statistics.median(encode_s) / GB,
        decode_gbps=kv_bytes / statistics.median(decode_s) / GB,
        k_max_err=float(error[:, 0].abs().max()),
        k_rms_err=_rms(error[:, 0]),
        v_max_err=float(error[:, 1].abs().max()),
        v_rms_err=_rms(error[:, 1]),
        attn_rel_change=max(
            _relative_change(new, old) for new, old in zip(attention, reference[0])
        ),
        logits_rel_change=_relative_change(logits, reference[1]),
        encode_s=encode_s,
        decode_s=decode_s,
    )


def results_table(rows: Sequence[CodecRow], title: str) -> Table:
    table = Table(title=title)
    for column in ("stack", "ratio", "enc GB/s", "dec GB/s"):
        table.add_column(column, justify="left" if column == "stack" else "right")
    for column in ("K max", "K rms", "V max", "V rms", "attn Δ", "logits Δ"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row.stack,
            f"{row.ratio:.2f}",
            f"{row.encode_gbps:.2f}",
            f"{row.decode_gbps:.2f}",
            *(
                f"{value:.2e}" if value else "0"
                for value in (
                    row.k_max_err,
                    row.k_rms_err,
                    row.v_max_err,
                    row.v_rms_err,
                    row.attn_rel_change,
                    row.logits_rel_change,
                )
            ),
        )
    return table


def run_codec_bench(args: argparse.Namespace) -> int:
    """Measure every stack; 0 when all were measured."""
    shape = QUICK_MODEL if args.quick else FULL_MODEL
    tokens = args.tokens or (CODEC_QUICK_TOKENS if args.quick else CODEC_FULL_TOKENS)
    repeats = args.repeat or (CODEC_QUICK_REPEATS if args.quick else CODEC_FULL_REPEATS)
    queries = QUICK_QUERIES if args.quick else FULL_QUERIES
    if tokens < CHUNK_TOKENS or tokens % CHUNK_TOKENS or repeats < 1:
        raise InvalidArgumentError(
            f"--tokens must be a positive multiple of {CHUNK_TOKENS} and --repeat positive"
        )
    specs = [spec.strip() for spec in args.stacks.split(",") if spec.strip()]
    if args.threads < 1:
        raise InvalidArgumentError("--threads must be positive")
    keys = KeyRing({"default": os.urandom(32)})
    for spec in specs:
        codec_stack(spec, keys)
    device = torch.device(args.device)
    console = Console(width=None if sys.stdout.isatty() else 140)
    with console.status("building the model and its KV"):
        probe = ModelProbe(shape, tokens, queries, args.seed)
        layout = KVLayout(shape.layers, shape.kv_heads, shape.head_dim, args.dtype)
        kv = probe.prompt_kv().to(layout.torch_dtype)
    rows: list[CodecRow] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        reference = probe.decode(kv)  # with the thread count of every later decode: same sums
        kv = kv.to(device)
        for spec in specs:
            with console.status(f"measuring {spec}"):
                rows.append(measure_stack(spec, kv, layout, keys, repeats, reference, probe))
    finally:
        torch.set_num_threads(threads)
    stored = kv.float()
    title = (
        f"codec stacks on {tokens} tokens of {args.dtype} KV from a random-weight Llama "
        f"({shape.layers} layers, {shape.kv_heads} kv heads x {shape.head_dim}; "
        f"K rms {_rms(stored[:, 0]):.3f}, V rms {_rms(stored[:, 1]):.3f}), {device}, "
        f"{args.threads} torch thread{'s' if args.threads > 1 else ''}"
    )
    console.print(results_table(rows, title))
    if args.json:
        report = {
            "settings": {
                "stacks": specs,
                "quick": bool(args.quick),
                "repeat": repeats,
                "seed": args.seed,
            },
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "torch_threads": args.threads,
            },
            "model": asdict(shape),
            "dtype": args.dtype,
            "device": str(device),
            "tokens": tokens,
            "chunk_tokens": CHUNK_TOKENS,
            "queries": queries,
            "kv_bytes": kv.numel() * kv.element_size(),
            "k_rms": _rms(stored[:, 0]),
            "v_rms": _rms(stored[:, 1]),
            "results": [asdict(row) for row in rows],
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
