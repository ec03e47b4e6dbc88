"""The C++ CPU linear attention kernel (csrc/cpu/linear_attention.cpp: the "cpp" backend of
dsattn.linear_attention, forward only; feature maps elu / relu / identity) against the float64 oracle
(dsattn.reference.linear_attention), on every ISA path this CPU has (isa= forces one: 0 portable, 1 AVX2,
2 AVX-512), plus the wiring: auto picks cpp on CPU without a gradient, torch with one or for "exp".
"""

import importlib

import pytest
import torch

import dsattn
from dsattn import _backend, _ext, testing
from dsattn.reference.linear_attention import LinearAttentionState

# The module (dsattn.reference re-exports its function under the same name).
ref_module = importlib.import_module("dsattn.reference.linear_attention")

if _backend.unusable_reason("cpp", torch.device("cpu"), "linear_attention") is not None:
    pytest.skip("dsattn._C has no linear_attention kernel in this build", allow_module_level=True)

OPS = torch.ops.dsattn_C
CODES = {"elu": 0, "relu": 1, "identity": 2}


ISAS = _ext.cpu_isas()
ISA_IDS = {0: "portable", 1: "avx2", 2: "avx512"}


def _rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(dtype)


def _inputs(b, hq, hkv, sq, sk, dk, dv, dtype=torch.float32, state=False):
    q, k, v = _rand(b, hq, sq, dk, dtype=dtype), _rand(b, hkv, sk, dk, dtype=dtype), _rand(b, hkv, sk, dv, dtype=dtype)
    if not state:
        return q, k, v, None, None
    # A state that positive feature maps could have produced: S from random keys, z their positive sums.
    return q, k, v, _rand(b, hq, dk, dv), torch.rand(b, hq, dk) * 4


def _cpp(q, k, v, S0, z0, fmap, causal, normalize, isa, eps=1e-6):
    return OPS.linear_attention(q, k, v, S0, z0, CODES[fmap], causal, normalize, eps, isa)


def _oracle(q, k, v, S0, z0, fmap, causal, normalize, eps=1e-6):
    state = None if S0 is None else LinearAttentionState(S0.double(), z0.double())
    o, (S, z, _) = ref_module.linear_attention(q.double(), k.double(), v.double(), feature_map=fmap, causal=causal,
                                               normalize=normalize, eps=eps, initial_state=state,
                                               output_final_state=True)
    return o, S, z


def _check(got, expected, rtol):
    for name, g, e in zip(("o", "S", "z"), got, expected):
        testing.assert_close(g, e, rtol, name=name)


# (B, Hq, Hkv, Sq, Sk, Dk, Dv, causal): chunk edges (64 rows), GQA / MQA, Dk != Dv, odd dims, Sq < Sk, decode.
SHAPES = [
    (2, 4, 2, 70, 70, 24, 40, True),
    (1, 3, 1, 13, 150, 33, 17, True),
    (1, 2, 2, 129, 129, 16, 16, True),
    (2, 2, 1, 37, 45, 20, 48, False),
    (3, 4, 2, 1, 1, 64, 80, True),
    (2, 2, 2, 1, 9, 19, 21, True),
]


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("fmap", ["elu", "relu"])
def test_fp32_normalized(isa, shape, fmap):
    *dims, causal = shape
    for state in (False, True):
        q, k, v, S0, z0 = _inputs(*dims, state=state)
        if fmap == "relu" and S0 is not None:
            S0 = S0.abs()
        _check(_cpp(q, k, v, S0, z0, fmap, causal, True, isa), _oracle(q, k, v, S0, z0, fmap, causal, True), 2e-5)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("fmap", ["elu", "relu", "identity"])
def test_fp32_unnormalized(isa, fmap):
    for *dims, causal in SHAPES[:2] + SHAPES[3:5]:
        q, k, v, S0, z0 = _inputs(*dims, state=True)
        _check(_cpp(q, k, v, S0, z0, fmap, causal, False, isa), _oracle(q, k, v, S0, z0, fmap, causal, False), 2e-5)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit(isa, dtype):
    for dims in ((1, 4, 2, 70, 90, 32, 24), (2, 4, 4, 1, 1, 64, 64)):
        q, k, v, S0, z0 = _inputs(*dims, dtype=dtype, state=True)
        o, S, z = _cpp(q, k, v, S0, z0, "elu", True, True, isa)
        assert o.dtype == dtype and S.dtype == torch.float32 and z.dtype == torch.float32
        _check((o, S, z), _oracle(q, k, v, S0, z0, "elu", True, True), 1e-2)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
def test_elu_extremes(isa):
    """elu's vector exp over its whole negative range: with S0 = I, z0 = 0 and zero values the output is
    phi(q) itself (decode and chunked paths), against float64 exp (elu + 1 there loses e^x below -37); 0 below
    -87.4 (no denormals), x + 1 above 0."""
    d = 96
    x = torch.cat([torch.linspace(-87.3, 0, d - 16), torch.linspace(-120, -87.5, 8), torch.linspace(0.1, 30, 8)])
    for sq in (1, 3):
        q = x.expand(1, 1, sq, d).contiguous()
        k, v = torch.zeros(1, 1, sq, d), torch.zeros(1, 1, sq, d)
        o = _cpp(q, k, v, torch.eye(d)[None, None].contiguous(), torch.zeros(1, 1, d), "elu", True, False, isa)[0]
        expected = torch.where(x > 0, x.double() + 1, x.double().exp()).expand_as(o)
        rel = ((o.double() - expected).abs() / expected.clamp(min=1e-30))[..., : d - 16]
        assert rel.max() < 2e-6, rel.max()
        assert (o[..., d - 16 : d - 8].abs() < 1e-37).all()
        testing.assert_close(o[..., d - 8 :], expected[..., d - 8 :], 1e-7)
    # Random inputs in the range where float64 elu + 1 is exact enough, through every step of the kernel.
    q, k, v, _, _ = _inputs(2, 3, 1, 40, 70, 48, 16)
    q, k = q * 5, k * 5
    for causal in (True, False):
        _check(_cpp(q, k, v, None, None, "elu", causal, True, isa), _oracle(q, k, v, None, None, "elu", causal, True),
               2e-5)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_future_nonfinite_stays_out(isa, bad):
    """A NaN / Inf key and value at position p (mid-chunk and on a chunk edge) reach no row before p."""
    for p in (37, 64, 100):
        q, k, v, S0, z0 = _inputs(1, 2, 1, 110, 110, 24, 20, state=True)
        k[:, :, p] = bad
        v[:, :, p] = bad
        o, _, _ = _cpp(q, k, v, S0, z0, "elu", True, True, isa)
        expected = _oracle(q, k, v, S0, z0, "elu", True, True)[0]
        assert torch.isfinite(o[:, :, :p]).all()
        testing.assert_close(o[:, :, :p], expected[:, :, :p], 2e-5)
        assert not torch.isfinite(o[:, :, p:]).all(dim=-1).any()


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
def test_non_contiguous(isa):
    q, k, v, S0, z0 = _inputs(2, 4, 2, 45, 60, 24, 40, state=True)
    expected = _oracle(q, k, v, S0, z0, "elu", True, True)
    qn, kn, vn = (testing.non_contiguous(t) for t in (q, k, v))
    assert not qn.is_contiguous()
    _check(_cpp(qn, kn, vn, S0, z0, "elu", True, True, isa), expected, 2e-5)
    # Strided along the head dim too (a slice of a wider tensor).
    qs, ks, vs = (torch.stack([t, t], dim=-1).flatten(-2)[..., ::2] for t in (q, k, v))
    assert qs.stride(-1) == 2
    _check(_cpp(qs, ks, vs, S0, z0, "elu", True, True, isa), expected, 2e-5)


def test_env_forces_portable(monkeypatch):
    q, k, v, S0, z0 = _inputs(1, 2, 2, 40, 40, 32, 32, state=True)
    portable = _cpp(q, k, v, S0, z0, "elu", True, True, 0)
    monkeypatch.setenv("DSATTN_CPU_ISA", "portable")
    forced = _cpp(q, k, v, S0, z0, "elu", True, True, -1)
    for a, b in zip(forced, portable):
        assert torch.equal(a, b)


def test_threads_give_identical_results():
    q, k, v, S0, z0 = _inputs(2, 4, 2, 70, 70, 32, 32, state=True)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _cpp(q, k, v, S0, z0, "elu", True, True, -1)
        torch.set_num_threads(2)
        two = _cpp(q, k, v, S0, z0, "elu", True, True, -1)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- wiring
def test_entry_matches_torch_backend_and_carries_state():
    """backend="cpp" equals the torch backend (outputs and final state); two halves with the carried state equal
    the whole; a decode step on the carried state equals the oracle."""
    q, k, v, _, _ = _inputs(2, 4, 2, 50, 50, 24, 40)
    for fmap in ("elu", "relu", "identity"):
        for causal in (True, False):
            normalize = fmap != "identity"
            kw = dict(feature_map=fmap, causal=causal, normalize=normalize, output_final_state=True)
            o_c, st_c = dsattn.linear_attention(q, k, v, backend="cpp", **kw)
            o_t, st_t = dsattn.linear_attention(q, k, v, backend="torch", **kw)
            testing.assert_close(o_c, o_t, 2e-5)
            testing.assert_close(st_c.S, st_t.S, 2e-5)
            testing.assert_close(st_c.z, st_t.z, 2e-5)
            assert st_c.m is None
    o1, st = dsattn.linear_attention(q[:, :, :30], k[:, :, :30], v[:, :, :30], output_final_state=True, backend="cpp")
    o2 = dsattn.linear_attention(q[:, :, 30:], k[:, :, 30:], v[:, :, 30:], initial_state=st, backend="cpp")
    testing.assert_close(torch.cat([o1, o2], dim=2), _oracle(q, k, v, None, None, "elu", True, True)[0], 2e-5)
    # Decode on a carried state (also a float64 state given with fp32 inputs).
    q1, k1, v1, _, _ = _inputs(2, 4, 2, 1, 1, 24, 40)
    st64 = LinearAttentionState(st.S.double(), st.z.double())
    o, st2 = dsattn.linear_attention(q1, k1, v1, initial_state=st64, output_final_state=True, backend="cpp")
    eo, eS, ez = _oracle(q1, k1, v1, st.S, st.z, "elu", True, True)
    _check((o, st2.S, st2.z), (eo, eS, ez), 2e-5)


def test_auto_and_refusals():
    q, k, v, _, _ = _inputs(1, 2, 2, 20, 20, 16, 16)
    with _backend.recording() as chosen:
        dsattn.linear_attention(q, k, v)
        dsattn.linear_attention(q, k, v, feature_map="exp")
    assert chosen == {"linear_attention": {"cpp", "torch"}}
    qg = q.clone().requires_grad_(True)
    with _backend.recording() as chosen:
        dsattn.linear_attention(qg, k, v).sum().backward()
    assert chosen == {"linear_attention": {"torch"}}
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
    with pytest.raises(ValueError, match="no backward"):
        dsattn.linear_attention(qg, k, v, backend="cpp")
    with pytest.raises(ValueError, match="feature_map"):
        dsattn.linear_attention(q, k, v, feature_map="exp", backend="cpp")
    with pytest.raises(TypeError, match="float64"):
        dsattn.linear_attention(q.double(), k.double(), v.double(), backend="cpp")


def test_traces_under_compile():
    q, k, v, _, _ = _inputs(1, 2, 1, 24, 24, 16, 8)

    def fn(q, k, v):
        o, st = dsattn.linear_attention(q, k, v, output_final_state=True, backend="cpp")
        return o, st.S

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(q, k, v), fn(q, k, v)):
        testing.assert_close(a, b, 0)
