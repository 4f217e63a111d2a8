"""The transformers connector against real tiny models with seeded weights.

A hit must give the next-token logits of a full prefill bit for bit (CPU,
fp32, raw codec, with eager or chunk-aligned attention) and the same greedy
tokens; lossy codecs stay within a stated bound.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
)

from kvstore import InvalidArgumentError, KVLayout, Namespace, NotSupportedError, StoreConfig
from kvstore.connectors.stores import shared_stores
from kvstore.connectors.transformers import (
    TransformersConnector,
    model_layout,
    model_namespace,
    use_aligned_attention,
    weights_fingerprint,
)
from kvstore.store import open_store

VOCAB = 512
CHUNK = 256


def llama(seed: int = 0) -> PreTrainedModel:
    """Llama-style: grouped-query attention (4 query heads, 2 KV heads), RoPE."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(config).eval()


def gpt2(seed: int = 0) -> PreTrainedModel:
    """GPT-2-style: multi-head attention, learned positions."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=2048,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def with_attention(model: PreTrainedModel, attention: str) -> PreTrainedModel:
    if attention == "aligned":
        use_aligned_attention(model, block_tokens=CHUNK)
    else:
        model.set_attn_implementation(attention)
    return model


def prompts(prefix: int, *suffixes: int, seed: int = 1) -> list[torch.Tensor]:
    """Prompts sharing a ``prefix``-token prefix, each with its own suffix."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, VOCAB, (prefix,), generator=generator)
    return [
        torch.cat([shared, torch.randint(0, VOCAB, (n,), generator=generator)]) for n in suffixes
    ]


def cpu_tier() -> StoreConfig:
    return StoreConfig.from_urls("cpu://?capacity=64MiB")


MODELS = {"llama": llama, "gpt2": gpt2}


@pytest.mark.parametrize("attention", ["eager", "aligned"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hit_is_bit_identical_to_full_prefill(arch: str, attention: str) -> None:
    model = with_attention(MODELS[arch](), attention)
    first, second = prompts(700, 30, 45)
    with TransformersConnector.open(model, cpu_tier()) as conn:
        stored = conn.prefill(first)
        assert stored.cached_tokens == 0
        assert stored.stored is not None and stored.stored.written == 2

        reference = conn.generate(second, 12, reuse=False, save=False)
        hit = conn.generate(second, 12)

    assert hit.prefill.cached_tokens == 512
    assert hit.prefill.computed_tokens == len(second) - 512
    assert hit.prefill.chunk_tiers == ("0:cpu", "0:cpu")
    assert torch.equal(hit.prefill.logits, reference.prefill.logits)
    assert hit.tokens == reference.tokens
    for ours, theirs in zip(hit.prefill.cache.layers, reference.prefill.cache.layers):
        assert torch.equal(ours.keys, theirs.keys)
        assert torch.equal(ours.values, theirs.values)


def test_reference_is_the_plain_model() -> None:
    """``reuse=False`` is exactly ``model(ids)``: the comparison is against transformers itself."""
    model = with_attention(llama(), "eager")
    (prompt,) = prompts(300, 20)
    with torch.inference_mode():
        plain = model(prompt.unsqueeze(0), logits_to_keep=1).logits[0, -1]
    with TransformersConnector.open(model, cpu_tier()) as conn:
        ours = conn.prefill(prompt, reuse=False, save=False)
    assert torch.equal(ours.logits, plain)


def test_sdpa_hit_is_close_but_not_promised_exact() -> None:
    """Plain SDPA blocks queries by query length: a hit is within float rounding."""
    model = with_attention(llama(), "sdpa")
    first, second = prompts(600, 5, 3)
    with TransformersConnector.open(model, cpu_tier()) as conn:
        conn.prefill(first)
        reference = conn.prefill(second, reuse=False, save=False)
        hit = conn.prefill(second)
    assert hit.cached_tokens == 512
    torch.testing.assert_close(hit.logits, reference.logits, rtol=0, atol=1e-5)


def test_whole_chunk_prompt_recomputes_enough_tokens() -> None:
    """A fully cached prompt still runs ``min_recompute`` tokens (here a whole chunk)."""
    model = with_attention(llama(), "aligned")
    (prompt,) = prompts(512, 0)
    with TransformersConnector.open(model, cpu_tier()) as conn:
        conn.prefill(prompt)
        assert conn.store.lookup(prompt).tokens == 512
        reference = conn.prefill(prompt, reuse=False, save=False)
        hit = conn.prefill(prompt)
    assert (hit.cached_tokens, hit.computed_tokens) == (256, 256)
    assert torch.equal(hit.logits, reference.logits)


@pytest.mark.parametrize(
    ("codec", "bound"), [("int8", 0.01), ("fp8", 0.01), ("kivi8", 0.01), ("kivi4", 0.02)]
)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lossy_codec_stays_within_bound(arch: str, codec: str, bound: float) -> None:
    """Quantized KV: max |logit error| <= ``bound`` times the largest logit.

    Measured on these models: int8 4e-4, fp8 1.2e-3, kivi8 3e-4, kivi4 5e-3.
    """
    model = with_attention(MODELS[arch](), "aligned")
    config = StoreConfig.from_urls({"url": "cpu://?capacity=64MiB", "codecs": codec})
    first, second = prompts(600, 40, 40)
    with TransformersConnector.open(model, config) as conn:
        assert conn.store.async_store.namespace.codec == codec
        conn.prefill(first)
        reference = conn.prefill(second, reuse=False, save=False)
        hit = conn.prefill(second)
    assert hit.cached_tokens == 512
    error = (hit.logits - reference.logits).abs().max().item()
    assert 0 < error <= bound * reference.logits.abs().max().item()


def test_chunks_persist_across_connectors_on_nvme(tmp_path: Path) -> None:
    """A second connector (as in a restarted process) hits what the first stored on nvme."""
    config = StoreConfig.from_urls(f"nvme://{tmp_path}?capacity=64MiB")
    first, second = prompts(800, 10, 20)
    with TransformersConnector.open(with_attention(llama(), "aligned"), config) as conn:
        conn.prefill(first)
    with TransformersConnector.open(with_attention(llama(), "aligned"), config) as conn:
        reference = conn.generate(second, 8, reuse=False, save=False)
        hit = conn.generate(second, 8)
    assert hit.prefill.chunk_tiers == ("0:nvme",) * 3
    assert torch.equal(hit.prefill.logits, reference.prefill.logits)
    assert hit.tokens == reference.tokens


def test_other_weights_never_hit(tmp_path: Path) -> None:
    config = StoreConfig.from_urls(f"nvme://{tmp_path}?capacity=64MiB")
    (prompt,) = prompts(600, 10)
    with TransformersConnector.open(llama(seed=0), config) as conn:
        conn.prefill(prompt)
        assert conn.restore(prompt).tokens == 512
    assert weights_fingerprint(llama(seed=0)) == weights_fingerprint(llama(seed=0))
    assert weights_fingerprint(llama(seed=1)) != weights_fingerprint(llama(seed=0))
    with TransformersConnector.open(llama(seed=1), config) as conn:
        assert conn.restore(prompt).tokens == 0


def test_restored_cache_feeds_transformers_generate() -> None:
    """``restore`` gives a cache ``model.generate`` continues from, prefilling only the rest."""
    model = with_attention(llama(), "aligned")
    first, second = prompts(600, 20, 30)
    with TransformersConnector.open(model, cpu_tier()) as conn:
        conn.prefill(first)
        ours = conn.generate(second, 6, reuse=False, save=False)
        restored = conn.restore(second)
        assert restored.tokens == 512
        assert restored.cache.get_seq_length() == 512
        out = model.generate(
            second.unsqueeze(0),
            **{conn.cache_argument: restored.cache},
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )
        conn.save(second, restored.cache)
    assert out[0, len(second) :].tolist() == ours.tokens


def test_namespace_and_layout_from_the_model() -> None:
    model = llama()
    assert model_layout(model) == KVLayout(2, 2, 16, "float32")
    assert model_layout(gpt2()) == KVLayout(2, 4, 16, "float32")
    namespace = model_namespace(model, revision="r1", name="tiny-llama", codec="int8")
    assert (namespace.model, namespace.revision, namespace.codec) == ("tiny-llama", "r1", "int8")
    assert model_layout(model.to(torch.bfloat16)).dtype == "bfloat16"


def test_bad_inputs_are_typed_errors() -> None:
    model = llama()
    with TransformersConnector.open(model, cpu_tier()) as conn:
        with pytest.raises(InvalidArgumentError):
            conn.prefill(torch.zeros(2, 10, dtype=torch.long))
        with pytest.raises(InvalidArgumentError):
            conn.prefill([])
        with pytest.raises(InvalidArgumentError):
            conn.generate([1, 2, 3], 0)
    other = Namespace("x", "r", KVLayout(3, 2, 16, "float32"))
    with open_store(cpu_tier(), other) as store, pytest.raises(InvalidArgumentError):
        TransformersConnector(model, store)


def test_sliding_window_models_are_refused() -> None:
    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=128,
    )
    with pytest.raises(NotSupportedError, match="sliding-window"):
        TransformersConnector.open(MistralForCausalLM(config).eval(), cpu_tier())


def test_connector_starts_the_control_server_its_config_asks_for() -> None:
    config = StoreConfig.parse(
        {"tiers": ["cpu://?capacity=64MiB"], "control": {"enabled": True, "port": 0}}
    )
    model = llama()
    with TransformersConnector.open(model, config) as conn:
        conn.prefill(prompts(2 * CHUNK, 20)[0])
        conn.store.flush()
        control = shared_stores.control(conn.store)
        url = control.url if control is not None else ""
        stats = httpx.get(f"{url}/v1/stats", timeout=10).json()
        assert stats["tiers"][0]["entries"] == 2
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/v1/stats", timeout=2)
