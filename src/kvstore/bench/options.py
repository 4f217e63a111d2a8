"""The options of ``kvstore bench`` and ``kvstore bench codecs``, and the defaults
they show.

No heavy imports: the CLI builds its parser, and refuses bad arguments, before
the benches import torch.
"""

from __future__ import annotations

import argparse

from kvstore.sizes import format_size

LAYOUT_NAMES = ("llama3-8b", "qwen2-0.5b")
"""The names of ``kvstore.bench.LAYOUTS``."""

CHUNK_TOKENS = 256
FULL_BYTES = 512 << 20
QUICK_BYTES = 24 << 20
"""KV bytes moved per repeat and layout when ``--chunks`` is not given."""

FULL_REPEATS, QUICK_REPEATS = 5, 2

DEFAULT_STACKS = (
    "raw",
    "lz4",
    "zstd",
    "shuffle+zstd",
    "int8",
    "int8+zstd",
    "fp8",
    "kivi8",
    "kivi4",
    "kivi4+zstd",
    "aesgcm",
)
"""The codec stacks ``kvstore bench codecs`` measures by default."""

CODEC_FULL_TOKENS, CODEC_QUICK_TOKENS = 1024, 256
CODEC_FULL_REPEATS, CODEC_QUICK_REPEATS = 3, 1


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kvstore bench`` (and of benchmarks/store_tiers.py)."""
    parser.add_argument(
        "--layout",
        choices=[*LAYOUT_NAMES, "all"],
        default="all",
        help="KV layout to measure (default: all)",
    )
    parser.add_argument(
        "--tiers",
        help="comma-separated local tiers (default: cpu,nvme, or none when --url is given)",
    )
    parser.add_argument(
        "--url",
        action="append",
        metavar="URL",
        help="also measure the tier at this driver URL against the raw client its driver "
        "ships (e.g. redis://127.0.0.1:6379/0?prefix=bench); repeatable. The bench "
        "clears the tier after each repeat: point it at a prefix of its own",
    )
    parser.add_argument(
        "--chunks",
        type=int,
        help=f"256-token chunks per repeat (default: {format_size(FULL_BYTES)} of KV per "
        f"layout, {format_size(QUICK_BYTES)} with --quick)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help=f"timed repeats, the median is reported (default {FULL_REPEATS}, "
        f"{QUICK_REPEATS} with --quick)",
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed repeats first (default 1)")
    parser.add_argument(
        "--verify",
        choices=["both", "on", "off"],
        default="both",
        help="payload verification on retrieve: measure with it on, off, or both (default)",
    )
    parser.add_argument(
        "--dir",
        metavar="DIR",
        help="where the nvme tier and its baseline write (default: the user cache dir)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds a tier")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument(
        "--compare",
        action="append",
        choices=["lmcache"],
        help="also measure LMCache on the same chunks against the same baselines, when "
        "LMCache is importable (reported, never required): its CPU backend beside the cpu "
        "tier, its O_DIRECT disk backend under --dir beside the nvme tier",
    )


def add_codec_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kvstore bench codecs``."""
    parser.add_argument(
        "--stacks",
        default=",".join(DEFAULT_STACKS),
        help=f"comma-separated codec stacks (default: {','.join(DEFAULT_STACKS)})",
    )
    parser.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        default="float16",
        help="dtype the KV is stored in (default float16)",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        help=f"prompt tokens, a multiple of {CHUNK_TOKENS} (default {CODEC_FULL_TOKENS}, "
        f"{CODEC_QUICK_TOKENS} with --quick)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help=f"timed runs per stack, the median is reported (default {CODEC_FULL_REPEATS}, "
        f"{CODEC_QUICK_REPEATS} with --quick)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the KV lives while it is encoded and decoded (cpu, cuda); quantizers "
        "run there, other stacks copy to and from host memory (default cpu)",
    )
    parser.add_argument("--seed", type=int, default=0, help="model weights and prompt seed")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads while measuring (default 1: every stack on one core, "
        "as lz4, zstd and AES-GCM run; the store encodes several chunks at once)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a 2-layer model and one chunk (a few seconds)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
