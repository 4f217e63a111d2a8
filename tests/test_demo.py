"""``kvstore demo`` end to end with the tiny model, and its workload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.cli import main
from kvstore.demo.model import build_tokenizer
from kvstore.demo.runner import _millions, _verdict
from kvstore.demo.workload import CHAT_FIRST, CHAT_NEXT, DOC_FIRST, DOC_NEXT, build_workload
from kvstore.errors import InvalidArgumentError

TINY = ["--model-size", "tiny", "--context", "1024", "--requests", "6", "--new-tokens", "4"]


def test_demo_cli_end_to_end(tmp_path: Path) -> None:
    """The demo on its default cpu + nvme tiers: exit 0, hits used, same tokens."""
    report = tmp_path / "demo.json"
    options = ["--cache-dir", str(tmp_path / "nvme"), "--json", str(report)]
    done = subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "demo", *TINY, *options],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "identical tokens with and without the cache" in done.stdout
    assert "TTFT" in done.stdout
    # Not a terminal: a line per request instead of a live progress bar.
    progress = [line for line in done.stdout.splitlines() if line.startswith("request ")]
    assert [line.split(":")[0] for line in progress] == [f"request {i}/6" for i in range(1, 7)]
    assert "(0M parameters" not in done.stdout
    assert "M parameters" in done.stdout
    result = json.loads(report.read_text())
    assert result["tokens_identical"] is True
    classes = {row["kind"]: row for row in result["classes"]}
    assert set(classes) == {DOC_FIRST, DOC_NEXT, CHAT_FIRST, CHAT_NEXT}
    assert classes[DOC_FIRST]["cached_tokens"] == 0
    assert classes[DOC_NEXT]["cached_tokens"] >= 512
    assert classes[CHAT_NEXT]["cached_tokens"] >= 256
    assert all(r["logits_identical"] for r in result["requests"])
    tiers = result["tiers"]
    assert [tier["url"].split(":")[0] for tier in tiers] == ["cpu", "nvme"]
    assert sum(tier["hits"] for tier in tiers) > 0
    assert tiers[1]["bytes_written"] > 0
    assert 0 < result["token_hit_rate"] < 1


def test_demo_with_a_tier_url_and_a_kept_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--tier`` replaces the default tiers; ``--keep-cache`` serves a rerun from nvme."""
    tier = f"nvme://{tmp_path}?capacity=256MiB"
    report = tmp_path / "rerun.json"
    assert main(["demo", *TINY, "--requests", "2", "--tier", tier]) == 0
    rerun = ["demo", *TINY, "--requests", "2", "--tier", tier, "--keep-cache", "--json"]
    assert main([*rerun, str(report)]) == 0
    result = json.loads(report.read_text())
    first = result["requests"][0]
    assert first["kind"] == DOC_FIRST
    assert first["cached_tokens"] >= 512
    assert result["tiers"][0]["hits"] > 0
    assert "identical tokens" in capsys.readouterr().out


def test_demo_rejects_both_config_and_tier(tmp_path: Path) -> None:
    config = tmp_path / "store.yaml"
    config.write_text("tiers:\n  - url: cpu://?capacity=64MiB\n")
    assert main(["demo", *TINY, "--config", str(config), "--tier", "cpu://?capacity=1GiB"]) == 2


def test_workload_prompts_share_prefixes_and_fit_the_context() -> None:
    tokenizer = build_tokenizer(2048)
    context, new_tokens = 2048, 8
    workload = build_workload(tokenizer, context=context, requests=12, new_tokens=new_tokens)
    kinds = [request.kind for request in workload]
    assert kinds.count(DOC_FIRST) + kinds.count(DOC_NEXT) == 6
    assert kinds.count(CHAT_FIRST) == 2
    history: dict[str, list[int]] = {}
    documents: dict[str, list[int]] = {}
    system = list(workload.system_prompt)
    for request in workload:
        base = system if request.starts_stream else history[request.stream]
        prompt = [*base, *request.tokens]
        assert len(prompt) + new_tokens <= context
        if request.kind == DOC_FIRST:
            documents[request.stream] = prompt
        elif request.kind == DOC_NEXT:
            shared = documents[request.stream]
            common = next(i for i, (a, b) in enumerate(zip(prompt, shared)) if a != b)
            assert common > context * 3 // 4
        history[request.stream] = [*prompt, *range(new_tokens), workload.end_token]
    assert max(len(h) for h in history.values()) > context * 3 // 4
    assert all(
        token < tokenizer.get_vocab_size() for request in workload for token in request.tokens
    )


def test_workload_rejects_bad_sizes() -> None:
    tokenizer = build_tokenizer(2048)
    with pytest.raises(InvalidArgumentError):
        build_workload(tokenizer, context=256, requests=4, new_tokens=4)
    with pytest.raises(InvalidArgumentError):
        build_workload(tokenizer, context=4096, requests=0, new_tokens=4)


def test_parameter_counts_keep_a_decimal_below_ten_million() -> None:
    assert [_millions(n) for n in (312_000, 4_210_000, 32_400_000)] == ["0.3M", "4.2M", "32M"]


@pytest.mark.parametrize(
    ("cached_tokens", "speedup", "verdict"),
    [
        (0, 1.3, "nothing came from the cache"),
        (512, 0.8, "0.80x, slower with the cache"),
        (512, 12.5, "[bold]12.5x[/bold] faster"),
    ],
)
def test_summary_calls_a_request_faster_only_when_the_cache_made_it_so(
    cached_tokens: int, speedup: float, verdict: str
) -> None:
    assert _verdict({"cached_tokens": cached_tokens, "speedup": speedup}) == verdict
