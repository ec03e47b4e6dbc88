"""int4_matmul's compiled CPU decode kernels (M < 16 rows of x; fp32 x and bf16 x below the bf16 GEMM paths):
the AVX512-VNNI digit kernel, AVX-512's exact table kernel, AVX2 and portable, each against the float64 oracle
x @ dequantize().T (+ bias). Shapes aim at the kernels' edges: N below, at and past a multiple of the 4-row
weight tile (the last tile prefetches itself instead of a next one), group counts that leave a partial vector of
zero-point terms, groups spanning several 128-value blocks (256, 384), and groups the VNNI kernel refuses."""

import dataclasses

import pytest
import torch

import dsattn
from dsattn.testing import assert_close, non_contiguous, tolerance

from conftest import requires_backend
from test_int4_matmul import CPU_PATHS, _path_id, expected, quantized

PATHS = CPU_PATHS or [("portable", "1")]

# (group_size, K): groups per row 20 (16 + a tail of 4), 3, 17 (16 + 1), 3 (two blocks per group), 3 (three
# blocks per group, not a power of two), and two the VNNI kernel does not take (K % 128 != 0, group 96).
GROUPS = [(32, 640), (64, 192), (128, 2176), (256, 768), (384, 1152), (32, 96), (96, 288)]


def _op(x, w, bias=None):
    return torch.ops.dsattn_C.int4_matmul(x, w.qweight, w.scales.float(), w.zeros, w.group_size, bias)


@pytest.mark.parametrize("path", PATHS, ids=_path_id)
@pytest.mark.parametrize("group_size,k", GROUPS)
def test_decode_rows_match_float64(monkeypatch, path, group_size, k):
    """M = 1..17 (VNNI below 4 rows, the table kernel from 4, bf16 x's GEMM from 16), N = 3 (row-by-row tiles
    only), 8 (two whole tiles) and 37 (a partial last tile), fp32 and bf16 x, bias and none, asymmetric and
    symmetric zero points."""
    requires_backend("cpp", "cpu", "int4_matmul")
    monkeypatch.setenv("DSATTN_CPU_ISA", path[0])
    monkeypatch.setenv("DSATTN_INT4_VNNI", path[1])
    for n, symmetric in ((3, False), (8, True), (37, False)):
        w = quantized(n, k, group_size, symmetric)
        bias = torch.randn(n)
        for m in range(1, 18):
            x = torch.randn(m, k)
            for dtype in (torch.float32, torch.bfloat16):
                xd = x.to(dtype)
                b = bias if m % 2 else None
                out = _op(xd, w, b)
                assert out.dtype == dtype and out.shape == (m, n)
                assert_close(out, expected(xd, w, b), tolerance(dtype), name=f"N={n} M={m} {dtype}")


@pytest.mark.parametrize("path", PATHS, ids=_path_id)
def test_decode_zero_point_term_dominates(monkeypatch, path):
    """x with a large common offset: the zero-point term s z sum(x) is most of each group's sum and cancels
    against s sum(q x); zero points at both ends (0 and 15) and in between, per row and group."""
    requires_backend("cpp", "cpu", "int4_matmul")
    monkeypatch.setenv("DSATTN_CPU_ISA", path[0])
    monkeypatch.setenv("DSATTN_INT4_VNNI", path[1])
    n, k, g = 21, 2176, 128
    w = quantized(n, k, g)
    zeros = torch.randint(0, 16, w.zeros.shape, dtype=torch.uint8)
    zeros[0] = 0
    zeros[1] = 15
    w = dataclasses.replace(w, zeros=zeros)
    for m in (1, 2, 3, 5):
        x = torch.randn(m, k) + 30.0
        assert_close(_op(x, w), expected(x, w), tolerance(torch.float32), name=f"M={m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1,), (1, 1), (3,), (2, 5)])
def test_decode_through_the_api_non_contiguous(dtype, lead):
    """The public entry with non-contiguous 2-D / 3-D x of decode sizes, bias in x's dtype, AWQ input scales."""
    requires_backend("cpp", "cpu", "int4_matmul")
    k, n = 1024, 29
    w = quantized(n, k, 128, act_scales=torch.rand(k) + 0.5)
    x = non_contiguous(torch.randn(*lead, k).to(dtype))
    bias = torch.randn(n, dtype=dtype)
    got = dsattn.int4_matmul(x, w, bias, backend="cpp")
    assert got.shape == (*lead, n) and got.dtype == dtype
    assert_close(got, expected(x, w, bias), tolerance(dtype))


@pytest.mark.parametrize("path", PATHS, ids=_path_id)
def test_decode_same_bits_at_any_thread_count(monkeypatch, path):
    """Each output element is computed by one task in a fixed order: 1 and 2 threads give the same bits."""
    requires_backend("cpp", "cpu", "int4_matmul")
    monkeypatch.setenv("DSATTN_CPU_ISA", path[0])
    monkeypatch.setenv("DSATTN_INT4_VNNI", path[1])
    w = quantized(515, 512, 128)
    x = torch.randn(3, 512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [_op(x[:m], w) for m in (1, 3)]
        torch.set_num_threads(2)
        two = [_op(x[:m], w) for m in (1, 3)]
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_decode_bf16_rows_take_the_vnni_kernel_below_the_gemm(monkeypatch):
    """bf16 x below 16 rows (the AMX GEMM off) takes the two-digit VNNI kernel at every row count on a VNNI CPU (fp32 x only below
    4): its result differs from the exact kernel's (DSATTN_INT4_VNNI=0) by the digits' rounding only."""
    requires_backend("cpp", "cpu", "int4_matmul")
    if ("avx512", "0") not in CPU_PATHS:
        pytest.skip("no AVX-512 on this CPU")
    try:
        with open("/proc/cpuinfo") as f:
            vnni = "avx512_vnni" in f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to tell whether the CPU has VNNI")
    monkeypatch.delenv("DSATTN_CPU_ISA", raising=False)
    monkeypatch.setenv("DSATTN_INT4_AMX", "0")  # on AMX CPUs the fused GEMM takes bf16 x from 8 rows
    w = quantized(256, 1024, 128)  # enough outputs that some bf16 rounding must differ
    for m in (4, 9, 15):
        x = torch.randn(m, 1024)
        monkeypatch.setenv("DSATTN_INT4_VNNI", "1")
        default_bf16, default_fp32 = _op(x.bfloat16(), w), _op(x, w)
        monkeypatch.setenv("DSATTN_INT4_VNNI", "0")
        exact_bf16, exact_fp32 = _op(x.bfloat16(), w), _op(x, w)
        assert torch.equal(default_fp32, exact_fp32)
        assert torch.equal(default_bf16, exact_bf16) != vnni
        assert_close(default_bf16, expected(x.bfloat16(), w), tolerance(torch.bfloat16))


@pytest.mark.parametrize("path", PATHS, ids=_path_id)
def test_decode_nan_and_inf_stay_in_their_row(monkeypatch, path):
    """A NaN or an Inf in one row of x makes that output row non-finite and leaves the other rows exact (the
    VNNI kernel's NaN / Inf digit scales and zero-point sums included), fp32 x at 3 rows and bf16 x at 5."""
    requires_backend("cpp", "cpu", "int4_matmul")
    monkeypatch.setenv("DSATTN_CPU_ISA", path[0])
    monkeypatch.setenv("DSATTN_INT4_VNNI", path[1])
    k, n = 640, 13
    w = quantized(n, k, 128)
    for m, dtype in ((3, torch.float32), (5, torch.bfloat16)):
        x = torch.randn(m, k).to(dtype)
        x[0, 300] = float("nan")
        x[1, 7] = float("inf")
        got = _op(x, w)
        assert got[0].isnan().all() and not got[1].isfinite().any()
        assert_close(got[2:], expected(x[2:], w), tolerance(dtype))
