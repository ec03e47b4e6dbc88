"""Backend selection from the declared capabilities: explicit requests, env override, limits, gradients."""

import pytest
import torch

import dsattn
from dsattn import _backend, capabilities

CPU = torch.device("cpu")
FP32 = capabilities.Request(dtype=torch.float32)


def test_auto_on_cpu_picks_cpp_when_built_else_torch():
    chosen = _backend.select_backend("int4_matmul", "auto", CPU, FP32)
    expected = "cpp" if _backend.unusable_reason("cpp", CPU) is None else "torch"
    assert chosen == expected


def test_auto_never_picks_the_interpreter():
    chosen = _backend.select_backend("sliding_window_attention", "auto", CPU, FP32)
    assert chosen == ("cpp" if _backend.unusable_reason("cpp", CPU) is None else "torch")


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.select_backend("sliding_window_attention", "fast", CPU, FP32)


def test_backend_the_op_lacks_is_an_error():
    with pytest.raises(ValueError, match=r"backend='cuda' is not implemented for this op"):
        _backend.select_backend("sliding_window_attention", "cuda", CPU, FP32)


def test_cuda_backend_on_cpu_tensors_is_an_error():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _backend.select_backend("int4_matmul", "cuda", CPU, FP32)


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _backend.select_backend("sliding_window_attention", "triton", CPU, FP32)


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("DSATTN_BACKEND", "torch")
    assert _backend.select_backend("int4_matmul", "auto", CPU, FP32) == "torch"
    monkeypatch.setenv("DSATTN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="env DSATTN_BACKEND='cuda'"):
        _backend.select_backend("int4_matmul", "auto", CPU, FP32)
    monkeypatch.setenv("DSATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DSATTN_BACKEND must be one of"):
        _backend.select_backend("int4_matmul", "auto", CPU, FP32)


def test_auto_filters_by_the_declared_capabilities(monkeypatch):
    """float64, a backward, a group size: "auto" skips the backends that cannot take them (here on CPU, the
    cpp kernel), and an explicit request for one names the limit."""
    if _backend.unusable_reason("cpp", CPU) is not None:
        pytest.skip("the CPU extension is not built")
    for request in (capabilities.Request(dtype=torch.float64), capabilities.Request(dtype=torch.float32, grad=True)):
        assert _backend.select_backend("int4_matmul", "auto", CPU, request) == "torch"
    with pytest.raises(TypeError, match="int4_matmul: backend='cpp' takes float16, bfloat16, float32 inputs, got float64"):
        _backend.select_backend("int4_matmul", "cpp", CPU, capabilities.Request(dtype=torch.float64))
    with pytest.raises(ValueError, match="int4_matmul: backend='cpp' has no backward"):
        _backend.select_backend("int4_matmul", "cpp", CPU, capabilities.Request(dtype=torch.float32, grad=True))


def test_every_op_declares_a_torch_backend_that_takes_everything():
    for op, backends in capabilities.CAPABILITIES.items():
        assert "torch" in backends, op
        if op != "int4_unpack":
            assert backends["torch"].backward and torch.float64 in backends["torch"].dtypes, op


def test_needs_grad():
    x = torch.ones(2, requires_grad=True)
    assert _backend.needs_grad(None, x)
    with torch.no_grad():
        assert not _backend.needs_grad(x)
    assert not _backend.needs_grad(x.detach())


def _cpp_or_torch():
    return "cpp" if _backend.unusable_reason("cpp", CPU, "int4_matmul") is None else "torch"


def test_cached_selection_follows_every_input(monkeypatch):
    """select caches each answer keyed by what it reads: changing dtype, grad, backend=, the group size, the env
    (DSATTN_BACKEND, TRITON_INTERPRET) changes the answer, errors are raised every time, recording sees hits."""
    monkeypatch.delenv("DSATTN_BACKEND", raising=False)
    order = ("cpp", "torch")
    pick = lambda dtype=torch.float32, grad=False, backend="auto", **kw: _backend.select(  # noqa: E731
        "int4_matmul", backend, CPU, dtype, grad, auto_order=order, group_size=128, **kw)
    for _ in range(2):
        assert pick() == _cpp_or_torch()
        assert pick(torch.float64) == "torch"
        assert pick(grad=True) == "torch"
        assert pick(backend="torch") == "torch"
    monkeypatch.setenv("DSATTN_BACKEND", "torch")
    assert pick() == "torch"
    monkeypatch.setenv("DSATTN_BACKEND", "cuda")
    for _ in range(2):
        with pytest.raises(ValueError, match="env DSATTN_BACKEND='cuda' cannot run here"):
            pick()
    monkeypatch.delenv("DSATTN_BACKEND")
    assert pick() == _cpp_or_torch()
    with _backend.recording() as chosen:
        pick()
        pick(torch.float64)
    assert chosen == {"int4_matmul": {_cpp_or_torch(), "torch"}}
    if _backend.triton_installed():
        triton = lambda group_size: _backend.select("int4_matmul", "triton", CPU, torch.float32,  # noqa: E731
                                                    group_size=group_size)
        for interpret in ("1", "0", "1"):
            monkeypatch.setenv("TRITON_INTERPRET", interpret)
            if interpret == "1":
                assert triton(16) == "triton"
                with pytest.raises(ValueError, match="group_size % 16 == 0, got 8"):
                    triton(8)
            else:
                with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
                    triton(16)


def test_cached_selection_takes_a_request_and_refuses_bad_backends():
    assert _backend.select_backend("int4_matmul", "auto", CPU, FP32) == _backend.select(
        "int4_matmul", "auto", CPU, torch.float32)
    for bad in (["cpp"], None, "fast"):
        for _ in range(2):
            with pytest.raises(ValueError, match="backend must be one of"):
                _backend.select("int4_matmul", bad, CPU, torch.float32)


def test_entry_fast_path_matches_the_op_and_keeps_modes_and_gradients():
    """int4_matmul / int8_matmul without a gradient run their kernel without the custom op's dispatch; the
    answer equals the op's, a dispatch mode (what fake tensors, export and profilers use) still sees the op,
    and a gradient still goes through the op's autograd."""
    import dsattn
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    w4 = dsattn.quantize_int4(torch.randn(24, 64), group_size=32)
    w8 = dsattn.quantize_int8(torch.randn(24, 64))
    x, bias = torch.randn(2, 3, 64), torch.randn(24)
    for w, call, name in ((w4, dsattn.int4_matmul, "int4_matmul"), (w8, dsattn.int8_matmul, "int8_matmul")):
        with _backend.recording() as chosen:
            out = call(x, w, bias)
        backend = chosen[name].pop()
        op = getattr(torch.ops.dsattn, name)
        args = (w.qweight, w.scales, w.zeros, w.group_size, w.input_scale) if name == "int4_matmul" \
            else (w.qweight, w.scales, w.group_size)
        torch.testing.assert_close(out, op(x, *args, bias, backend), rtol=0, atol=0)
        with Seen() as seen:
            call(x, w, bias)
        assert f"dsattn.{name}.default" in seen.ops, seen.ops
        xg = x.clone().requires_grad_()
        with _backend.recording() as chosen:
            call(xg, w, bias).sum().backward()
        assert chosen == {name: {"torch"}}
        torch.testing.assert_close(xg.grad, w.dequantize(torch.float32).sum(0).expand_as(x), rtol=1e-5, atol=1e-5)


def test_weight_checks_fast_path_accepts_only_what_the_full_check_accepts():
    """check_int4_weight / check_int8_weight accept a well-formed weight in one expression; every malformed
    field still reaches the full check and its error."""
    import dataclasses

    import dsattn
    from dsattn.quant.int4 import check_int4_weight
    from dsattn.quant.int8 import check_int8_weight

    w4 = dsattn.quantize_int4(torch.randn(8, 64), group_size=32, act_scales=torch.rand(64) + 0.5)
    assert check_int4_weight("t", w4) == (8, 64)
    bad4 = {"qweight": w4.qweight.to(torch.int64), "scales": w4.scales.double(), "zeros": w4.zeros.int(),
            "group_size": True, "input_scale": w4.input_scale[:-1]}
    for field, value in bad4.items():
        with pytest.raises((TypeError, ValueError), match=f"dsattn.t: .*{field}"):
            check_int4_weight("t", dataclasses.replace(w4, **{field: value}))
    for group_size in (16, 24, 128):  # the fields disagree with it / it does not divide K / exceeds K
        with pytest.raises(ValueError, match="group_size|w.scales"):
            check_int4_weight("t", dataclasses.replace(w4, group_size=group_size))
    with pytest.raises(ValueError, match="w.zeros must be"):
        check_int4_weight("t", dataclasses.replace(w4, zeros=w4.zeros[:, :1]))
    with pytest.raises(ValueError, match="is on meta"):
        check_int4_weight("t", dataclasses.replace(w4, scales=w4.scales.to("meta")))
    w8 = dsattn.quantize_int8(torch.randn(8, 64))
    assert check_int8_weight("t", w8) == (8, 64)
    for field, value in {"qweight": w8.qweight.int(), "scales": w8.scales[:-1], "group_size": 32}.items():
        with pytest.raises((TypeError, ValueError), match=f"dsattn.t: .*{field}|w.scales"):
            check_int8_weight("t", dataclasses.replace(w8, **{field: value}))
    with pytest.raises(ValueError, match="is on meta"):
        check_int8_weight("t", dataclasses.replace(w8, scales=w8.scales.to("meta")))


def test_entry_fast_checks_accept_only_what_the_full_checks_accept():
    """int4_matmul / int8_matmul check a well-formed call in one expression; each malformed argument still gets
    the full checks' error (the fast path would otherwise run the kernel on it)."""
    import dataclasses

    import dsattn

    w4 = dsattn.quantize_int4(torch.randn(8, 64), group_size=32)
    w8 = dsattn.quantize_int8(torch.randn(8, 64))
    x = torch.randn(3, 64)
    for w, call in ((w4, dsattn.int4_matmul), (w8, dsattn.int8_matmul)):
        cases = {"x's last dim must be K=64": (x[:, :63], None), "bias must have N=8": (x, torch.randn(7)),
                 "bias must be 1-D": (x, torch.randn(8, 1)), "x must have dtype": (x.int(), None),
                 "bias must have dtype": (x, torch.ones(8, dtype=torch.int32)),
                 "x must be a torch.Tensor": (x.tolist(), None),
                 "qweight is on cpu but x is on meta": (x.to("meta"), None),
                 "bias is on meta": (x, torch.randn(8, device="meta"))}
        for message, (xi, bias) in cases.items():
            with pytest.raises((TypeError, ValueError), match=message):
                call(xi, w, bias)
        frozen = dataclasses.replace(w, scales=w.scales.clone().requires_grad_())
        with pytest.raises(ValueError, match="w.scales requires grad"):
            call(x, frozen)
        with torch.no_grad():
            call(x, frozen)


def _forward_ad_calls():
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    w4 = dsattn.quantize_int4(torch.randn(24, 64), group_size=32)
    w8 = dsattn.quantize_int8(torch.randn(24, 64))
    x = torch.randn(3, 64)
    return {
        "sliding_window_attention": (lambda q: dsattn.sliding_window_attention(q, k, v, window=4), q),
        "linear_attention": (lambda q: dsattn.linear_attention(q, k, v), q),
        "hybrid_attention": (lambda q: dsattn.hybrid_attention(q, k, v, prefix=2, window=2), q),
        "int4_matmul": (lambda x: dsattn.int4_matmul(x, w4), x),
        "int8_matmul": (lambda x: dsattn.int8_matmul(x, w8), x),
    }


@pytest.mark.parametrize("name", ["sliding_window_attention", "linear_attention", "hybrid_attention", "int4_matmul",
                                  "int8_matmul"])
def test_forward_mode_ad_is_refused_not_dropped(name):
    """A custom op drops a dual tensor's tangent (the jvp would be zero): every entry refuses forward mode."""
    from torch.autograd import forward_ad

    fn, arg = _forward_ad_calls()[name]
    with forward_ad.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            fn(forward_ad.make_dual(arg, torch.randn_like(arg)))
        fn(arg)  # a plain tensor inside the dual level still runs
    with pytest.raises(NotImplementedError, match="forward-mode AD"):
        torch.func.jvp(fn, (arg,), (torch.randn_like(arg),))
    assert torch.func.vmap(fn)(arg.unsqueeze(0)).shape[1:] == fn(arg).shape  # other transforms still run
