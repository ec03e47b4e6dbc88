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
def test_compiled_cpu_kernel_bf16_few_rows(monkeypatch, m):
    """bf16 x below 16 rows runs the decode kernels in fp32 and rounds once: without VNNI exactly fp32 math
    rounded to bf16; the VNNI kernel takes two int8 digits of x instead of fp32's three (bf16 tolerance)."""
    requires_backend("cpp", "cpu", "int4_matmul")
    monkeypatch.setenv("DSATTN_INT4_AMX", "0")  # on AMX CPUs the fused GEMM takes bf16 x from 8 rows
    w = quantized(37, 256, 64, False)
    x = torch.randn(m, 256).to(torch.bfloat16)
    bias = torch.randn(37)
    out = torch.ops.dsattn_C.int4_matmul(x, w.qweight, w.scales.float(), w.zeros, 64, bias)
    assert out.dtype == torch.bfloat16
    assert_close(out, expected(x, w, bias), tolerance(torch.bfloat16))
    monkeypatch.setenv("DSATTN_INT4_VNNI", "0")
    out = torch.ops.dsattn_C.int4_matmul(x, w.qweight, w.scales.float(), w.zeros, 64, bias)
    fp32 = torch.ops.dsattn_C.int4_matmul(x.float(), w.qweight, w.scales.float(), w.zeros, 64, bias)
    assert torch.equal(out, fp32.to(torch.bfloat16))


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
    assert ops._auto_order("cuda", 1)[0] == "cuda" and ops._auto_order("cuda", ops.CUDA_GEMV_MAX_M)[0] == "cuda"
    assert ops._auto_order("cuda", ops.CUDA_GEMV_MAX_M + 1)[0] == "triton"
    assert ops._auto_order("cpu", 1) == ("cpp", "torch")


def test_auto_on_cpu_uses_the_compiled_kernel_and_float64_the_reference():
    requires_backend("cpp", "cpu", "int4_matmul")
    w = quantized(16, 64, 32)
    x = torch.randn(2, 64)
    assert torch.equal(dsattn.int4_matmul(x, w), dsattn.int4_matmul(x, w, backend="cpp"))
    x64 = x.double()
    assert_close(dsattn.int4_matmul(x64, w), expected(x64, w), 1e-10)


# ----------------------------------------------------------------------------------------- the custom op
from dsattn import _backend, _ext  # noqa: E402
from dsattn.reference.int4_matmul import int4_matmul as oracle  # noqa: E402
from dsattn.testing import assert_compiles, assert_grads_match  # noqa: E402
from dsattn.torch_backend import int4_matmul as torch_backend  # noqa: E402


def _oracle(w):
    return lambda x, bias: oracle(x, w.qweight, w.scales, w.zeros, w.group_size, w.input_scale, bias)


def test_torch_backend_and_oracle_equal_brute_force():
    """Both against a per-element float64 sum over the unpacked nibbles; the torch backend over several row
    chunks (N = 37 in chunks of 16)."""
    from dsattn.reference.int4 import unpack_int4

    n, k, g = 37, 96, 32
    w = quantized(n, k, g, act_scales=torch.rand(k) + 0.5)
    x = torch.randn(2, 3, k, dtype=torch.float64)
    bias = torch.randn(n, dtype=torch.float64)
    q = unpack_int4(w.qweight).double()
    col_group = torch.arange(k) // g
    brute = torch.zeros(2, 3, n, dtype=torch.float64)
    for j in range(n):
        wj = (q[j] - w.zeros[j, col_group].double()) * w.scales[j, col_group].double() * w.input_scale.double()
        brute[..., j] = (x * wj).sum(-1) + bias[j]
    assert_close(oracle(x, w.qweight, w.scales, w.zeros, g, w.input_scale, bias), brute, 1e-12)
    got = torch_backend.int4_matmul(x, w.qweight, w.scales, w.zeros, g, w.input_scale, bias, rows_per_chunk=16)
    assert_close(got, brute, 1e-12)


@pytest.mark.parametrize("lead,n,k,g,dtype,awq,transposed", [
    ((7,), 37, 96, 32, torch.float32, False, False),  # odd sizes
    ((2, 5), 19, 128, 64, torch.float32, True, True),  # leading dims, AWQ input_scale, non-contiguous x
    ((3,), 24, 64, 16, torch.bfloat16, False, False),
    ((3,), 24, 64, 32, torch.float16, True, True),
])
def test_gradients_match_float64_autograd_of_the_oracle(lead, n, k, g, dtype, awq, transposed):
    w = quantized(n, k, g, act_scales=torch.rand(k) + 0.5 if awq else None)
    x = torch.randn(*lead, k).to(dtype)
    x = (non_contiguous(x) if transposed else x).requires_grad_(True)
    bias = torch.randn(n, dtype=dtype, requires_grad=True)
    assert_grads_match(lambda x, b: dsattn.int4_matmul(x, w, b), _oracle(w), [x, bias], tolerance(dtype),
                       name="int4_matmul")


def test_gradient_of_x_only_and_bias_only():
    w = quantized(21, 64, 32)
    x = torch.randn(4, 64, requires_grad=True)
    bias = torch.randn(21)
    assert_grads_match(lambda x, b: dsattn.int4_matmul(x, w, b), _oracle(w), [x, bias], name="int4_matmul dx")
    x, bias = x.detach(), bias.requires_grad_(True)
    assert_grads_match(lambda x, b: dsattn.int4_matmul(x, w, b), _oracle(w), [x, bias], name="int4_matmul dbias")


def test_gradcheck_float64_torch_backend():
    w = quantized(11, 32, 16, act_scales=torch.rand(32) + 0.5)
    x = torch.randn(2, 3, 32, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: dsattn.int4_matmul(x, w, b, backend="torch"), (x, bias))


def test_backward_dequantizes_by_row_chunks(monkeypatch):
    """Forward and backward dequantize at most ROWS_PER_CHUNK weight rows at a time, never all N."""
    monkeypatch.setattr(torch_backend, "ROWS_PER_CHUNK", 8)
    rows = []
    dequantize_rows = torch_backend.dequantize_rows
    monkeypatch.setattr(torch_backend, "dequantize_rows",
                        lambda q, *a: rows.append(q.shape[0]) or dequantize_rows(q, *a))
    w = quantized(45, 64, 32)
    x = torch.randn(3, 64, requires_grad=True)
    out = dsattn.int4_matmul(x, w)
    out.sum().backward()
    assert max(rows) == 8 and sum(rows) == 2 * 45
    assert_close(x.grad, torch.ones(3, 45, dtype=torch.float64) @ w.dequantize(torch.float64))


def test_no_silent_detach():
    """A gradient is wanted: auto takes the torch backend; an explicit kernel without a backward raises; under
    no_grad (or with nothing requiring grad) the kernels run."""
    w = quantized(16, 64, 32)
    x = torch.randn(3, 64, requires_grad=True)
    assert dsattn.int4_matmul(x, w).grad_fn is not None
    for backend in ("cpp", "triton"):
        if _backend.unusable_reason(backend, x.device, "int4_matmul") is not None:
            continue
        with pytest.raises(ValueError, match=f"int4_matmul: backend='{backend}' has no backward"):
            dsattn.int4_matmul(x, w, backend=backend)
        with pytest.raises(ValueError, match=f"int4_matmul: backend='{backend}' has no backward"):
            dsattn.int4_matmul(x.detach(), w, torch.zeros(16, requires_grad=True), backend=backend)
        with torch.no_grad():
            assert_close(dsattn.int4_matmul(x, w, backend=backend), expected(x, w), tolerance(torch.float32))


def test_the_int4_weight_is_frozen():
    w = quantized(16, 64, 32)
    w.scales.requires_grad_(True)
    with pytest.raises(ValueError, match="w.scales requires grad, but the int4 weight is frozen"):
        dsattn.int4_matmul(torch.randn(2, 64), w)
    with torch.no_grad():  # no gradient wanted: nothing to drop
        assert_close(dsattn.int4_matmul(torch.randn(2, 64), w).float(), dsattn.int4_matmul(
            torch.randn(2, 64), w).float(), float("inf"))


def test_int4_linear_inference_takes_the_compiled_kernel_training_the_torch_backend():
    requires_backend("cpp", "cpu", "int4_matmul")
    lin = torch.nn.Linear(64, 24)
    mod = dsattn.nn.Int4Linear.from_linear(lin, group_size=32).eval()
    x = torch.randn(3, 64)
    for no_grad in (torch.no_grad, torch.inference_mode):
        with no_grad(), _backend.recording() as chosen:
            mod(x)
        assert chosen == {"int4_matmul": {"cpp"}}
    with _backend.recording() as chosen:
        out = mod(x.requires_grad_(True))  # the bias is a Parameter: its gradient is wanted too
    assert chosen == {"int4_matmul": {"torch"}}
    out.sum().backward()
    assert_close(mod.bias.grad, torch.full((24,), 3.0))
    assert_close(x.grad, torch.ones(3, 24) @ mod.int4_weight().dequantize(torch.float32))


def test_recording_sees_the_entry_fast_path(monkeypatch):
    """Without a gradient the entry calls its kernel without the custom op: recording() still sees the backend
    that ran (tests tell the backend by recording(), not by replacing the op)."""
    requires_backend("cpp", "cpu", "int4_matmul")
    fast = []
    kernel = ops._int4_matmul  # the op holds its own reference: this spy sees only the entry's direct calls
    monkeypatch.setattr(ops, "_int4_matmul", lambda *args: fast.append(args[-1]) or kernel(*args))
    w = quantized(24, 64, 32)
    x = torch.randn(2, 64)
    with _backend.recording() as chosen:
        got = dsattn.int4_matmul(x, w)
    assert fast == ["cpp"] and chosen == {"int4_matmul": {"cpp"}}
    assert_close(got, expected(x, w), tolerance(torch.float32))


def test_opcheck_every_backend_here():
    """torch with gradients, AWQ and bias; cpp without the optional inputs; triton with them (no gradient)."""
    w = quantized(24, 64, 32, act_scales=torch.rand(64) + 0.5)
    x, bias = torch.randn(2, 3, 64), torch.randn(24)
    cases = {"torch": (x.clone().requires_grad_(True), w.input_scale, bias.clone().requires_grad_(True)),
             "cpp": (x[0], None, None), "triton": (x, w.input_scale, bias)}
    for backend, (x_in, input_scale, bias_in) in cases.items():
        if _backend.unusable_reason(backend, x.device, "int4_matmul") is None:
            torch.library.opcheck(torch.ops.dsattn.int4_matmul,
                                  (x_in, w.qweight, w.scales, w.zeros, 32, input_scale, bias_in, backend))


def test_compiles_fullgraph_and_equals_eager():
    w = quantized(24, 64, 32, act_scales=torch.rand(64) + 0.5)
    x = non_contiguous(torch.randn(2, 5, 64)).requires_grad_(True)
    bias = torch.randn(24, requires_grad=True)
    assert_compiles(lambda x, b: dsattn.int4_matmul(x, w, b), [x, bias], name="int4_matmul")
    with torch.no_grad():  # decode on the compiled CPU kernel (auto)
        assert_compiles(lambda x, b: dsattn.int4_matmul(x[:, -1:], w, b), [x, bias], name="decode")


def test_int4_linear_traces_without_graph_breaks():
    mod = dsattn.nn.Int4Linear.from_linear(torch.nn.Linear(64, 24), group_size=32).eval()
    x = torch.randn(3, 64, requires_grad=True)
    for grad in (False, True):  # inference (cpp on CPU) and training (torch backend, its backward)
        with torch.set_grad_enabled(grad):
            explained = torch._dynamo.explain(mod)(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------- bad input
def test_int4_weight_fields_that_disagree_are_named():
    import dataclasses

    w = quantized(8, 64, 32)
    x = torch.randn(2, 64)
    bad = {
        "group_size 0": (dict(group_size=0), ValueError, "group_size must be a positive multiple of 8"),
        "group_size -32": (dict(group_size=-32), ValueError, "group_size must be a positive multiple of 8"),
        "group_size not dividing K": (dict(group_size=48), ValueError, "must divide the input dim K=64"),
        "group_size float": (dict(group_size=32.0), TypeError, "group_size must be an int"),
        "group_size of other scales": (dict(group_size=16), ValueError,
                                       r"w.scales must be \[N, K/group_size\] = \[8, 4\]"),
        "scales rows": (dict(scales=w.scales[:7]), ValueError, r"w.scales must be \[N, K/group_size\]"),
        "zeros shape": (dict(zeros=w.zeros[:, :1]), ValueError, r"w.zeros must be \[N, K/group_size\]"),
        "zeros dtype": (dict(zeros=w.zeros.int()), TypeError, "w.zeros must have dtype"),
        "scales dtype": (dict(scales=w.scales.double()), TypeError, "w.scales must have dtype"),
        "qweight dtype": (dict(qweight=w.qweight.float()), TypeError, "w.qweight must have dtype"),
        "qweight rank": (dict(qweight=w.qweight[None]), ValueError, "w.qweight must be 2-D"),
        "input_scale shape": (dict(input_scale=torch.ones(32)), ValueError, r"w.input_scale must be \[K=64\]"),
    }
    for case, (fields, error, message) in bad.items():
        for backend in ("auto", "cpp", "torch"):
            with pytest.raises(error, match=message):
                dsattn.int4_matmul(x, dataclasses.replace(w, **fields), backend=backend)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="w.zeros is on"):
            dsattn.int4_matmul(x, dataclasses.replace(w, zeros=w.zeros.cuda()))


def test_compiled_kernels_refuse_group_size_0_without_crashing():
    """Called directly (past the entry's checks), the C++ kernel raises on group_size 0: never k % 0."""
    requires_backend("cpp", "cpu", "int4_matmul")
    w = quantized(8, 64, 32)
    with pytest.raises(RuntimeError, match="group_size must be a multiple of 8"):
        torch.ops.dsattn_C.int4_matmul(torch.randn(2, 64), w.qweight, w.scales, w.zeros, 0, None)


# ----------------------------------------------------------------------------------------- compiled CPU, per ISA
def _cpu_paths():
    """(DSATTN_CPU_ISA, DSATTN_INT4_VNNI) for every int4 CPU path this machine has: avx512 with the VNNI digit
    kernel where the CPU has VNNI (the default there), avx512's exact table kernel, avx2, portable; [] without
    the compiled kernel."""
    from dsattn._backend import unusable_reason

    if unusable_reason("cpp", torch.device("cpu"), "int4_matmul"):
        return []
    found = []
    for isa in reversed(_ext.cpu_isas()):
        name = _ext.CPU_ISA_NAMES[isa]
        found += [(name, "1"), (name, "0")] if name == "avx512" else [(name, "1")]
    return found


CPU_PATHS = _cpu_paths()


def _path_id(path):
    return path[0] + ("" if path[1] == "1" else "-novnni")
# Norm-wise bound for fp32 x: exact paths ~1e-7; the VNNI kernel's three int8 digits leave |x - x~| <= 2^-15 sx
# (2.4e-7 of a 128-block's largest |x|), a few 1e-7 of the output: the fp32 tolerance holds for every path.
# bf16 x: two digits (<= 3.1e-5 of the block max) under bf16's own rounding of x and out: bf16 tolerance.


@pytest.mark.parametrize("path", CPU_PATHS or [("portable", "1")], ids=_path_id)
@pytest.mark.parametrize("group_size,k", [(32, 384), (64, 640), (128, 384), (256, 512), (32, 96), (96, 288)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_compiled_cpu_every_isa_path(monkeypatch, path, group_size, k, symmetric):
    """Every ISA path (K % 128 != 0 or group 96: AVX-512's exact kernel even with VNNI), M 1/3/16/17 (decode
    tiles and their tails) and 64 (GEMM panels), N = 37 (a partial 4-row tile), fp32 and bf16 x, bias and
    none, non-contiguous x through the API, against the float64 oracle."""
    requires_backend("cpp", "cpu", "int4_matmul")
    monkeypatch.setenv("DSATTN_CPU_ISA", path[0])
    monkeypatch.setenv("DSATTN_INT4_VNNI", path[1])
    n = 37
    w = quantized(n, k, group_size, symmetric)
    bias = torch.randn(n)
    for m in (1, 3, 16, 17, 64):
        x = torch.randn(m, k)
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            out = torch.ops.dsattn_C.int4_matmul(xd, w.qweight, w.scales.float(), w.zeros, group_size, bias)
            assert out.dtype == dtype and out.shape == (m, n)
            assert_close(out, expected(xd, w, bias), tolerance(dtype), name=f"M={m} {dtype}")
        got = torch.ops.dsattn_C.int4_matmul(x, w.qweight, w.scales.float(), w.zeros, group_size, None)
        assert_close(got, expected(x, w), tolerance(torch.float32), name=f"M={m} no bias")
    xn = non_contiguous(torch.randn(2, 3, k))
    assert_close(dsattn.int4_matmul(xn, w, bias, backend="cpp"), expected(xn, w, bias), tolerance(torch.float32))


@pytest.mark.parametrize("path", CPU_PATHS or [("portable", "1")], ids=_path_id)
def test_compiled_cpu_outliers_zero_rows_and_nan(monkeypatch, path):
    """Activations with outliers (a 1e4 spike per 128-block next to values of 1e-3) keep the fp32 bound; an
    all-zero block contributes zero; a NaN in x reaches its output row only."""
    requires_backend("cpp", "cpu", "int4_matmul")
    monkeypatch.setenv("DSATTN_CPU_ISA", path[0])
    monkeypatch.setenv("DSATTN_INT4_VNNI", path[1])
    k, n = 512, 21
    w = quantized(n, k, 128)
    x = torch.randn(4, k) * 1e-3
    x[0, ::128] = 1e4
    x[1, 128:256] = 0
    x[2] = 0
    got = torch.ops.dsattn_C.int4_matmul(x, w.qweight, w.scales.float(), w.zeros, 128, None)
    assert_close(got, expected(x, w), tolerance(torch.float32))
    assert torch.equal(got[2], torch.zeros(n))
    x[3, 5] = float("nan")
    got = torch.ops.dsattn_C.int4_matmul(x, w.qweight, w.scales.float(), w.zeros, 128, None)
    assert got[3].isnan().all() and not got[:3].isnan().any()


def test_compiled_cpu_vnni_is_the_default_where_the_cpu_has_it(monkeypatch):
    """On a VNNI CPU the default (M < 4) differs from the exact table kernel by the digits' rounding and the
    zero-point term's order only: within 5e-6, not bit-equal (so the VNNI kernel did run)."""
    requires_backend("cpp", "cpu", "int4_matmul")
    if ("avx512", "0") not in CPU_PATHS:
        pytest.skip("no AVX-512 on this CPU")
    w = quantized(64, 1024, 128)
    x = torch.randn(2, 1024)
    default = torch.ops.dsattn_C.int4_matmul(x, w.qweight, w.scales.float(), w.zeros, 128, None)
    monkeypatch.setenv("DSATTN_INT4_VNNI", "0")
    exact = torch.ops.dsattn_C.int4_matmul(x, w.qweight, w.scales.float(), w.zeros, 128, None)
    assert_close(default, exact, 5e-6)
    try:
        with open("/proc/cpuinfo") as f:
            vnni = "avx512_vnni" in f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to tell whether the CPU has VNNI")
    assert torch.equal(default, exact) != vnni


# ----------------------------------------------------------------------------------------- compiled CPU, AMX
def _cpu_has_amx():
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def _op(x, w, bias):
    return torch.ops.dsattn_C.int4_matmul(x, w.qweight, w.scales.float(), w.zeros, w.group_size, bias)


@pytest.mark.parametrize("group_size,k", [(64, 320), (128, 384), (32, 96)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_compiled_cpu_amx_bf16_prefill(monkeypatch, group_size, k, symmetric):
    """bf16 x from 16 rows on an AMX CPU: the dequantization fused into oneDNN's brgemm (fp32 accumulation, the
    bias added in fp32, one rounding); DSATTN_INT4_AMX=0 (and CPUs without AMX) the panel path. Both against
    the float64 oracle: M 16/17/64/100 and 300 (two passes of 256 rows), N 37 and 301 (partial tasks and
    sub-blocks), bias and none, non-contiguous x through the API. On AMX the two paths differ (the fused one ran)."""
    requires_backend("cpp", "cpu", "int4_matmul")
    monkeypatch.delenv("DSATTN_CPU_ISA", raising=False)
    results = {}
    for amx in ("1", "0"):
        monkeypatch.setenv("DSATTN_INT4_AMX", amx)
        torch.manual_seed(0)
        for n in (37, 301):
            w = quantized(n, k, group_size, symmetric)
            bias = torch.randn(n)
            for m in (16, 17, 64, 100, 300):
                x = torch.randn(m, k).to(torch.bfloat16)
                out = _op(x, w, bias)
                assert out.dtype == torch.bfloat16 and out.shape == (m, n) and out.is_contiguous()
                assert_close(out, expected(x, w, bias), tolerance(torch.bfloat16), name=f"M={m} N={n} amx={amx}")
                results[amx, n, m] = out
            assert_close(_op(x, w, None), expected(x, w), tolerance(torch.bfloat16), name=f"N={n} no bias")
        xn = non_contiguous(torch.randn(2, 20, k)).to(torch.bfloat16)
        assert_close(dsattn.int4_matmul(xn, w, bias, backend="cpp"), expected(xn, w, bias), tolerance(torch.bfloat16))
    differs = any(not torch.equal(results["1", key[1], key[2]], v) for key, v in results.items() if key[0] == "0")
    assert differs == (_cpu_has_amx() and ("avx512", "1") in CPU_PATHS)


def test_compiled_cpu_amx_nan_reaches_only_its_row(monkeypatch):
    """bf16 x, 20 rows: a NaN in row 3 (and an Inf in row 11) makes those output rows non-finite and no other
    (a row of x is one column of the brgemm's B); all-zero rows give the bias rounded once."""
    requires_backend("cpp", "cpu", "int4_matmul")
    w = quantized(45, 256, 128)
    bias = torch.randn(45)
    x = torch.randn(20, 256).to(torch.bfloat16)
    x[3, 7] = float("nan")
    x[11, 200] = float("inf")
    x[5] = 0
    got = _op(x, w, bias)
    assert got[3].isnan().all() and not got[11].isfinite().any()
    rest = [r for r in range(20) if r not in (3, 11)]
    assert got[rest].isfinite().all()
    assert_close(got[rest], expected(x[rest], w, bias), tolerance(torch.bfloat16))
    assert torch.equal(got[5], bias.to(torch.bfloat16))
