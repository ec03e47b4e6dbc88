"""int4_matmul kernels (Triton in the interpreter, the compiled CPU kernel, the CUDA GEMV on a GPU) against
x @ dequantize().T in float64, plus backend selection. Format and torch-backend tests: tests/test_int4.py."""

import pytest
import torch

import dsattn
from dsattn.ops import int4_matmul as ops
from dsattn.testing import assert_close, non_contiguous, poisoned, tolerance

from conftest import requires_backend


def expected(x, w, bias=None):
    """float64 x @ dequantize().T (+ bias), with the AWQ input_scale inside dequantize()."""
    out = x.double() @ w.dequantize(torch.float64).T
    return out + bias.double() if bias is not None else out


def quantized(n, k, group_size, symmetric=False, dtype=torch.float32, act_scales=None):
    return dsattn.quantize_int4((torch.randn(n, k) * 0.5).to(dtype), group_size=group_size, symmetric=symmetric,
                                act_scales=act_scales)


# ----------------------------------------------------------------------------------------- Triton
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split_k", [1, 3])
def test_triton_kernel_equals_dequantized_matmul(triton_device, group_size, symmetric, dtype, split_k):
    from dsattn.triton_kernels import int4_matmul as tk

    m, n, k = 5, 37, 768
    w = quantized(n, k, group_size, symmetric).to(triton_device)
    x = torch.randn(m, k, device=triton_device).to(dtype)
    bias = torch.randn(n, device=triton_device)
    got = tk.int4_matmul(x, w.qweight, w.scales, w.zeros, group_size, bias, split_k=split_k)
    assert got.dtype == dtype and got.shape == (m, n)
    assert_close(got, expected(x, w, bias), tolerance(dtype))


@pytest.mark.parametrize("m", [1, 17, 70])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_odd_sizes_every_tile_class_poisoned(triton_device, m, dtype):
    """M in each row-tile class (16 / 64 / 128 rows), N not a multiple of any tile, K = 3 groups of 32;
    without split-K into a NaN-filled buffer, with split-K through the fp32 buffer."""
    from dsattn.triton_kernels import int4_matmul as tk

    n, k, g = 131, 96, 32
    w = quantized(n, k, g).to(triton_device)
    x = torch.randn(m, k, device=triton_device).to(dtype)
    out = poisoned((m, n), dtype, triton_device)
    tk.int4_matmul(x, w.qweight, w.scales, w.zeros, g, None, split_k=1, out=out)
    assert_close(out, expected(x, w), tolerance(dtype))
    if m <= 64:  # the 128-row prefill tile has no split-K variant
        assert_close(tk.int4_matmul(x, w.qweight, w.scales, w.zeros, g, split_k=3), expected(x, w), tolerance(dtype))


def test_triton_through_the_api_3d_noncontiguous_awq_bias(triton_device):
    k, n = 256, 24
    w = quantized(n, k, 64, act_scales=torch.rand(k) + 0.5).to(triton_device)
    bias = torch.randn(n, device=triton_device, dtype=torch.bfloat16)
    x = non_contiguous(torch.randn(2, 3, k, device=triton_device))
    assert not x.is_contiguous()
    got = dsattn.int4_matmul(x, w, bias, backend="triton")
    assert got.shape == (2, 3, n) and got.dtype == torch.float32
    assert_close(got, expected(x, w, bias), tolerance(torch.float32))
    xb = x.to(torch.bfloat16)
    assert_close(dsattn.int4_matmul(xb, w, bias, backend="triton"), expected(xb, w, bias), tolerance(torch.bfloat16))


def test_triton_scales_in_another_dtype_and_group_16(triton_device):
    """fp16 scales with fp32 x, and group_size 16 (BLOCK_K 16)."""
    w = quantized(20, 64, 16, dtype=torch.float16).to(triton_device)
    assert w.scales.dtype == torch.float16
    x = torch.randn(3, 64, device=triton_device)
    assert_close(dsattn.int4_matmul(x, w, backend="triton"), expected(x, w), tolerance(torch.float32))


def test_triton_rejects_group_sizes_it_cannot_tile(triton_device):
    w = quantized(8, 48, 24).to(triton_device)
    with pytest.raises(ValueError, match="group_size % 16"):
        dsattn.int4_matmul(torch.randn(2, 48, device=triton_device), w, backend="triton")


def test_triton_block_k_never_straddles_a_group():
    from dsattn.triton_kernels import int4_matmul as tk

    for g in (16, 32, 48, 64, 96, 128, 256, 1024):
        for most in (32, 64, 128):
            bk = tk.block_k(g, most)
            assert bk <= most and g % bk == 0 and bk >= 16
            assert bk in tk.block_k_options(most)


# ----------------------------------------------------------------------------------------- compiled CPU
@pytest.mark.parametrize("m", [1, 4, 7, 16, 33])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, 96])
@pytest.mark.parametrize("symmetric", [False, True])
def test_compiled_cpu_kernel_row_blocks(m, group_size, symmetric):
    """Both CPU paths (M < 4 unpacks per row; M >= 4 dequantizes row blocks per K chunk): N not a multiple of
    the 4-row block, K with a partial last chunk, bias, straight through torch.ops (fp32 contract)."""
    requires_backend("cpp", "cpu", "int4_matmul")
    n, k = 37, 3 * 256 if group_size != 96 else 7 * 96
    w = quantized(n, k, group_size, symmetric)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    got = torch.ops.dsattn_C.int4_matmul(x, w.qweight, w.scales.float(), w.zeros, group_size, bias)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert_close(got, expected(x, w, bias), tolerance(torch.float32))
    assert_close(torch.ops.dsattn_C.int4_matmul(x, w.qweight, w.scales.float(), w.zeros, group_size),
                 expected(x, w), tolerance(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [16, 64, 131])
@pytest.mark.parametrize("group_size", [128, 96])
@pytest.mark.parametrize("symmetric", [False, True])
def test_compiled_cpu_kernel_gemm_panels(m, group_size, symmetric, dtype):
    """M >= 64 (bf16 x: M >= 16): the weight dequantized in 256-row panels + BLAS GEMM (bf16 x: bf16 panels
    and GEMM); N = 300 leaves a partial second panel."""
    requires_backend("cpp", "cpu", "int4_matmul")
    n, k = 300, 3 * group_size
    w = quantized(n, k, group_size, symmetric)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n)
    out = torch.ops.dsattn_C.int4_matmul(x, w.qweight, w.scales.float(), w.zeros, group_size, bias)
    assert out.shape == (m, n) and out.is_contiguous() and out.dtype == dtype
    assert_close(out, expected(x, w, bias), tolerance(dtype))
    assert_close(torch.ops.dsattn_C.int4_matmul(x, w.qweight, w.scales.float(), w.zeros, group_size),
                 expected(x, w), tolerance(dtype))


@pytest.mark.parametrize("m", [1, 5, 15])
def test_compiled_cpu_kernel_bf16_few_rows(m):
    """bf16 x below 16 rows runs the fp32 kernels and rounds once: exactly fp32 math rounded to bf16."""
    requires_backend("cpp", "cpu", "int4_matmul")
    w = quantized(37, 256, 64, False)
    x = torch.randn(m, 256).to(torch.bfloat16)
    bias = torch.randn(37)
    out = torch.ops.dsattn_C.int4_matmul(x, w.qweight, w.scales.float(), w.zeros, 64, bias)
    fp32 = torch.ops.dsattn_C.int4_matmul(x.float(), w.qweight, w.scales.float(), w.zeros, 64, bias)
    assert out.dtype == torch.bfloat16 and torch.equal(out, fp32.to(torch.bfloat16))


@pytest.mark.parametrize("lead", [(3, 5), (2, 40)])  # 15 rows: GEMV/blocked paths; 80 rows: GEMM panels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_through_the_api_3d_noncontiguous(dtype, lead):
    requires_backend("cpp", "cpu", "int4_matmul")
    w = quantized(29, 256, 64, act_scales=torch.rand(256) + 0.5)
    x = non_contiguous(torch.randn(*lead, 256).to(dtype))
    bias = torch.randn(29, dtype=dtype)
    got = dsattn.int4_matmul(x, w, bias, backend="cpp")
    assert got.shape == (*lead, 29) and got.dtype == dtype
    assert_close(got, expected(x, w, bias), tolerance(dtype))


# ----------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16, 21])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group_size,k", [(32, 512), (128, 1024), (256, 768), (24, 72)])  # K=72: word loads
def test_cuda_kernel_equals_dequantized_matmul(m, dtype, group_size, k):
    requires_backend("cuda", "cuda", "int4_matmul")
    n = 45
    w = quantized(n, k, group_size, symmetric=m % 2 == 0).to("cuda")
    x = non_contiguous(torch.randn(m, k, device="cuda").to(dtype))
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    got = dsattn.int4_matmul(x, w, bias, backend="cuda")
    assert got.dtype == dtype and got.shape == (m, n)
    assert_close(got, expected(x, w, bias), tolerance(dtype))
    scales16 = w.scales.half()  # scales in another dtype than x, converted on load
    raw = torch.ops.dsattn_C.int4_matmul(x.contiguous(), w.qweight, scales16, w.zeros, group_size)
    ref = x.double() @ ((w.dequantize(torch.float64) / w.scales.double().repeat_interleave(group_size, 1))
                        * scales16.double().repeat_interleave(group_size, 1)).T
    assert_close(raw, ref, tolerance(dtype))


@pytest.mark.gpu
def test_cuda_3d_awq_and_misaligned_x():
    requires_backend("cuda", "cuda", "int4_matmul")
    k = 256
    w = quantized(33, k, 64, act_scales=torch.rand(k) + 0.5).to("cuda")
    x = torch.randn(2, 3, k, device="cuda", dtype=torch.float16)
    assert_close(dsattn.int4_matmul(x, w, backend="cuda"), expected(x, w), tolerance(torch.float16))
    plain = quantized(33, k, 64).to("cuda")
    flat = torch.randn(4 * k + 1, device="cuda", dtype=torch.float16)
    x_misaligned = flat[1:].view(4, k)  # contiguous at a 2-byte offset: copied for the 16-byte loads
    got = torch.ops.dsattn_C.int4_matmul(x_misaligned, plain.qweight, plain.scales, plain.zeros, 64)
    assert_close(got, expected(x_misaligned, plain), tolerance(torch.float16))


# ----------------------------------------------------------------------------------------- selection
def test_auto_order_decode_to_cuda_prefill_to_triton():
    cuda = torch.device("cuda")
    assert ops._auto_order(cuda, 1)[0] == "cuda" and ops._auto_order(cuda, ops.CUDA_GEMV_MAX_M)[0] == "cuda"
    assert ops._auto_order(cuda, ops.CUDA_GEMV_MAX_M + 1)[0] == "triton"
    assert ops._auto_order(torch.device("cpu"), 1) == ("cpp", "torch")


def test_auto_on_cpu_uses_the_compiled_kernel_and_float64_the_reference():
    requires_backend("cpp", "cpu", "int4_matmul")
    w = quantized(16, 64, 32)
    x = torch.randn(2, 64)
    assert torch.equal(dsattn.int4_matmul(x, w), dsattn.int4_matmul(x, w, backend="cpp"))
    x64 = x.double()
    assert_close(dsattn.int4_matmul(x64, w), expected(x64, w), 1e-10)
