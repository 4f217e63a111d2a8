"""``kvstore demo``: prefix reuse for a transformers model, measured end to end.

The demo builds a Llama-architecture model and a tokenizer locally, runs a
shared-prefix workload (questions over long documents, growing chat
sessions) twice per request, once with a plain full prefill and once through
the transformers connector over a kvstore, and reports time to first token
per request class, hits and bytes per tier, and whether both runs generated
the same tokens. This module only defines the command's options; the run
imports torch and transformers when it starts.
"""

from __future__ import annotations

import argparse

from kvstore.demo.presets import (
    DEFAULT_CONTEXT,
    DEFAULT_PRESET,
    DEFAULT_REQUESTS,
    PRESET_NAMES,
    check_workload_size,
)
from kvstore.errors import NotSupportedError


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kvstore demo``."""
    parser.add_argument(
        "--model-size",
        choices=PRESET_NAMES,
        default=DEFAULT_PRESET,
        help=f"model shape (default {DEFAULT_PRESET}; tiny is for tests, 1b has Llama 3.2 1B's)",
    )
    parser.add_argument(
        "--context",
        type=int,
        default=DEFAULT_CONTEXT,
        help=f"tokens per prompt plus answer (default {DEFAULT_CONTEXT})",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=DEFAULT_REQUESTS,
        help=f"requests in the workload (default {DEFAULT_REQUESTS})",
    )
    parser.add_argument(
        "--new-tokens", type=int, default=16, help="tokens generated per request (default 16)"
    )
    parser.add_argument(
        "--tier",
        action="append",
        metavar="URL",
        help="a tier URL, fastest first (repeatable); replaces the default cpu + nvme tiers",
    )
    parser.add_argument("--config", metavar="FILE", help="a store config (YAML) instead of tiers")
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="directory of the default nvme tier (default: the user cache dir/kvstore-demo)",
    )
    parser.add_argument(
        "--keep-cache",
        action="store_true",
        help="keep what earlier runs left in the tiers (default: clear this model's chunks first)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="model and KV dtype (default float32)",
    )
    parser.add_argument(
        "--attention",
        choices=("aligned", "sdpa", "eager"),
        default="aligned",
        help="attention implementation (default aligned: chunk-aligned SDPA, bit-exact hits)",
    )
    parser.add_argument("--device", default="cpu", help="torch device of the model (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and workload")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")


def run_demo(args: argparse.Namespace) -> int:
    """Run ``kvstore demo``; 0 when both runs generated the same tokens, else 1.

    Arguments are checked before torch and transformers are imported, so a bad
    one is refused at once.
    """
    check_workload_size(context=args.context, requests=args.requests, new_tokens=args.new_tokens)
    try:
        from kvstore.demo.runner import run
    except ImportError as exc:
        if exc.name not in ("transformers", "tokenizers"):
            raise
        raise NotSupportedError(
            f"kvstore demo needs {exc.name}: install the hf extra (pip install -e '.[hf]')"
        ) from None
    return run(args)
