"""vLLM on CPU with and without kvstore on a multi-turn chat workload: TTFT and throughput.

Run it with the python of the vLLM environment (scripts/install-vllm)::

    .venv-vllm/bin/python benchmarks/vllm_multiturn.py --json vllm-multiturn.json
    .venv-vllm/bin/python benchmarks/vllm_multiturn.py --quick

It saves a Llama with seeded random weights (``--layers``, ``--hidden``;
real weights, so the work is a real model's), then runs the same workload
through four engines, one after another (``--engines`` picks some):

* ``vllm``: vLLM with its prefix cache off, so every turn prefills the whole
  conversation again;
* ``vllm prefix cache``: vLLM's own in-memory prefix cache, for reference (it
  hits as long as the conversations fit vLLM's KV memory and one engine lives);
* ``vllm+kvstore``: vLLM with its prefix cache off and the kvstore connector
  (a ``cpu`` tier, or ``--tiers``): each turn loads the conversation so far
  from kvstore and prefills only what is new;
* ``vllm+kvstore prefix cache``: both caches, as a deployment runs them: vLLM
  serves what it still holds, kvstore the rest.

The workload: ``--conversations`` chats run side by side for ``--turns``
turns; a chat starts with a ``--prompt``-token prompt, each turn generates
``--output`` tokens, and the next turn appends them plus ``--user`` new
tokens. Turn k of every chat is one batch. Per engine it reports the mean
time to first token (from vLLM's request metrics) for the first turn and for
the later ones, the tokens vLLM served from a cache, and throughput (generated
tokens per second of wall time, all turns). ``--repeat`` runs the
engines in turn that many times and reports the best of each time (the run
least slowed by whatever else the machine runs), with medians in the JSON.
Each repeat starts one engine later in the list (the first repeat runs them
in order, the second starts with the second engine, ...): an engine started
right after another runs its first turn slower, so with ``--repeat`` a
multiple of the number of engines each engine takes each place equally often.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def run_engine(
    name: str,
    model: Path,
    kv: dict[str, Any] | None,
    prefix_caching: bool,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Run the workload through one engine; its TTFTs, cache hits and throughput."""
    import numpy as np
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm = LLM(
        model=str(model),
        skip_tokenizer_init=True,
        enforce_eager=True,
        enable_prefix_caching=prefix_caching,
        dtype="float32",
        max_model_len=args.prompt + args.turns * (args.output + args.user) + 16,
        max_num_seqs=args.conversations,
        gpu_memory_utilization=0.2,
        kv_transfer_config=KVTransferConfig(**kv) if kv else None,
        seed=0,
        disable_log_stats=False,
    )
    rng = np.random.default_rng(args.seed)
    chats = [rng.integers(0, 512, size=args.prompt).tolist() for _ in range(args.conversations)]
    params = SamplingParams(
        max_tokens=args.output, temperature=0.0, ignore_eos=True, detokenize=False
    )
    turns: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for turn in range(args.turns):
            if turn:
                for chat in chats:
                    chat.extend(rng.integers(0, 512, size=args.user).tolist())
            began = time.perf_counter()
            outputs = llm.generate(
                [{"prompt_token_ids": list(chat)} for chat in chats], params, use_tqdm=False
            )
            wall = time.perf_counter() - began
            ttfts = [o.metrics.first_token_latency for o in outputs if o.metrics is not None]
            turns.append(
                {
                    "turn": turn + 1,
                    "prompt_tokens": sum(len(chat) for chat in chats),
                    "cached_tokens": sum(o.num_cached_tokens or 0 for o in outputs),
                    "ttft_s": statistics.fmean(ttfts) if ttfts else None,
                    "wall_s": wall,
                }
            )
            for chat, output in zip(chats, outputs):
                chat.extend(output.outputs[0].token_ids)
        total = time.perf_counter() - started
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        cleanup_dist_env_and_memory()
    later = [t["ttft_s"] for t in turns[1:] if t["ttft_s"] is not None]
    generated = args.conversations * args.turns * args.output
    return {
        "engine": name,
        "turns": turns,
        "ttft_first_turn_s": turns[0]["ttft_s"],
        "ttft_later_turns_s": statistics.fmean(later) if later else None,
        "cached_tokens": sum(t["cached_tokens"] for t in turns),
        "prompt_tokens": sum(t["prompt_tokens"] for t in turns),
        "wall_s": total,
        "output_tokens_per_s": generated / total,
    }


def engine_plan(kv: dict[str, Any] | None) -> list[tuple[str, dict[str, Any] | None, bool]]:
    """Each engine: its name, its kvstore connector config (None: none), vLLM's prefix cache."""
    return [
        ("vllm", None, False),
        ("vllm prefix cache", None, True),
        ("vllm+kvstore", kv, False),
        ("vllm+kvstore prefix cache", kv, True),
    ]


def best_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine's figures over repeated runs: the best (least disturbed) of each
    time, the median next to it, and every run."""
    lowest = ("ttft_first_turn_s", "ttft_later_turns_s", "wall_s")
    measured = {
        key: [run[key] for run in runs if run[key] is not None]
        for key in (*lowest, "output_tokens_per_s")
    }
    summary: dict[str, Any] = {key: min(measured[key], default=None) for key in lowest}
    summary["output_tokens_per_s"] = max(measured["output_tokens_per_s"])
    medians = {
        f"median_{key}": statistics.median(values) if values else None
        for key, values in measured.items()
    }
    return runs[0] | summary | medians | {"runs": runs}


def _ms(seconds: float | None) -> str:
    """Seconds as whole milliseconds; a dash where there was nothing to time (one turn)."""
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=1024, help="first prompt, tokens")
    parser.add_argument("--user", type=int, default=128, help="new user tokens a turn")
    parser.add_argument("--output", type=int, default=32, help="generated tokens a turn")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument("--tiers", default="cpu://?capacity=2GiB", help="comma-separated URLs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the engines this many times, in turn; report the best",
    )
    parser.add_argument(
        "--engines",
        type=lambda names: [name.strip() for name in names.split(",")],
        default=[name for name, _, _ in engine_plan(None)],
        help="comma-separated engine names to run (default: all four)",
    )
    parser.add_argument("--quick", action="store_true", help="a small run, to check it works")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    unknown = set(args.engines) - {name for name, _, _ in engine_plan(None)}
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}")
    if args.quick:
        args.conversations, args.turns, args.prompt, args.user, args.output = 2, 2, 384, 64, 8
        args.layers, args.hidden, args.heads = 2, 128, 4
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    kv = {
        "kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "kvstore.connectors.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "config": args.tiers.split(","),
            "chunk_tokens": args.chunk_tokens,
        },
    }
    with tempfile.TemporaryDirectory(prefix="kvstore-vllm-bench-") as scratch:
        model = Path(scratch) / "model"
        from kvstore.demo.model import save_random_llama

        save_random_llama(
            model,
            layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            kv_heads=args.heads,
            seed=args.seed,
            std=0.05,
            max_positions=8192,
        )
        engines = [engine for engine in engine_plan(kv) if engine[0] in args.engines]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in engines}
        for repeat in range(args.repeat):
            shift = repeat % len(engines)
            for name, config, caching in engines[shift:] + engines[:shift]:
                runs[name].append(run_engine(name, model, config, caching, args))
    results = [best_run(runs[name]) for name, _, _ in engines]
    print(
        f"\n{args.conversations} chats x {args.turns} turns, first prompt {args.prompt} tokens, "
        f"+{args.user} user / {args.output} generated tokens a turn; "
        f"Llama {args.layers} layers x {args.hidden}, fp32, vLLM CPU; "
        f"best of {args.repeat} run(s)\n"
    )
    print("| engine | TTFT turn 1 | TTFT turns 2+ | cached tokens | output tok/s | wall |")
    print("| --- | --- | --- | --- | --- | --- |")
    for result in results:
        print(
            f"| {result['engine']} | {_ms(result['ttft_first_turn_s'])} "
            f"| {_ms(result['ttft_later_turns_s'])} "
            f"| {result['cached_tokens']} of {result['prompt_tokens']} "
            f"| {result['output_tokens_per_s']:.1f} | {result['wall_s']:.1f} s |"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"options": vars(args) | {"json": None}, "results": results})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
