"""The Triton kernels of kvstore.triton_kernels against their torch references.

The kernels run on CPU in Triton's interpreter: ``TRITON_INTERPRET=1`` is set
at the top of this module, before anything imports Triton (the package
imports it only when a kernel first runs), so ``@triton.jit`` builds
interpreted functions. The interpreter is slow, so shapes are small.

What must match, and why not always bit for bit:

* gather/scatter bytes, integer codes (int8, KIVI), scales and zero points:
  exactly;
* fp8 codes: within one e4m3 step, because the interpreter rounds ties away
  from zero (not to even), or half the right code where a rounding carries
  into the next power of two, a carry the interpreter drops;
* dequantized values: exactly in float16/float32; within one bfloat16 ulp in
  bfloat16 (the interpreter's fp32 -> bf16 cast does not round to nearest).

The GPU test runs ``benchmarks/gpu_kernels.py`` (compiled kernels, no
interpreter); the slow test compiles each kernel mode for sm_90 without a GPU.
"""

import importlib.util
import os

os.environ["TRITON_INTERPRET"] = "1"

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prerequisites import missing

from kvstore.errors import InvalidArgumentError
from kvstore.triton_kernels import (
    PagedKVCache,
    PagedLayout,
    QuantizedKV,
    QuantScheme,
    dequantize,
    gather,
    gather_quantize,
    quantize,
    scatter,
    scatter_dequantize,
)
from kvstore.triton_kernels import reference as ref

REPO = Path(__file__).resolve().parents[1]
BENCHMARK = REPO / "benchmarks" / "gpu_kernels.py"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.fixture(autouse=True, scope="module")
def _interpreted_kernels() -> None:
    """Skip unless Triton is installed and the kernels were built for its interpreter."""
    if importlib.util.find_spec("triton") is None:
        missing("triton is not installed")
    from triton.runtime.interpreter import InterpretedFunction

    from kvstore.triton_kernels import kernels

    if not isinstance(kernels._gather_rows, InterpretedFunction):
        pytest.skip("the kernels were imported before TRITON_INTERPRET was set")


def assert_same_quantized(kernel: QuantizedKV, expected: QuantizedKV) -> None:
    for name, tensor in expected.params.items():
        assert torch.equal(kernel.params[name], tensor), name
    if expected.scheme is not QuantScheme.FP8:
        assert torch.equal(kernel.data, expected.data)
        return
    ours, theirs = kernel.data.float(), expected.data.float()
    mantissa, exponent = torch.frexp(theirs)
    step = torch.where(theirs.abs() >= 2.0**-6, torch.exp2(exponent.float() - 4), 2.0**-9)
    carry_dropped = (2 * ours == theirs) & (mantissa.abs() == 0.5)
    assert bool((((ours - theirs).abs() <= step) | carry_dropped).all())
    assert int((ours != theirs).sum()) <= 0.1 * ours.numel()


def assert_same_values(kernel: torch.Tensor, expected: torch.Tensor) -> None:
    if expected.dtype == torch.bfloat16:
        torch.testing.assert_close(kernel, expected, rtol=2.0**-7, atol=0.0)
    else:
        assert torch.equal(kernel, expected)


def random_kv(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator) * 3
    values[..., ::6, :, :] = 0.0
    return values.to(dtype)


def random_cache(layout: PagedLayout, dtype: torch.dtype = torch.bfloat16) -> PagedKVCache:
    """2 layers of 5 blocks of 4 tokens (20 slots), 3 heads (1 for MLA), 6 channels."""
    heads = 1 if layout is PagedLayout.MLA else 3
    cache = PagedKVCache.allocate(
        layout, num_layers=2, num_blocks=5, block_size=4, num_heads=heads, head_dim=6, dtype=dtype
    )
    for planes in cache.planes:
        for plane in planes:
            plane.copy_(torch.randn(plane.shape))
    return cache


def same_cache(first: PagedKVCache, second: PagedKVCache) -> bool:
    return all(
        torch.equal(mine, theirs)
        for ours, others in zip(first.planes, second.planes)
        for mine, theirs in zip(ours, others)
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("scheme", list(QuantScheme))
def test_quantize_and_dequantize_match_reference(scheme: QuantScheme, dtype: torch.dtype) -> None:
    kv = random_kv((2, 2, 19, 3, 8), dtype)
    expected = ref.quantize(kv, scheme, group_size=8)
    assert_same_quantized(quantize(kv, scheme, group_size=8, backend="triton"), expected)
    assert_same_values(dequantize(expected, backend="triton"), ref.dequantize(expected))


@pytest.mark.parametrize("scheme", list(QuantScheme))
def test_mla_latent_matches_reference(scheme: QuantScheme) -> None:
    kv = random_kv((3, 1, 10, 1, 12), torch.float16)
    expected = ref.quantize(kv, scheme, group_size=4)
    assert_same_quantized(quantize(kv, scheme, group_size=4, backend="triton"), expected)
    assert_same_values(dequantize(expected, backend="triton"), ref.dequantize(expected))


def test_strided_input_and_output_need_no_copy() -> None:
    wide = random_kv((2, 2, 14, 3, 8), torch.float32)
    kv = wide[:, :, ::2]
    expected = ref.quantize(kv, QuantScheme.KIVI4, group_size=3)
    assert_same_quantized(quantize(kv, QuantScheme.KIVI4, group_size=3, backend="triton"), expected)
    out = torch.zeros(2, 2, 3, 7, 8, dtype=torch.float16).transpose(2, 3)
    assert dequantize(expected, out, backend="triton") is out
    assert torch.equal(out, ref.dequantize(expected, torch.empty(out.shape, dtype=torch.float16)))


@pytest.mark.parametrize("layout", list(PagedLayout))
def test_gather_and_scatter_match_reference(layout: PagedLayout) -> None:
    cache = random_cache(layout)
    slots = torch.tensor([17, 0, 5, 11, 19, 2, 8], dtype=torch.int32)
    chunk = gather(cache, slots, backend="triton")
    assert torch.equal(chunk, ref.gather(cache, slots))
    ours, theirs = random_cache(layout), random_cache(layout)
    for mine, other in zip(ours.layers, theirs.layers):
        for mine_tensor, other_tensor in zip(
            mine if isinstance(mine, tuple) else (mine,),
            other if isinstance(other, tuple) else (other,),
        ):
            mine_tensor.copy_(other_tensor)
    scatter(chunk, ours, slots, backend="triton")
    ref.scatter(chunk, theirs, slots)
    assert same_cache(ours, theirs)


@pytest.mark.parametrize("scheme", list(QuantScheme))
def test_fused_gather_quantize_and_scatter_dequantize(scheme: QuantScheme) -> None:
    cache = random_cache(PagedLayout.CPU_JOINED)
    slots = torch.tensor([3, 18, 7, 0, 12, 9])
    expected = ref.gather_quantize(cache, slots, scheme, group_size=4)
    fused = gather_quantize(cache, slots, scheme, group_size=4, backend="triton")
    assert_same_quantized(fused, expected)
    ours, theirs = random_cache(PagedLayout.CPU_JOINED), random_cache(PagedLayout.CPU_JOINED)
    scatter_dequantize(expected, ours, slots, backend="triton")
    ref.scatter_dequantize(expected, theirs, slots)
    for mine, other in zip(ours.planes, theirs.planes):
        for mine_plane, other_plane in zip(mine, other):
            index = (slots // 4, slots % 4)
            assert_same_values(mine_plane[index], other_plane[index])


@pytest.mark.parametrize("tokens", [0, 1])
def test_empty_and_single_token(tokens: int) -> None:
    cache = random_cache(PagedLayout.FLASH_ATTN, torch.float32)
    slots = torch.arange(tokens) + 6
    chunk = gather(cache, slots, backend="triton")
    assert torch.equal(chunk, ref.gather(cache, slots))
    scatter(chunk * 2, cache, slots, backend="triton")
    assert torch.equal(ref.gather(cache, slots), chunk * 2)
    for scheme in (QuantScheme.INT8, QuantScheme.KIVI4):
        q = gather_quantize(cache, slots, scheme, backend="triton")
        assert_same_quantized(q, ref.gather_quantize(cache, slots, scheme))
        assert torch.equal(dequantize(q, backend="triton"), ref.dequantize(q))


def test_out_of_range_slots_rejected_before_any_write() -> None:
    cache = random_cache(PagedLayout.FLASHINFER)
    before = [layer.clone() for layer in cache.layers]
    slots = torch.tensor([0, 20])
    chunk = torch.ones(cache.chunk_shape(2), dtype=cache.dtype)
    with pytest.raises(InvalidArgumentError, match=r"\[0, 20\)"):
        scatter(chunk, cache, slots, backend="triton")
    with pytest.raises(InvalidArgumentError, match=r"\[0, 20\)"):
        scatter_dequantize(ref.quantize(chunk, QuantScheme.FP8), cache, slots, backend="triton")
    with pytest.raises(InvalidArgumentError, match=r"\[0, 20\)"):
        gather(cache, torch.tensor([-1]), backend="triton")
    assert all(torch.equal(now, then) for now, then in zip(cache.layers, before))


@st.composite
def kernel_cases(draw: st.DrawFn) -> tuple[torch.Tensor, QuantScheme, int]:
    planes = draw(st.sampled_from([1, 2]))
    shape = (
        draw(st.integers(1, 2)),
        planes,
        draw(st.integers(0, 13)),
        1 if planes == 1 else draw(st.integers(1, 3)),
        draw(st.integers(1, 5)) * 2,
    )
    kv = random_kv(shape, draw(st.sampled_from(FLOAT_DTYPES)), draw(st.integers(0, 999)))
    return kv, draw(st.sampled_from(list(QuantScheme))), draw(st.integers(1, 7))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kernel_cases())
def test_kernels_match_reference_on_odd_shapes(case: tuple[torch.Tensor, QuantScheme, int]) -> None:
    kv, scheme, group_size = case
    expected = ref.quantize(kv, scheme, group_size=group_size)
    assert_same_quantized(quantize(kv, scheme, group_size=group_size, backend="triton"), expected)
    out = torch.empty(kv.shape)
    assert torch.equal(dequantize(expected, out, backend="triton"), ref.dequantize(expected, out))


def test_benchmark_script_checks_kernels_without_a_gpu() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "need a CUDA GPU" in result.stdout
    assert "kernel checks on cpu (interpreter)" in result.stdout
    assert "all checks passed" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernels_on_gpu() -> None:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


COMPILE_FOR_SM90 = textwrap.dedent(
    """
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from kvstore.triton_kernels import kernels

    def build(fn, constants):
        signature = {
            name: "constexpr" if name in constants else ("*i64" if index < 5 else "i32")
            for index, name in enumerate(fn.arg_names)
        }
        source = ASTSource(fn=fn, signature=signature, constexprs=constants)
        triton.compile(source, target=GPUTarget("cuda", 90, 32))

    bf16 = tl.bfloat16
    tile = dict(NUM_HEADS=8, HEAD_DIM=128, SRC_ALIGN=16, DST_ALIGN=16, BLOCK_H=8, BLOCK_D=128)
    for mode, codes, limit, packed in (
        (0, bf16, 0.0, False), (1, tl.int8, 127.0, False), (2, tl.float8e4nv, 448.0, False),
        (3, tl.uint8, 255.0, False), (3, tl.uint8, 15.0, True),
    ):
        build(kernels._gather_rows, dict(tile, SRC_DTYPE=bf16, DST_DTYPE=codes, MODE=mode,
                                         LIMIT=limit, PACKED=packed, BLOCK_T=4))
    for packed, levels in ((False, 255.0), (True, 15.0)):
        build(kernels._gather_channel_groups, dict(tile, SRC_DTYPE=bf16, LEVELS=levels,
                                                   PACKED=packed, BLOCK_G=32, BLOCK_H=1))
    for mode, codes, packed in (
        (0, bf16, False), (1, tl.int8, False), (1, tl.float8e4nv, False),
        (2, tl.uint8, False), (2, tl.uint8, True),
    ):
        build(kernels._scatter_rows, dict(tile, SRC_DTYPE=codes, DST_DTYPE=bf16, MODE=mode,
                                          PACKED=packed, BLOCK_T=4))
    print("compiled")
    """
)


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path: Path) -> None:
    """Compiled mode (not the interpreter) accepts each kernel mode (bf16 input); ptxas ships
    with Triton, so no GPU is needed. Uses Triton's own compile API (``ASTSource``)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_SM90],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "compiled" in result.stdout
