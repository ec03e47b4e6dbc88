"""The C++ CPU hybrid attention kernel (csrc/cpu/hybrid_attention_impl.h via csrc/cpu/hybrid_attention.cpp: the
"cpp" backend of dsattn.hybrid_attention, forward only; feature maps elu / relu / identity) against the float64
oracle (dsattn.reference.hybrid_attention), on every ISA path this CPU has (isa= forces one: 0 portable, 1 AVX2,
2 AVX-512), plus the wiring: auto picks cpp on CPU without a gradient, torch with one or for "exp".
"""

import pytest
import torch

import dsattn
from dsattn import _backend, _ext, testing
from dsattn.ops.hybrid_attention import CPP_FEATURE_MAPS, hybrid_attention
from dsattn.reference.hybrid_attention import hybrid_attention as oracle

if _backend.unusable_reason("cpp", torch.device("cpu"), "hybrid_attention") is not None:
    pytest.skip("dsattn._C has no hybrid_attention kernel in this build", allow_module_level=True)

ISAS = _ext.cpu_isas()
ISA_IDS = {0: "portable", 1: "avx2", 2: "avx512"}


def _inputs(b, hq, hkv, sq, sk, dqk, dv, dtype=torch.float32, positive=False):
    q, k, v = torch.randn(b, hq, sq, dqk), torch.randn(b, hkv, sk, dqk), torch.randn(b, hkv, sk, dv)
    if positive:  # identity features: positive, so that the denominator stays away from 0 (well conditioned)
        q, k = q.abs() + 0.1, k.abs() + 0.1
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _cpp(q, k, v, prefix, window, fmap, isa=-1, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.dsattn_C.hybrid_attention(q, k, v, prefix, window, CPP_FEATURE_MAPS[fmap], scale, isa)


def _expected(q, k, v, prefix, window, fmap, scale=None):
    return oracle(q.double(), k.double(), v.double(), prefix=prefix, window=window, feature_map=fmap, scale=scale)


# (B, Hq, Hkv, Sq, Sk, Dqk, Dv, prefix, window): key tiles are 64 keys, query blocks 32 / G positions; the far
# state grows by whole tiles and the rest of the far keys go through the per-row tail.
SHAPES = [
    (2, 4, 2, 70, 70, 24, 40, 13, 5),  # GQA, Dqk != Dv, block and tile edges
    (1, 3, 1, 90, 200, 33, 17, 20, 37),  # Sq < Sk, odd dims, state tiles + tails
    (1, 2, 2, 150, 150, 16, 16, 64, 64),  # prefix and window on tile edges
    (1, 1, 1, 130, 130, 72, 80, 0, 0),  # pure linear attention (no exact key), Dqk > 64
    (1, 2, 1, 57, 57, 16, 8, 7, 0),  # window 0: prefix exact, the rest linear up to the diagonal
    (1, 8, 2, 45, 45, 32, 32, 0, 9),  # no prefix: window exact, the rest linear
    (1, 2, 1, 40, 40, 16, 24, 40, 0),  # prefix >= S: causal softmax attention
    (1, 2, 2, 30, 30, 16, 16, 3, 100),  # window past every key: causal softmax attention
    (2, 2, 1, 1, 129, 48, 64, 17, 19),  # decode
    (1, 2, 1, 60, 40, 16, 16, 7, 5),  # Sq > Sk: the first rows see no key (zeros)
    (1, 1, 1, 300, 300, 130, 20, 5, 3),  # one head: the blocks split into runs; Dqk over two 64-slices
    (1, 4, 2, 200, 260, 32, 48, 30, 40),  # big enough for the parallel path
]


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_fp32_matches_float64_oracle(isa, shape):
    *dims, prefix, window = shape
    for fmap in ("elu", "relu"):
        q, k, v = _inputs(*dims)
        testing.assert_close(_cpp(q, k, v, prefix, window, fmap, isa), _expected(q, k, v, prefix, window, fmap), 2e-5,
                             name=fmap)
    q, k, v = _inputs(*dims, positive=True)
    testing.assert_close(_cpp(q, k, v, prefix, window, "identity", isa),
                         _expected(q, k, v, prefix, window, "identity"), 2e-5, name="identity")


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
def test_rows_without_keys_are_zero(isa):
    q, k, v = _inputs(1, 2, 1, 50, 20, 16, 16)
    o = _cpp(q, k, v, 4, 3, "elu", isa)
    assert torch.equal(o[:, :, :30], torch.zeros_like(o[:, :, :30]))
    testing.assert_close(o, _expected(q, k, v, 4, 3, "elu"), 2e-5)
    # relu features with no overlap: far-only rows whose weights sum to exactly 0 are 0, not NaN
    q, k, v = _inputs(1, 1, 1, 40, 40, 8, 8)
    q, k = q.abs(), -k.abs()
    o = _cpp(q, k, v, 0, 0, "relu", isa)
    assert torch.equal(o, torch.zeros_like(o))


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit(isa, dtype):
    for dims, prefix, window in (((1, 4, 2, 70, 90, 32, 24), 11, 13), ((2, 4, 4, 1, 100, 64, 64), 30, 20)):
        q, k, v = _inputs(*dims, dtype=dtype)
        o = _cpp(q, k, v, prefix, window, "elu", isa)
        assert o.dtype == dtype
        testing.assert_close(o, _expected(q, k, v, prefix, window, "elu"), 1e-2)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
def test_scale_and_large_scores(isa):
    """A scale other than Dqk^-0.5 and scores up to ~100 (the online softmax's running max)."""
    q, k, v = _inputs(1, 2, 1, 80, 80, 16, 16)
    for scale in (0.05, 3.0):
        testing.assert_close(_cpp(q, k, v, 9, 11, "elu", isa, scale=scale),
                             _expected(q, k, v, 9, 11, "elu", scale=scale), 2e-5)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_keys_reach_only_rows_that_see_them(isa, bad):
    """A NaN / Inf key and value at position j (in the prefix, on a tile edge, in a state tile, in a tail) reach
    no row before j (every key at or before a row's position is exact or far, so only the causal future is
    invisible); a NaN query row stays in its row."""
    for j in (3, 63, 64, 100, 150):
        q, k, v = _inputs(1, 2, 1, 170, 170, 24, 20)
        k[:, :, j] = bad
        v[:, :, j] = bad
        o = _cpp(q, k, v, 10, 6, "elu", isa)
        expected = _expected(q, k, v, 10, 6, "elu")
        assert torch.isfinite(o[:, :, :j]).all()
        testing.assert_close(o[:, :, :j], expected[:, :, :j], 2e-5)
        assert not torch.isfinite(o[:, :, j:]).all(dim=-1).any()
    q, k, v = _inputs(1, 2, 1, 170, 170, 24, 20)
    q[:, :, 77] = float("nan")
    o = _cpp(q, k, v, 10, 6, "elu", isa)
    rows = torch.arange(170) != 77
    assert torch.isnan(o[:, :, 77]).all()
    testing.assert_close(o[:, :, rows], _expected(q, k, v, 10, 6, "elu")[:, :, rows], 2e-5)


@pytest.mark.parametrize("isa", ISAS, ids=lambda i: ISA_IDS[i])
def test_non_contiguous(isa):
    q, k, v = _inputs(2, 4, 2, 45, 60, 24, 40)
    expected = _expected(q, k, v, 6, 8, "elu")
    qn, kn, vn = (testing.non_contiguous(t) for t in (q, k, v))
    assert not qn.is_contiguous()
    testing.assert_close(_cpp(qn, kn, vn, 6, 8, "elu", isa), expected, 2e-5)
    # Strided along the head dim too (a slice of a wider tensor).
    qs, ks, vs = (torch.stack([t, t], dim=-1).flatten(-2)[..., ::2] for t in (q, k, v))
    assert qs.stride(-1) == 2
    testing.assert_close(_cpp(qs, ks, vs, 6, 8, "elu", isa), expected, 2e-5)


def test_env_forces_portable(monkeypatch):
    q, k, v = _inputs(1, 2, 2, 40, 40, 32, 32)
    portable = _cpp(q, k, v, 5, 4, "elu", 0)
    monkeypatch.setenv("DSATTN_CPU_ISA", "portable")
    assert torch.equal(_cpp(q, k, v, 5, 4, "elu", -1), portable)


def test_threads_give_identical_results():
    """The far state grows by whole tiles whatever the split of the query blocks into tasks (which follows the
    thread count); a call this size takes the parallel path (smaller ones run on the calling thread)."""
    q, k, v = _inputs(1, 2, 1, 600, 600, 32, 32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _cpp(q, k, v, 5, 3, "elu")
        torch.set_num_threads(2)
        two = _cpp(q, k, v, 5, 3, "elu")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)
    testing.assert_close(two, _expected(q, k, v, 5, 3, "elu"), 2e-5)


# ----------------------------------------------------------------------------------------------- wiring
def test_entry_matches_torch_backend():
    q, k, v = _inputs(2, 4, 2, 50, 70, 24, 40)
    for fmap in ("elu", "relu"):
        for prefix, window in ((7, 5), (0, 0), (100, 0)):
            kw = dict(prefix=prefix, window=window, feature_map=fmap)
            testing.assert_close(hybrid_attention(q, k, v, backend="cpp", **kw),
                                 hybrid_attention(q, k, v, backend="torch", **kw), 2e-5)
    # prefix values past every key are clamped by the entry (int32-safe there and in the kernel)
    testing.assert_close(hybrid_attention(q, k, v, prefix=2**40, backend="cpp"),
                         hybrid_attention(q, k, v, prefix=2**40, backend="torch"), 2e-5)


def test_auto_and_refusals():
    q, k, v = _inputs(1, 2, 2, 20, 20, 16, 16)
    with _backend.recording() as chosen:
        dsattn.hybrid_attention(q, k, v, prefix=4, window=3)
        dsattn.hybrid_attention(q, k, v, prefix=4, window=3, feature_map="exp")
    assert chosen == {"hybrid_attention": {"cpp", "torch"}}
    qg = q.clone().requires_grad_(True)
    with _backend.recording() as chosen:
        dsattn.hybrid_attention(qg, k, v, prefix=4, window=3).sum().backward()
    assert chosen == {"hybrid_attention": {"torch"}}
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
    with pytest.raises(ValueError, match="no backward"):
        dsattn.hybrid_attention(qg, k, v, backend="cpp")
    with pytest.raises(ValueError, match="feature_map"):
        dsattn.hybrid_attention(q, k, v, feature_map="exp", backend="cpp")
    with pytest.raises(TypeError, match="float64"):
        dsattn.hybrid_attention(q.double(), k.double(), v.double(), backend="cpp")


def test_compiles_fullgraph():
    q, k, v = _inputs(1, 4, 2, 37, 37, 16, 8)

    def fn(q, k, v):
        return dsattn.hybrid_attention(q, k, v, prefix=5, window=3, backend="cpp")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    testing.assert_close(compiled(q, k, v), fn(q, k, v), 0)
