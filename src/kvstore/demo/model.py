"""The demo's model and tokenizer, built locally: nothing is downloaded.

The model is a Llama-architecture causal LM (grouped-query attention, RoPE,
SwiGLU) with seeded random weights; its prefill costs what a trained model of
the same shape costs. The tokenizer is a word-level ``tokenizers`` tokenizer
over a seeded vocabulary of made-up words plus chat-role tokens.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM

from kvstore.demo.presets import ModelPreset
from kvstore.errors import InvalidArgumentError

SPECIAL_TOKENS = ("<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
PUNCTUATION = (".", ",", "?", ":", ";")
_ONSETS = (
    *("b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"),
    *("br", "ch", "dr", "fl", "gr", "pl", "sh", "st", "th", "tr"),
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "io", "ou")
_CODAS = ("", "", "", "n", "r", "s", "l", "m", "t", "x")


def model_config(preset: ModelPreset, max_positions: int) -> LlamaConfig:
    """The transformers config of a demo model of ``preset``'s shape."""
    return LlamaConfig(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )


def build_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    """A word-level tokenizer of ``vocab_size`` tokens: chat-role tokens,
    punctuation and seeded made-up words."""
    fixed = (*SPECIAL_TOKENS, *PUNCTUATION)
    if vocab_size <= len(fixed):
        raise InvalidArgumentError(f"vocab_size must exceed {len(fixed)}, got {vocab_size}")
    rng = random.Random(seed)
    words: dict[str, None] = {}
    while len(words) < vocab_size - len(fixed):
        syllables = rng.choice((1, 2, 2, 3, 3, 4))
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
        )
        words[word] = None
    vocab = {token: index for index, token in enumerate((*fixed, *words))}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def build_model(
    preset: ModelPreset,
    *,
    max_positions: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> LlamaForCausalLM:
    """A Llama model of ``preset``'s shape with weights drawn from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(preset, max_positions))
    torch.nn.Module.to(model, device=device, dtype=dtype)
    torch.nn.Module.eval(model)
    return model


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def save_random_llama(
    path: Path,
    *,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    seed: int,
    std: float,
    vocab_size: int = 512,
    max_positions: int = 4096,
) -> None:
    """Save a Llama with weights drawn from N(0, ``std``) under ``seed`` as safetensors,
    for engines that load a checkpoint (vLLM); a larger ``std`` spreads the logits, so
    outputs depend on every bit of the KV."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    torch.nn.Module.to(model, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    model.save_pretrained(path, safe_serialization=True)
