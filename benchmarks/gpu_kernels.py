"""Check the Triton KV kernels against their torch references, then time them against copy_.

On a CUDA device it runs every kernel (paged gather/scatter in each layout,
quantize/dequantize and the fused gather-quantize/scatter-dequantize for each
scheme) on the same inputs as its torch reference and compares the results,
then measures each kernel's bandwidth as a ratio of a plain device-to-device
``copy_`` of the same number of bytes (the ceiling); the target is 0.8.
It exits 1 if any kernel disagrees with its reference (a slow kernel is
reported, not failed).

Without CUDA it says so and runs the references' own checks on CPU (round
trips within their error bounds); with ``TRITON_INTERPRET=1`` it also runs
the kernel checks in Triton's interpreter on tiny shapes. docs/kernels.md
explains the tolerances::

    python benchmarks/gpu_kernels.py            # full run (8192 tokens of a Llama-8B-like KV)
    python benchmarks/gpu_kernels.py --quick    # small shapes, few timing runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from kvstore.triton_kernels import (
    Backend,
    PagedKVCache,
    PagedLayout,
    QuantizedKV,
    QuantScheme,
    dequantize,
    error_bound,
    gather,
    gather_quantize,
    interpreter_enabled,
    quantize,
    scatter,
    scatter_dequantize,
    triton_available,
)

TARGET_RATIO = 0.8
MLA_HEAD_DIM = 576
"""DeepSeek's latent: 512 compressed KV channels plus 64 rotary channels."""
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Shape:
    """The KV geometry a check or a timing runs on."""

    layers: int
    heads: int
    head_dim: int
    tokens: int
    block_size: int
    dtype: torch.dtype
    group_size: int

    @property
    def num_blocks(self) -> int:
        """Twice the blocks the tokens need, so the slot mapping is a scattered subset."""
        return 2 * -(-self.tokens // self.block_size) + 1


def random_cache(layout: PagedLayout, shape: Shape, device: torch.device) -> PagedKVCache:
    """A cache in ``layout`` filled with standard normal values."""
    cache = empty_cache(layout, shape, device)
    for planes in cache.planes:
        for plane in planes:
            plane.copy_(torch.randn(plane.shape, device=device))
    return cache


def empty_cache(layout: PagedLayout, shape: Shape, device: torch.device) -> PagedKVCache:
    mla = layout is PagedLayout.MLA
    return PagedKVCache.allocate(
        layout,
        num_layers=shape.layers,
        num_blocks=shape.num_blocks,
        block_size=shape.block_size,
        num_heads=1 if mla else shape.heads,
        head_dim=MLA_HEAD_DIM if mla and shape.head_dim >= 64 else shape.head_dim,
        dtype=shape.dtype,
        device=device,
    )


def random_slots(cache: PagedKVCache, tokens: int) -> torch.Tensor:
    """``tokens`` distinct slot ids in a random order."""
    return torch.randperm(cache.num_slots, device=cache.device)[:tokens]


def describe(count: torch.Tensor, total: int) -> str:
    return f"{int(count)} of {total} elements"


def equal(kernel: torch.Tensor, reference: torch.Tensor) -> str | None:
    if torch.equal(kernel, reference):
        return None
    return "differs at " + describe((kernel != reference).sum(), reference.numel())


def close(kernel: torch.Tensor, reference: torch.Tensor) -> str | None:
    """One ulp of the output dtype (fused multiply-add, rounding) plus fp32 noise is allowed."""
    ours, theirs = kernel.float(), reference.float()
    if torch.equal(ours, theirs):
        return None
    magnitude = theirs.abs()
    tolerance = torch.finfo(reference.dtype).eps * magnitude + 2.0**-20 * magnitude.max()
    bad = (ours - theirs).abs() > tolerance
    return None if not bad.any() else "beyond one ulp at " + describe(bad.sum(), bad.numel())


def fp8_step(values: torch.Tensor) -> torch.Tensor:
    """The gap between adjacent e4m3 values around each of ``values``."""
    _, exponent = torch.frexp(values)
    return torch.where(values.abs() >= 2.0**-6, torch.exp2(exponent.float() - 4), 2.0**-9)


def codes_match(kernel: QuantizedKV, reference: QuantizedKV, interpreted: bool) -> str | None:
    """Parameters within one fp32 ulp; codes within one step.

    On CUDA, torch divides a tensor by a Python scalar as a multiplication by
    its reciprocal, so the reference's scales can sit one ulp from the kernel's
    correctly rounded ``div_rn``; a code exactly at a rounding boundary may then
    land one step away. Triton's interpreter also drops the carry when an fp8
    rounding reaches the next power of two (it yields half the right code):
    interpreted runs accept that.
    """
    for name, tensor in reference.params.items():
        problem = close(kernel.params[name], tensor)
        if problem:
            return f"{name} {problem}"
    if reference.scheme is not QuantScheme.FP8:
        steps = (kernel.data.int() - reference.data.int()).abs()
        if reference.scheme is QuantScheme.KIVI4:
            steps = torch.maximum(
                ((kernel.data.int() & 15) - (reference.data.int() & 15)).abs(),
                ((kernel.data.int() >> 4) - (reference.data.int() >> 4)).abs(),
            )
        off = steps > 1
        return (
            None
            if not off.any()
            else "codes off by more than a step at " + describe(off.sum(), off.numel())
        )
    ours, theirs = kernel.data.float(), reference.data.float()
    near = (ours - theirs).abs() <= fp8_step(theirs)
    if interpreted:
        near |= 2 * ours == theirs
    return (
        None
        if near.all()
        else "fp8 codes off by more than a step at " + describe((~near).sum(), near.numel())
    )


def same_cache(kernel: PagedKVCache, reference: PagedKVCache, exact: bool) -> str | None:
    compare = equal if exact else close
    for layer, (ours, theirs) in enumerate(zip(kernel.planes, reference.planes)):
        for plane, (mine, expected) in enumerate(zip(ours, theirs)):
            problem = compare(mine, expected)
            if problem:
                return f"layer {layer} plane {plane} {problem}"
    return None


class Report:
    """Prints each check as it runs and remembers the failures."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def check(self, name: str, problem: str | None) -> None:
        print(
            f"  {'ok  ' if problem is None else 'FAIL'} {name}"
            + (f": {problem}" if problem else "")
        )
        if problem is not None:
            self.failures.append(f"{name}: {problem}")


def reference_checks(report: Report, shape: Shape, device: torch.device) -> None:
    """The references' own properties: round trips and error bounds."""
    print(f"reference checks on {device} ({shape.dtype}):")
    for layout in PagedLayout:
        cache = random_cache(layout, shape, device)
        slots = random_slots(cache, shape.tokens)
        chunk = gather(cache, slots, backend="torch")
        copy = empty_cache(layout, shape, device)
        scatter(chunk, copy, slots, backend="torch")
        report.check(f"scatter then gather {layout.value}", equal(gather(copy, slots), chunk))
    for mla in (False, True):
        kv = gather(
            random_cache(PagedLayout.MLA if mla else PagedLayout.FLASH_ATTN, shape, device),
            torch.arange(shape.tokens, device=device),
            backend="torch",
        )
        for scheme in QuantScheme:
            q = quantize(kv, scheme, group_size=shape.group_size, backend="torch")
            restored = dequantize(q, torch.empty(kv.shape, device=device), backend="torch")
            over = (restored - kv.float()).abs() > error_bound(q, kv)
            name = f"{scheme.value} round trip within its bound{' (MLA)' if mla else ''}"
            report.check(
                name, None if not over.any() else "over at " + describe(over.sum(), over.numel())
            )


def kernel_checks(
    report: Report, shape: Shape, device: torch.device, layouts: Sequence[PagedLayout]
) -> None:
    """Every Triton kernel against its torch reference on the same inputs."""
    interpreted = device.type == "cpu"
    kernel: Backend = "triton"
    print(f"kernel checks on {device}{' (interpreter)' if interpreted else ''} ({shape.dtype}):")
    for layout in layouts:
        cache = random_cache(layout, shape, device)
        slots = random_slots(cache, shape.tokens)
        chunk = gather(cache, slots, backend="torch")
        report.check(f"gather {layout.value}", equal(gather(cache, slots, backend=kernel), chunk))
        ours, theirs = empty_cache(layout, shape, device), empty_cache(layout, shape, device)
        scatter(chunk, ours, slots, backend=kernel)
        scatter(chunk, theirs, slots, backend="torch")
        report.check(f"scatter {layout.value}", same_cache(ours, theirs, exact=True))
    fp8_ok = interpreted or torch.cuda.get_device_capability(device) >= (8, 9)
    schemes = [scheme for scheme in QuantScheme if fp8_ok or scheme is not QuantScheme.FP8]
    for layout in (PagedLayout.FLASH_ATTN, PagedLayout.MLA):
        cache = random_cache(layout, shape, device)
        slots = random_slots(cache, shape.tokens)
        kv = gather(cache, slots, backend="torch")
        suffix = " (MLA)" if layout is PagedLayout.MLA else ""
        for scheme in schemes:
            group = shape.group_size
            expected = quantize(kv, scheme, group_size=group, backend="torch")
            report.check(
                f"quantize {scheme.value}{suffix}",
                codes_match(
                    quantize(kv, scheme, group_size=group, backend=kernel), expected, interpreted
                ),
            )
            report.check(
                f"dequantize {scheme.value}{suffix}",
                close(dequantize(expected, backend=kernel), dequantize(expected, backend="torch")),
            )
            fused = gather_quantize(cache, slots, scheme, group_size=group, backend=kernel)
            report.check(
                f"gather_quantize {scheme.value}{suffix}", codes_match(fused, expected, interpreted)
            )
            ours, theirs = empty_cache(layout, shape, device), empty_cache(layout, shape, device)
            scatter_dequantize(expected, ours, slots, backend=kernel)
            scatter_dequantize(expected, theirs, slots, backend="torch")
            report.check(
                f"scatter_dequantize {scheme.value}{suffix}", same_cache(ours, theirs, exact=False)
            )


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median GPU time of ``run`` (host work that stalls the stream counts too)."""
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(statistics.median(times))


@dataclass(frozen=True)
class Row:
    name: str
    traffic: int
    kernel_seconds: float
    copy_seconds: float

    @property
    def ratio(self) -> float:
        return self.copy_seconds / self.kernel_seconds


def bandwidth(shape: Shape, repeats: int) -> list[Row]:
    """Each kernel's time against ``copy_`` moving the same bytes (read plus written)."""
    device = torch.device("cuda")
    cache = random_cache(PagedLayout.FLASH_ATTN, shape, device)
    slots = random_slots(cache, shape.tokens)
    chunk = gather(cache, slots)
    chunk_bytes = chunk.numel() * chunk.element_size()
    copies: dict[int, float] = {}
    rows: list[Row] = []

    def measure(name: str, run: Callable[[], object], traffic: int) -> None:
        if traffic not in copies:
            source = torch.empty(traffic // 2, dtype=torch.uint8, device=device)
            target = torch.empty_like(source)
            copies[traffic] = median_seconds(lambda: target.copy_(source), repeats)
        rows.append(Row(name, traffic, median_seconds(run, repeats), copies[traffic]))

    measure("gather", lambda: gather(cache, slots, chunk), 2 * chunk_bytes)
    measure("scatter", lambda: scatter(chunk, cache, slots), 2 * chunk_bytes)
    fp8_ok = torch.cuda.get_device_capability(device) >= (8, 9)
    for scheme in QuantScheme:
        if scheme is QuantScheme.FP8 and not fp8_ok:
            continue
        measure_scheme(measure, scheme, shape, cache, slots, chunk)
    return rows


def measure_scheme(
    measure: Callable[[str, Callable[[], object], int], None],
    scheme: QuantScheme,
    shape: Shape,
    cache: PagedKVCache,
    slots: torch.Tensor,
    chunk: torch.Tensor,
) -> None:
    group = shape.group_size
    q = quantize(chunk, scheme, group_size=group)
    traffic = chunk.numel() * chunk.element_size() + q.nbytes
    name = scheme.value
    measure(f"quantize {name}", lambda: quantize(chunk, scheme, group_size=group), traffic)
    measure(f"dequantize {name}", lambda: dequantize(q, chunk), traffic)
    measure(
        f"gather_quantize {name}",
        lambda: gather_quantize(cache, slots, scheme, group_size=group),
        traffic,
    )
    measure(f"scatter_dequantize {name}", lambda: scatter_dequantize(q, cache, slots), traffic)


def print_table(rows: Sequence[Row]) -> None:
    print(
        f"{'kernel':<24}{'MiB moved':>11}{'kernel GB/s':>13}{'copy_ GB/s':>12}{'ratio':>8}  target"
    )
    for row in rows:
        verdict = "ok" if row.ratio >= TARGET_RATIO else "below"
        print(
            f"{row.name:<24}{row.traffic / 2**20:>11.1f}"
            f"{row.traffic / row.kernel_seconds / 1e9:>13.1f}"
            f"{row.traffic / row.copy_seconds / 1e9:>12.1f}"
            f"{row.ratio:>8.2f}  >={TARGET_RATIO} {verdict}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8, help="kv heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens moved per call")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=32, help="KIVI key group (tokens)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per kernel")
    parser.add_argument("--quick", action="store_true", help="1024 tokens, 8 layers, 5 runs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    timed = Shape(
        layers=8 if args.quick else args.layers,
        heads=args.heads,
        head_dim=args.head_dim,
        tokens=1024 if args.quick else args.tokens,
        block_size=args.block_size,
        dtype=DTYPES[args.dtype],
        group_size=args.group_size,
    )
    report = Report()
    if not torch.cuda.is_available() or interpreter_enabled():
        print("gpu_kernels: the Triton kernels need a CUDA GPU to run and be timed;")
        print("running the torch reference checks on CPU instead.")
        cpu = torch.device("cpu")
        small = replace(
            timed, layers=2, heads=2, head_dim=16, tokens=37, block_size=4, group_size=8
        )
        reference_checks(report, small, cpu)
        if interpreter_enabled() and triton_available():
            tiny = replace(small, head_dim=8, tokens=13, group_size=4)
            layouts = (PagedLayout.FLASH_ATTN, PagedLayout.CPU_JOINED, PagedLayout.MLA)
            kernel_checks(report, tiny, cpu, layouts)
        return finish(report)
    if not triton_available():
        print("gpu_kernels: Triton is not installed: pip install 'kvstore-llm[triton]'")
        return 1
    cuda = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(cuda)}")
    checked = replace(timed, layers=3, tokens=301)
    reference_checks(report, checked, cuda)
    for dtype in DTYPES.values():
        kernel_checks(report, replace(checked, dtype=dtype), cuda, tuple(PagedLayout))
    if report.failures:
        return finish(report)
    print(
        f"\nbandwidth: {timed.tokens} tokens x {timed.layers} layers x {timed.heads} heads x "
        f"{timed.head_dim} dims, {args.dtype}, block size {timed.block_size}, flash_attn layout"
    )
    print_table(bandwidth(timed, 5 if args.quick else args.repeats))
    return finish(report)


def finish(report: Report) -> int:
    if report.failures:
        print(f"\n{len(report.failures)} check(s) FAILED:")
        for failure in report.failures:
            print(f"  {failure}")
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
