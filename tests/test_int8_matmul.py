"""int8 weights: quantize_int8 / Int8Weight, int8_matmul on the torch and Triton (interpreter) backends against
x @ dequantize().T in float64, its gradients, Int8Linear and patch(quantize="int8")."""

import dataclasses
import inspect

import pytest
import torch

import dsattn
from dsattn import _backend, _ext
from dsattn.reference.int8_matmul import int8_matmul as oracle
from dsattn.testing import assert_close, assert_grads_match, non_contiguous, poisoned, tolerance
from dsattn.torch_backend import int8_matmul as torch_backend


def expected(x, w, bias=None):
    out = x.double() @ w.dequantize(torch.float64).T
    return out + bias.double() if bias is not None else out


def quantized(n, k, group_size=None, dtype=torch.float32):
    return dsattn.quantize_int8((torch.randn(n, k) * 0.5).to(dtype), group_size=group_size)


def _oracle(w):
    return lambda x, bias: oracle(x, w.qweight, w.scales, w.group_size, bias)


# ----------------------------------------------------------------------------------------- format
def test_spec_signatures():
    """SPEC's public API (tests outside this repo call these names)."""
    from test_api import _plain

    assert _plain(inspect.signature(dsattn.quantize_int8)) == "(weight, *, group_size=None)"
    assert _plain(inspect.signature(dsattn.int8_matmul)) == "(x, w, bias=None, *, backend='auto')"
    assert _plain(inspect.signature(dsattn.nn.Int8Linear.from_linear)) == "(linear, group_size=None)"
    assert issubclass(dsattn.nn.Int8Linear, torch.nn.Module) and callable(dsattn.Int8Weight.dequantize)
    assert {"int8_matmul", "quantize_int8", "Int8Weight"} <= set(dsattn.__all__)
    assert "int8" in dsattn.registry.quantizers()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [None, 16, 64])
def test_round_trip_within_half_a_step(dtype, group_size):
    weight = torch.randn(37, 128).to(dtype) * 3
    weight[5] = 0  # an all-zero row: a finite scale, zero codes
    w = dsattn.quantize_int8(weight, group_size=group_size)
    assert w.qweight.dtype == torch.int8 and w.qweight.shape == (37, 128)
    assert w.scales.dtype == (torch.float32 if dtype == torch.float32 else dtype)
    assert w.scales.shape == ((37,) if group_size is None else (37, 128 // group_size))
    # the largest element gets code 127 (bf16 scales, rounded up by up to 2^-7: 126 or 127)
    assert int(w.qweight.abs().max()) >= (126 if dtype == torch.bfloat16 else 127) and int(w.qweight.min()) >= -127
    assert torch.isfinite(w.scales).all() and not w.qweight[5].any()
    step = w.scales.double()[:, None] if group_size is None else w.scales.double().repeat_interleave(group_size, 1)
    err = (weight.double() - w.dequantize(torch.float64)).abs()
    assert (err <= step * (0.5 + 1e-5)).all(), (err / step).max()
    assert w.dequantize().dtype == w.scales.dtype


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(bad):
    weight = torch.randn(8, 32)
    weight[3, 7] = bad
    with pytest.raises(ValueError, match="weight has NaN or Inf"):
        dsattn.quantize_int8(weight)
    with pytest.raises(ValueError, match="weight has NaN or Inf"):
        dsattn.quantize_int8(weight, group_size=16)


def test_bad_group_sizes_and_weights():
    weight = torch.randn(8, 64)
    for group_size, error, message in [(0, ValueError, "group_size must be >= 1"), (-16, ValueError, ">= 1"),
                                       (48, ValueError, "must divide the input dim K=64"),
                                       (32.0, TypeError, "group_size must be an int or None"),
                                       (True, TypeError, "group_size must be an int or None")]:
        with pytest.raises(error, match=message):
            dsattn.quantize_int8(weight, group_size=group_size)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        dsattn.quantize_int8(weight[0])
    with pytest.raises(TypeError, match="weight must be floating point"):
        dsattn.quantize_int8(weight.int())


def test_int8_weight_fields_that_disagree_are_named():
    per_channel, grouped = quantized(8, 64), quantized(8, 64, 32)
    x = torch.randn(2, 64)
    bad = [
        (per_channel, dict(qweight=per_channel.qweight.int()), TypeError, "w.qweight must have dtype"),
        (per_channel, dict(qweight=per_channel.qweight[0]), ValueError, "w.qweight must be 2-D"),
        (per_channel, dict(scales=per_channel.scales.double()), TypeError, "w.scales must have dtype"),
        (per_channel, dict(scales=per_channel.scales[:7]), ValueError, r"w.scales must be \[N\] = \[8\]"),
        (per_channel, dict(scales=grouped.scales), ValueError, r"w.scales must be \[N\] = \[8\]"),
        (grouped, dict(group_size=None), ValueError, r"w.scales must be \[N\] = \[8\]"),
        (grouped, dict(group_size=16), ValueError, r"w.scales must be \[N, K/group_size\] = \[8, 4\]"),
        (grouped, dict(group_size=48), ValueError, "must divide the input dim K=64"),
        (grouped, dict(group_size=0), ValueError, "group_size must be >= 1"),
        (grouped, dict(group_size="32"), TypeError, "group_size must be an int"),
        (grouped, dict(scales=grouped.scales[:, :1]), ValueError, r"w.scales must be \[N, K/group_size\]"),
    ]
    for w, fields, error, message in bad:
        broken = dataclasses.replace(w, **fields)
        for backend in ("auto", "torch", "triton"):
            with pytest.raises(error, match=message):
                dsattn.int8_matmul(x, broken, backend=backend)
        with pytest.raises(error, match=message):
            broken.dequantize()
    with pytest.raises(TypeError, match="w must be a dsattn.Int8Weight"):
        dsattn.int8_matmul(x, quantized(8, 64).qweight)
    with pytest.raises(ValueError, match="x's last dim must be K=64"):
        dsattn.int8_matmul(torch.randn(2, 32), per_channel)
    with pytest.raises(ValueError, match="bias must have N=8"):
        dsattn.int8_matmul(x, per_channel, torch.randn(9))


# ----------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n,k", [(48, 64), (96, 128)])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_backends_equal_dequantized_matmul(triton_device, m, n, k, group_size, dtype):
    from dsattn.triton_kernels import int8_matmul as tk

    w = quantized(n, k, group_size).to(triton_device)
    x = torch.randn(m, k, device=triton_device).to(dtype)
    bias = torch.randn(n, device=triton_device)
    out = poisoned((m, n), dtype, triton_device)  # every element must be written
    tk.int8_matmul(x, w.qweight, w.scales, group_size, bias, out=out)
    assert_close(out, expected(x, w, bias), tolerance(dtype), name="triton")
    if triton_device == "cpu":
        got = torch_backend.int8_matmul(x, w.qweight, w.scales, group_size, bias)
        assert got.dtype == dtype
        assert_close(got, expected(x, w, bias), tolerance(dtype), name="torch")


@pytest.mark.parametrize("k", [48, 50])  # 48: a 16-wide K tile divides it; 50: the masked last K tile
def test_triton_per_channel_any_k(triton_device, k):
    w = quantized(37, k).to(triton_device)
    x = torch.randn(5, k, device=triton_device)
    assert_close(dsattn.int8_matmul(x, w, backend="triton"), expected(x, w), tolerance(torch.float32))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("group_size", [None, 16])
def test_api_leading_dims_noncontiguous_bias(triton_device, backend, group_size):
    dev = triton_device if backend == "triton" else "cpu"
    w = quantized(24, 128, group_size, dtype=torch.float16).to(dev)
    x = non_contiguous(torch.randn(2, 3, 128, device=dev))
    assert not x.is_contiguous()
    bias = torch.randn(24, device=dev, dtype=torch.bfloat16)
    got = dsattn.int8_matmul(x, w, bias, backend=backend)
    assert got.shape == (2, 3, 24) and got.dtype == torch.float32
    assert_close(got, expected(x, w, bias), tolerance(torch.float32))
    xb = x.to(torch.bfloat16)
    assert_close(dsattn.int8_matmul(xb, w, bias, backend=backend), expected(xb, w, bias), tolerance(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_per_channel_16_bit_uses_torch_int8_gemm(monkeypatch, dtype):
    """fp16/bf16 x with per-channel scales in x's dtype: torch._weight_int8pack_mm, equal to the chunks within
    the dtype's tolerance; fp32 x and grouped scales take the chunks."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        pytest.skip("this torch has no _weight_int8pack_mm")
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or real(*a))
    w = quantized(70, 96, dtype=dtype)
    x = torch.randn(2, 5, 96).to(dtype)
    bias = torch.randn(70, dtype=dtype)
    got = dsattn.int8_matmul(x, w, bias, backend="torch")
    assert calls and got.dtype == dtype and got.shape == (2, 5, 70)
    assert_close(got, expected(x, w, bias), tolerance(dtype))
    chunks = torch_backend.int8_matmul(x, w.qweight, w.scales, None, bias, rows_per_chunk=32)
    assert_close(got, chunks.double(), tolerance(dtype))
    calls.clear()
    dsattn.int8_matmul(x.float(), w)
    dsattn.int8_matmul(x, quantized(70, 96, 32, dtype=dtype))
    assert not calls


def test_torch_backend_row_chunks_equal_brute_force():
    n, k, g = 37, 96, 32
    for group_size in (None, g):
        w = quantized(n, k, group_size)
        x = torch.randn(2, 3, k, dtype=torch.float64)
        bias = torch.randn(n, dtype=torch.float64)
        scale = w.scales.double()[:, None] if group_size is None else w.scales.double().repeat_interleave(g, 1)
        brute = torch.einsum("abk,nk->abn", x, w.qweight.double() * scale) + bias
        assert_close(oracle(x, w.qweight, w.scales, group_size, bias), brute, 1e-12)
        got = torch_backend.int8_matmul(x, w.qweight, w.scales, group_size, bias, rows_per_chunk=16)
        assert_close(got, brute, 1e-12)


# ----------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("lead,n,k,group_size,dtype,transposed", [
    ((7,), 37, 96, None, torch.float32, False),
    ((2, 5), 19, 128, 64, torch.float32, True),
    ((3,), 24, 64, None, torch.bfloat16, True),
    ((3,), 24, 64, 16, torch.bfloat16, False),
])
def test_gradients_match_float64_autograd_of_the_oracle(lead, n, k, group_size, dtype, transposed):
    w = quantized(n, k, group_size)
    x = torch.randn(*lead, k).to(dtype)
    x = (non_contiguous(x) if transposed else x).requires_grad_(True)
    bias = torch.randn(n, dtype=dtype, requires_grad=True)
    assert_grads_match(lambda x, b: dsattn.int8_matmul(x, w, b), _oracle(w), [x, bias], tolerance(dtype),
                       name="int8_matmul")


def test_gradient_of_x_only_bias_only_and_row_chunks(monkeypatch):
    monkeypatch.setattr(torch_backend, "ROWS_PER_CHUNK", 8)
    for group_size in (None, 32):
        w = quantized(21, 64, group_size)
        x = torch.randn(4, 64, requires_grad=True)
        bias = torch.randn(21)
        assert_grads_match(lambda x, b: dsattn.int8_matmul(x, w, b), _oracle(w), [x, bias], name="dx")
        x, bias = x.detach(), bias.requires_grad_(True)
        assert_grads_match(lambda x, b: dsattn.int8_matmul(x, w, b), _oracle(w), [x, bias], name="dbias")


def test_gradcheck_float64():
    for group_size in (None, 16):
        w = quantized(11, 32, group_size)
        x = torch.randn(2, 3, 32, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, b: dsattn.int8_matmul(x, w, b), (x, bias))


def test_no_silent_detach_and_frozen_scales(triton_device):
    w = quantized(16, 64).to(triton_device)
    x = torch.randn(3, 64, device=triton_device, requires_grad=True)
    assert dsattn.int8_matmul(x, w).grad_fn is not None
    with pytest.raises(ValueError, match="int8_matmul: backend='triton' has no backward"):
        dsattn.int8_matmul(x, w, backend="triton")
    with torch.no_grad():
        assert_close(dsattn.int8_matmul(x, w, backend="triton"), expected(x, w), tolerance(torch.float32))
    w.scales.requires_grad_(True)
    with pytest.raises(ValueError, match="w.scales requires grad, but the int8 weight is frozen"):
        dsattn.int8_matmul(x.detach(), w)


def test_triton_refuses_group_sizes_it_cannot_tile(triton_device):
    w = quantized(8, 48, 24).to(triton_device)
    x = torch.randn(2, 48, device=triton_device)
    with pytest.raises(ValueError, match="group_size % 16"):
        dsattn.int8_matmul(x, w, backend="triton")
    assert_close(dsattn.int8_matmul(x.cpu(), w.to("cpu")), expected(x, w), tolerance(torch.float32))


def test_tile_k_never_straddles_a_group():
    from dsattn.triton_kernels import int8_matmul as tk

    assert tk.tile_k(4096, None, 128) == (128, True) and tk.tile_k(48, None, 64) == (16, True)
    assert tk.tile_k(50, None, 64) == (64, False)
    for g in (16, 32, 48, 96, 128):
        bk, even = tk.tile_k(g * 3, g, 128)
        assert even and g % bk == 0 and bk >= 16


def test_opcheck():
    x, bias = torch.randn(2, 3, 64), torch.randn(24)
    for group_size in (None, 32):
        w = quantized(24, 64, group_size)
        torch.library.opcheck(torch.ops.dsattn.int8_matmul, (x.clone().requires_grad_(True), w.qweight, w.scales,
                                                            group_size, bias.clone().requires_grad_(True), "torch"))
        torch.library.opcheck(torch.ops.dsattn.int8_matmul, (x[0], w.qweight, w.scales, group_size, None, "torch"))
        if _backend.unusable_reason("triton", x.device) is None:
            torch.library.opcheck(torch.ops.dsattn.int8_matmul, (x, w.qweight, w.scales, group_size, bias, "triton"))


# ----------------------------------------------------------------------------------------- module, patch
@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_linear_from_linear_and_state_dict(group_size):
    lin = torch.nn.Linear(64, 24)
    mod = dsattn.nn.Int8Linear.from_linear(lin, group_size=group_size)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert_close(mod(x), lin(x), 1e-2)  # int8 quantization error
        assert_close(mod(x), expected(x, mod.int8_weight(), lin.bias), 1e-5)
    state = mod.state_dict()
    assert set(state) == {"qweight", "scales", "bias"} and state["qweight"].dtype == torch.int8
    fresh = dsattn.nn.Int8Linear(64, 24, group_size=group_size, dtype=torch.float32)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(x), mod(x))
    out = mod(x.requires_grad_(True))  # the bias is a Parameter: its gradient is wanted too
    out.sum().backward()
    assert_close(mod.bias.grad, torch.full((24,), 3.0))
    assert_close(x.grad, torch.ones(3, 24) @ mod.int8_weight().dequantize(torch.float32))
    with pytest.raises(ValueError, match="must divide the input dim K=64"):
        dsattn.nn.Int8Linear(64, 24, group_size=48)


def test_patch_int8_tiny_llama_logits_and_summary():
    from dsattn.models import tiny_model

    model = tiny_model("llama", layers=4)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
        dsattn.patch(model, quantize="int8")
        try:
            names = [n for n, m in model.named_modules() if isinstance(m, dsattn.nn.Int8Linear)]
            logits = model(ids).logits
            summary = dsattn.patch_summary(model)
        finally:
            dsattn.unpatch(model)
        assert torch.equal(model(ids).logits, ref)
    assert names and all(".layers.1." in n or ".layers.2." in n for n in names)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down in the two middle layers
    assert summary["quantize"] == "int8" and sorted(summary["quantized"]) == sorted(names)
    reasons = {s["module"]: s["reason"] for s in summary["skipped"]}
    assert "first or last" in reasons["model.layers.0.self_attn.q_proj"] and "skip pattern" in reasons["lm_head"]
    assert summary["weight_bytes_after"] < summary["weight_bytes_before"]
    assert_close(logits, ref, 1e-2, name="int8 logits")
    assert (logits - ref).abs().max() > 0


def test_patch_int8_options():
    from dsattn.models import tiny_model

    model = tiny_model("llama", layers=4)
    dsattn.patch(model, quantize="int8", group_size=32, keep_first_last=False, skip=("*lm_head*", "*mlp*"))
    try:
        mods = {n: m for n, m in model.named_modules() if isinstance(m, dsattn.nn.Int8Linear)}
        assert len(mods) == 4 * 4 and all(m.group_size == 32 for m in mods.values())
    finally:
        dsattn.unpatch(model)
    with pytest.raises(TypeError, match="symmetric"):
        dsattn.patch(model, quantize="int8", symmetric=True)
    with pytest.raises(ValueError, match="would change nothing.*does not divide"):
        dsattn.patch(model, quantize="int8", group_size=48, keep_first_last=False)
    assert dsattn.patch_summary(model) is None


def test_compiles_fullgraph_and_equals_eager():
    from dsattn.testing import assert_compiles

    for group_size in (None, 32):
        w = quantized(24, 64, group_size)
        x = non_contiguous(torch.randn(2, 5, 64)).requires_grad_(True)
        bias = torch.randn(24, requires_grad=True)
        assert_compiles(lambda x, b: dsattn.int8_matmul(x, w, b), [x, bias], backends=("aot_eager",),
                        name="int8_matmul")
    mod = dsattn.nn.Int8Linear.from_linear(torch.nn.Linear(64, 24)).eval()
    with torch.no_grad():
        explained = torch._dynamo.explain(mod)(torch.randn(3, 64, dtype=torch.float32))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------ cpp (CPU kernel)
def _cpp_isas():
    """The ISA paths (0 portable, 1 avx2, 2 avx512) this CPU and build run; [] without the compiled kernel."""
    if _backend.unusable_reason("cpp", torch.device("cpu"), "int8_matmul"):
        return []
    return _ext.cpu_isas()


CPP_ISAS = _cpp_isas()
needs_cpp = pytest.mark.skipif(not CPP_ISAS, reason="dsattn._C has no int8_matmul kernel")
ISA_IDS = {0: "portable", 1: "avx2", 2: "avx512"}


# group 32: the vector path (a whole number of vectors per group); 5: the scalar path; None: per channel with a
# K % 16 tail (K = 165). M = 65 runs the dequantized-panel GEMM.
@needs_cpp
@pytest.mark.parametrize("isa", CPP_ISAS or [0], ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("group_size,k", [(None, 165), (32, 160), (5, 165)])
@pytest.mark.parametrize("m", [1, 3, 16, 65])
def test_cpp_kernel_every_isa_equals_dequantized_matmul(isa, group_size, k, m):
    """Exact int8 x fp32 products, fp32 accumulation: fp32 tolerance against float64 (x is not quantized)."""
    n = 37  # 9 tiles of 4 weight rows and a 1-row remainder
    w = quantized(n, k, group_size)
    bias = torch.randn(n)
    x = non_contiguous(torch.randn(m, k))
    got = torch.ops.dsattn_C.int8_matmul(x, w.qweight, w.scales.float(), group_size, bias, isa)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert_close(got, expected(x, w, bias), tolerance(torch.float32))
    assert_close(torch.ops.dsattn_C.int8_matmul(x, w.qweight, w.scales.float(), group_size, None, isa),
                 expected(x, w), tolerance(torch.float32))
    xb = torch.randn(m, k).to(torch.bfloat16)
    got = torch.ops.dsattn_C.int8_matmul(xb, w.qweight, w.scales.float(), group_size, bias, isa)
    assert got.dtype == torch.bfloat16
    assert_close(got, expected(xb, w, bias), tolerance(torch.bfloat16))


@needs_cpp
@pytest.mark.parametrize("group_size,k", [(None, 165), (32, 160)])
@pytest.mark.parametrize("m", [16, 65])
def test_cpp_avx512_fused_panels_equal_the_aten_dequant(monkeypatch, group_size, k, m):
    """AVX-512 dequantizes the GEMM panels (M >= 64) in one fused pass: the same weight values and bf16 rounding
    as the ATen path (AVX2), so one panel gives bit-equal GEMM results; M=16 bf16 stays on the decode kernels
    (AMX's fused brgemm off: its own test below)."""
    if 2 not in CPP_ISAS or 1 not in CPP_ISAS:
        pytest.skip("needs AVX-512 and AVX2")
    monkeypatch.setenv("DSATTN_INT8_AMX", "0")
    w = quantized(37, k, group_size)
    bias = torch.randn(37)
    for dtype in (torch.float32, torch.bfloat16) if m >= 64 else (torch.bfloat16,):
        x = torch.randn(m, k).to(dtype)
        fused = torch.ops.dsattn_C.int8_matmul(x, w.qweight, w.scales.float(), group_size, bias, 2)
        assert_close(fused, expected(x, w, bias), tolerance(dtype))
        if m >= 64:
            aten = torch.ops.dsattn_C.int8_matmul(x, w.qweight, w.scales.float(), group_size, bias, 1)
            assert torch.equal(fused, aten)


@needs_cpp
def test_cpp_every_output_written_and_isa_errors(monkeypatch):
    """Output buffers come from the allocator: fill freed memory with NaN first, so an element the kernel
    skipped shows as NaN; an ISA the CPU lacks, or a bad env value, is an error, not a silent fallback."""
    w = quantized(21, 64)
    x = torch.randn(5, 64)
    for isa in CPP_ISAS:
        for _ in range(3):
            del_me = poisoned((5, 21), torch.float32, "cpu")
            del del_me
            got = torch.ops.dsattn_C.int8_matmul(x, w.qweight, w.scales.float(), None, None, isa)
            assert torch.isfinite(got).all()
            assert_close(got, expected(x, w), tolerance(torch.float32))
    with pytest.raises(RuntimeError, match="isa must be"):
        torch.ops.dsattn_C.int8_matmul(x, w.qweight, w.scales.float(), None, None, 3)
    monkeypatch.setenv("DSATTN_CPU_ISA", "portable")
    assert_close(torch.ops.dsattn_C.int8_matmul(x, w.qweight, w.scales.float(), None, None),
                 expected(x, w), tolerance(torch.float32))
    monkeypatch.setenv("DSATTN_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="DSATTN_CPU_ISA"):
        torch.ops.dsattn_C.int8_matmul(x, w.qweight, w.scales.float(), None, None)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_api_auto_picks_it_without_gradient(dtype):
    """auto on the CPU runs cpp (leading dims, non-contiguous x, bias); with a gradient wanted, torch."""
    w = quantized(19, 48, 16, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    x = non_contiguous(torch.randn(2, 3, 48)).to(dtype)
    bias = torch.randn(19, dtype=dtype)
    with _backend.recording() as chosen:
        got = dsattn.int8_matmul(x, w, bias)
    assert chosen["int8_matmul"] == {"cpp"} and got.dtype == dtype and got.shape == (2, 3, 19)
    assert_close(got, expected(x, w, bias), tolerance(dtype))
    xg = x.detach().float().requires_grad_()
    with _backend.recording() as chosen:
        dsattn.int8_matmul(xg, w)
    assert chosen["int8_matmul"] == {"torch"}
    with pytest.raises(ValueError, match="backend='cpp' has no backward"):
        dsattn.int8_matmul(xg, w, backend="cpp")


@needs_cpp
def test_recording_sees_the_entry_fast_path(monkeypatch):
    """Without a gradient the entry calls its kernel without the custom op: recording() still sees the backend
    that ran (tests tell the backend by recording(), not by replacing the op)."""
    from dsattn.ops import int8_matmul as ops

    fast = []
    kernel = ops._int8_matmul  # the op holds its own reference: this spy sees only the entry's direct calls
    monkeypatch.setattr(ops, "_int8_matmul", lambda *args: fast.append(args[-1]) or kernel(*args))
    w = quantized(24, 64)
    x = torch.randn(2, 64)
    with _backend.recording() as chosen:
        got = dsattn.int8_matmul(x, w)
    assert fast == ["cpp"] and chosen == {"int8_matmul": {"cpp"}}
    assert_close(got, expected(x, w), tolerance(torch.float32))


# ------------------------------------------------------------------- cpp AVX512-VNNI decode (x as int8 digits)
def _cpu_has_vnni():
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_vnni" in f.read()
    except OSError:
        return False


needs_vnni = pytest.mark.skipif(not CPP_ISAS or 2 not in CPP_ISAS or not _cpu_has_vnni(),
                                reason="needs the compiled kernel on an AVX-512 CPU with VNNI")


def _cpp(x, w, bias, isa=2):
    return torch.ops.dsattn_C.int8_matmul(x, w.qweight, w.scales.float(), w.group_size, bias, isa)


# K 384 / 256: whole 128-value blocks (VNNI); K 200: the widening kernels. N 37: 9 tiles of 4 rows + 1.
@needs_vnni
@pytest.mark.parametrize("group_size,k", [(None, 384), (128, 384), (256, 256), (None, 200)])
@pytest.mark.parametrize("m", [1, 3])
def test_cpp_vnni_decode_equals_dequantized_matmul(monkeypatch, group_size, k, m):
    """fp32 x as three int8 digits per 128 values (|x - x~| <= 2.4e-7 of the block max): fp32 tolerance; bf16 x
    as two: bf16 tolerance. Activation outliers (one value 1000x its block) stay within fp32 tolerance. The
    default differs from DSATTN_INT8_VNNI=0 (the widening kernels) where K % 128 == 0, so the VNNI path ran."""
    n = 37
    w = quantized(n, k, group_size)
    bias = torch.randn(n)
    x = non_contiguous(torch.randn(m, k))
    x[:, 5] *= 1000.0
    got = _cpp(x, w, bias)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert_close(got, expected(x, w, bias), tolerance(torch.float32))
    assert_close(_cpp(x, w, None), expected(x, w), tolerance(torch.float32))
    xb = torch.randn(m, k).to(torch.bfloat16)
    gotb = _cpp(xb, w, bias)
    assert gotb.dtype == torch.bfloat16
    assert_close(gotb, expected(xb, w, bias), tolerance(torch.bfloat16))
    monkeypatch.setenv("DSATTN_INT8_VNNI", "0")
    widened = _cpp(x, w, bias)
    assert_close(widened, expected(x, w, bias), tolerance(torch.float32))
    assert torch.equal(got, widened) == (k % 128 != 0)


@needs_vnni
def test_cpp_vnni_nan_reaches_only_its_row_and_env_isa():
    """A NaN in x makes its row's outputs NaN and no other; zero rows give the bias; DSATTN_CPU_ISA=avx2 still
    reaches the widening AVX2 kernel (bit-equal to isa=1) with VNNI on."""
    w = quantized(21, 256, 128)
    bias = torch.randn(21)
    x = torch.randn(3, 256)
    x[1, 77] = float("nan")
    x[2] = 0.0
    got = _cpp(x, w, bias)
    assert torch.isnan(got[1]).all() and torch.isfinite(got[[0, 2]]).all()
    assert_close(got[0], expected(x[:1], w, bias)[0], tolerance(torch.float32))
    assert torch.equal(got[2], bias)
    import subprocess
    import sys

    code = ("import torch, dsattn, dsattn._C\nw = dsattn.quantize_int8(torch.randn(21, 256), group_size=128)\n"
            "x = torch.randn(2, 256)\nop = torch.ops.dsattn_C.int8_matmul\n"
            "a = op(x, w.qweight, w.scales.float(), 128, None, -1)\nb = op(x, w.qweight, w.scales.float(), 128, None, 1)\n"
            "print(torch.equal(a, b))")
    if 1 in CPP_ISAS:
        env = {**__import__("os").environ, "DSATTN_CPU_ISA": "avx2"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip().endswith("True"), out.stderr[-2000:]


# ------------------------------------------------------------------- cpp AMX prefill (bf16 x, fused brgemm)
def _cpu_has_amx():
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


@needs_cpp
@pytest.mark.parametrize("group_size,k", [(None, 320), (64, 320), (128, 384), (16, 96)])
def test_cpp_amx_bf16_prefill(monkeypatch, group_size, k):
    """bf16 x from 16 rows on an AMX CPU: q * s fused into oneDNN's brgemm (fp32 accumulation, the bias added in
    fp32, one rounding); DSATTN_INT8_AMX=0 (and CPUs without AMX) the decode kernels / panels. Both against the
    float64 oracle: M 16/17/64/100/300, N 37 and 301, bias and none, non-contiguous x; on AMX they differ."""
    results = {}
    for amx in ("1", "0"):
        monkeypatch.setenv("DSATTN_INT8_AMX", amx)
        torch.manual_seed(0)
        for n in (37, 301):
            w = quantized(n, k, group_size)
            bias = torch.randn(n)
            for m in (16, 17, 64, 100, 300):
                x = non_contiguous(torch.randn(m, k)).to(torch.bfloat16) if m == 17 else \
                    torch.randn(m, k).to(torch.bfloat16)
                out = _cpp(x, w, bias, -1)
                assert out.dtype == torch.bfloat16 and out.shape == (m, n)
                assert_close(out, expected(x, w, bias), tolerance(torch.bfloat16), name=f"M={m} N={n} amx={amx}")
                results[amx, n, m] = out
            assert_close(_cpp(x, w, None, -1), expected(x, w), tolerance(torch.bfloat16), name=f"N={n} no bias")
    differs = any(not torch.equal(results["1", key[1], key[2]], v) for key, v in results.items() if key[0] == "0")
    assert differs == (_cpu_has_amx() and 2 in CPP_ISAS)


@needs_cpp
def test_cpp_amx_nan_reaches_only_its_row():
    """bf16 x, 20 rows: a NaN in row 3 makes that output row NaN and no other; a zero row gives the bias."""
    w = quantized(45, 256, 128)
    bias = torch.randn(45)
    x = torch.randn(20, 256).to(torch.bfloat16)
    x[3, 7] = float("nan")
    x[5] = 0
    got = _cpp(x, w, bias, -1)
    assert got[3].isnan().all()
    rest = [r for r in range(20) if r != 3]
    assert got[rest].isfinite().all()
    assert_close(got[rest], expected(x[rest], w, bias), tolerance(torch.bfloat16))
    assert torch.equal(got[5], bias.to(torch.bfloat16))
