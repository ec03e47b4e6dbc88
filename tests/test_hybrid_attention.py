"""hybrid_attention: the oracle and the torch backend vs a brute-force loop (float64), Triton (interpreter on
CPU) vs the oracle, equality with causal softmax attention when every key is exact, edge rows, the custom op
(opcheck, gradients against float64 autograd of the oracle, torch.compile, no silent detach), bad input."""

import math

import pytest
import torch

import dsattn
from dsattn.ops.hybrid_attention import hybrid_attention
from dsattn.reference.hybrid_attention import hybrid_attention as hybrid_reference
from dsattn.reference.linear_attention import FEATURE_MAPS, feature_map
from dsattn.testing import (assert_close, assert_compiles, assert_grads_match, largest_tensor, non_contiguous,
                            outputs_and_grads, poisoned, tolerance)
from dsattn.torch_backend import hybrid_attention as torch_backend


def _qkv(b, hq, hkv, sq, sk, dqk, dv, dtype=torch.float32, device="cpu"):
    q = torch.randn(b, hq, sq, dqk, dtype=dtype, device=device)
    k = torch.randn(b, hkv, sk, dqk, dtype=dtype, device=device)
    v = torch.randn(b, hkv, sk, dv, dtype=dtype, device=device)
    return q, k, v


def _brute_force(q, k, v, prefix, window, fmap, scale=None):
    """The SPEC formula, one (batch, head, query) at a time, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    b, hq, sq, dqk = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = dqk**-0.5 if scale is None else scale
    out = torch.zeros(b, hq, sq, v.shape[3], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(sq):
                p = i + sk - sq
                exact = [j for j in range(sk) if j <= p and (j < prefix or j > p - window)]
                far = [j for j in range(sk) if prefix <= j <= p - window]
                qi = q[bi, h, i]
                s = {j: scale * float(qi @ k[bi, kh, j]) for j in exact}
                m = max(s.values()) if s else 0.0
                num = torch.zeros(v.shape[3], dtype=torch.float64)
                den = 0.0
                for j in exact:
                    w = math.exp(s[j] - m)
                    num += w * v[bi, kh, j]
                    den += w
                phi_q = feature_map(qi, fmap)
                for j in far:
                    w = float(phi_q @ feature_map(k[bi, kh, j], fmap))
                    num += w * v[bi, kh, j]
                    den += w
                out[bi, h, i] = num / den if den != 0 else 0.0
    return out


def _causal_softmax(q, k, v, scale=None):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    sq, sk = q.shape[2], k.shape[2]
    mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _torch_backend(chunk):
    def run(q, k, v, *, prefix, window, feature_map="elu", scale=None):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return torch_backend.hybrid_attention(q, k, v, prefix=prefix, window=window, feature_map=feature_map,
                                              scale=scale, chunk=chunk)

    return run


# the oracle, and the torch backend with small chunks (several query chunks, the state carry and the tail
# product all run) and its default chunk
IMPLEMENTATIONS = {"oracle": hybrid_reference, "torch-chunk4": _torch_backend(4), "torch": _torch_backend(128)}


# ---------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("fmap", sorted(FEATURE_MAPS))
@pytest.mark.parametrize(
    "sq,sk,prefix,window",
    [(13, 13, 3, 4), (13, 13, 0, 0), (13, 13, 0, 5), (13, 13, 5, 0), (13, 13, 20, 2), (6, 13, 4, 3), (16, 11, 2, 2)],
)
def test_reference_and_torch_backend_match_brute_force_float64(implementation, fmap, sq, sk, prefix, window):
    q, k, v = _qkv(1, 4, 2, sq, sk, 5, 3, torch.float64)
    expected = _brute_force(q, k, v, prefix, window, fmap)
    actual = IMPLEMENTATIONS[implementation](q, k, v, prefix=prefix, window=window, feature_map=fmap)
    assert_close(actual, expected, 1e-10)


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_reference_and_torch_backend_equal_causal_softmax_when_all_keys_exact(implementation):
    q, k, v = _qkv(2, 4, 2, 40, 40, 8, 6, torch.float64)
    expected = _causal_softmax(q, k, v)
    run = IMPLEMENTATIONS[implementation]
    assert_close(run(q, k, v, prefix=40, window=0), expected, 1e-10)
    assert_close(run(q, k, v, prefix=0, window=40), expected, 1e-10)


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
def test_reference_and_torch_backend_rows_without_keys_and_linear_only_rows(implementation):
    run = IMPLEMENTATIONS[implementation]
    q, k, v = _qkv(1, 2, 2, 9, 5, 4, 4, torch.float64)  # Sq > Sk: the first 4 rows see no key
    out = run(q, k, v, prefix=0, window=0, feature_map="elu")
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))
    assert_close(out, _brute_force(q, k, v, 0, 0, "elu"), 1e-10)
    # prefix = window = 0: no exact key anywhere, normalized causal linear attention
    phi_q, phi_k = feature_map(q, "elu"), feature_map(k, "elu")
    a = (phi_q @ phi_k.transpose(-1, -2)).tril(5 - 9)
    assert_close(out[:, :, 4:], ((a @ v) / a.sum(-1, keepdim=True))[:, :, 4:], 1e-10)
    # relu features that never overlap: the far denominator is exactly 0 -> zero rows, not NaN
    q, k = q.abs(), -k.abs()
    out = run(q, k, v, prefix=0, window=0, feature_map="relu")
    assert torch.equal(out, torch.zeros_like(out))


def test_reference_keeps_invisible_nan_out():
    """A NaN in a key or value after a row never reaches that row."""
    q, k, v = _qkv(1, 2, 1, 8, 8, 4, 4, torch.float64)
    k[:, :, 6], v[:, :, 7] = float("nan"), float("nan")
    out = hybrid_reference(q, k, v, prefix=2, window=2)
    assert torch.isfinite(out[:, :, :6]).all()


# ------------------------------------------------------------------------------------------------- triton
@pytest.mark.parametrize(
    "sq,sk,prefix,window",
    [
        (1, 1, 0, 0),
        (17, 17, 5, 7),
        (17, 17, 0, 0),
        (17, 17, 100, 0),  # prefix >= S: causal softmax
        (17, 17, 0, 100),  # window >= S: causal softmax
        (150, 150, 5, 7),
        (150, 150, 0, 7),
        (150, 150, 70, 0),
        (40, 300, 5, 7),  # Sq < Sk (chunked prefill); crosses a far-state chunk boundary
        (1, 300, 5, 7),  # decode: one query after 299 keys
        (600, 600, 300, 40),  # several far-state chunks, prefix not on a chunk boundary
    ],
)
def test_triton_matches_reference(triton_device, sq, sk, prefix, window):
    q, k, v = _qkv(1, 4, 2, sq, sk, 32, 16, device=triton_device)
    expected = hybrid_reference(q, k, v, prefix=prefix, window=window)
    actual = hybrid_attention(q, k, v, prefix=prefix, window=window, backend="triton")
    assert_close(actual, expected, 1e-5)


@pytest.mark.parametrize("fmap", sorted(FEATURE_MAPS))
def test_triton_feature_maps(triton_device, fmap):
    q, k, v = _qkv(1, 2, 1, 70, 70, 16, 16, device=triton_device)
    if fmap == "identity":
        # keep the identity denominator away from 0: positive features, so the comparison is well conditioned
        q, k = q.abs(), k.abs()
    expected = hybrid_reference(q, k, v, prefix=5, window=7, feature_map=fmap)
    assert_close(hybrid_attention(q, k, v, prefix=5, window=7, feature_map=fmap, backend="triton"), expected, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gqa_mla_dims_non_contiguous(triton_device, dtype):
    # Dqk != Dv, neither a power of two; S > CHUNK so the chunk-state kernel runs on strided phi(k), v
    q, k, v = _qkv(2, 6, 2, 300, 300, 24, 40, dtype, triton_device)
    q, k, v = non_contiguous(q), non_contiguous(k), non_contiguous(v)
    assert not q.is_contiguous()
    expected = hybrid_reference(q.double(), k.double(), v.double(), prefix=6, window=9, scale=0.3)
    actual = hybrid_attention(q, k, v, prefix=6, window=9, scale=0.3, backend="triton")
    assert actual.dtype == dtype and actual.shape == (2, 6, 300, 40)
    assert_close(actual, expected, tolerance(dtype))


def test_triton_writes_every_element(triton_device):
    from dsattn.triton_kernels.hybrid_attention import hybrid_attention as launch

    q, k, v = _qkv(1, 2, 1, 33, 33, 16, 16, device=triton_device)
    out = poisoned((1, 2, 33, 16), torch.float32, triton_device)
    launch(q, k, v, prefix=3, window=4, feature_map="elu", scale=0.25, out=out)
    assert_close(out, hybrid_reference(q, k, v, prefix=3, window=4, scale=0.25), 1e-5)


# "exp" is exactly exp(x): at these magnitudes e^(q + k) passes float32's range (the oracle in float32 gives
# inf / NaN), the backends must still give the float64 result (shifts that cancel, nothing clipped).
# (mean, std): large positive, large negative, and a wide spread
LARGE_EXP_INPUTS = [(45.0, 3.0), (-45.0, 3.0), (10.0, 20.0)]


def _large_qkv(mean, std, b, hq, hkv, sq, sk, dqk, dv, device="cpu", dtype=torch.float32):
    q, k, v = _qkv(b, hq, hkv, sq, sk, dqk, dv, device=device)
    return (q * std + mean).to(dtype), (k * std + mean).to(dtype), v.to(dtype)


@pytest.mark.parametrize("mean,std", LARGE_EXP_INPUTS)
@pytest.mark.parametrize("implementation", ["torch-chunk4", "torch"])
def test_torch_backend_exp_large_inputs_match_float64(implementation, mean, std):
    q, k, v = _large_qkv(mean, std, 1, 4, 2, 40, 53, 8, 6)
    for prefix, window in [(3, 4), (0, 0), (5, 0), (0, 6)]:
        kw = dict(prefix=prefix, window=window, feature_map="exp", scale=0.02)
        expected = hybrid_reference(q.double(), k.double(), v.double(), **kw)
        if mean > 0:  # the test can fail: evaluated as written in float32, the map overflows
            assert not torch.isfinite(hybrid_reference(q, k, v, **kw)).all()
        assert_close(IMPLEMENTATIONS[implementation](q, k, v, **kw), expected, 3e-5)


@pytest.mark.parametrize("mean,std", LARGE_EXP_INPUTS)
def test_triton_exp_large_inputs_match_float64(triton_device, mean, std):
    # several far-state chunks (the shifted state scan), tail blocks, Sq < Sk
    q, k, v = _large_qkv(mean, std, 1, 2, 1, 70, 600, 16, 16, triton_device)
    for prefix, window in [(300, 40), (0, 0)]:
        kw = dict(prefix=prefix, window=window, feature_map="exp", scale=0.02)
        expected = hybrid_reference(q.double(), k.double(), v.double(), **kw)
        assert_close(hybrid_attention(q, k, v, backend="triton", **kw), expected, 3e-5)
    q, k, v = _large_qkv(mean, std, 1, 2, 1, 70, 70, 16, 16, triton_device, torch.bfloat16)
    kw = dict(prefix=5, window=7, feature_map="exp", scale=0.02)
    expected = hybrid_reference(q.double(), k.double(), v.double(), **kw)
    assert_close(hybrid_attention(q, k, v, backend="triton", **kw), expected, tolerance(torch.bfloat16))


@pytest.mark.parametrize("mean,std", LARGE_EXP_INPUTS)
def test_exp_large_inputs_gradients_match_float64_autograd(short_chunks, mean, std):
    q, k, v = _large_qkv(mean, std, 2, 4, 2, 37, 45, 6, 5)
    q, k = non_contiguous(q), non_contiguous(k)
    inputs = [t.requires_grad_(True) for t in (q, k, v)]
    kw = dict(prefix=5, window=7, feature_map="exp", scale=0.02)
    assert_grads_match(lambda q, k, v: hybrid_attention(q, k, v, **kw), lambda q, k, v: hybrid_reference(q, k, v, **kw),
                       inputs, 1e-4, name="hybrid_attention")


def test_triton_equals_causal_softmax_when_prefix_covers_all(triton_device):
    q, k, v = _qkv(1, 4, 2, 50, 50, 32, 32, device=triton_device)
    out = hybrid_attention(q, k, v, prefix=50, backend="triton")
    assert_close(out, _causal_softmax(q, k, v), 1e-5)


def test_triton_rows_without_keys(triton_device):
    q, k, v = _qkv(1, 2, 2, 20, 7, 16, 16, device=triton_device)  # Sq > Sk: rows 0..12 see nothing
    out = hybrid_attention(q, k, v, prefix=2, window=0, backend="triton")
    assert torch.equal(out[:, :, :13], torch.zeros_like(out[:, :, :13]))
    assert_close(out, hybrid_reference(q, k, v, prefix=2, window=0), 1e-5)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_named():
    q, k, v = _qkv(1, 2, 1, 4, 4, 8, 8)
    with pytest.raises(ValueError, match="prefix must be >= 0"):
        hybrid_attention(q, k, v, prefix=-1)
    with pytest.raises(ValueError, match="window must be >= 0"):
        hybrid_attention(q, k, v, window=-3)
    with pytest.raises(TypeError, match="prefix must be an int"):
        hybrid_attention(q, k, v, prefix=2.0)
    with pytest.raises(TypeError, match="window must be an int"):
        hybrid_attention(q, k, v, window=True)
    with pytest.raises(ValueError, match="feature_map must be one of"):
        hybrid_attention(q, k, v, feature_map="softplus")
    with pytest.raises(TypeError, match="feature_map must be a str"):
        hybrid_attention(q, k, v, feature_map=None)
    with pytest.raises(TypeError, match="scale must be a float"):
        hybrid_attention(q, k, v, scale="0.1")
    with pytest.raises(ValueError, match="q must be 4-D"):
        hybrid_attention(q[0], k, v)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        hybrid_attention(q.repeat(1, 3, 1, 1)[:, :3], k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1))
    with pytest.raises(ValueError, match="k head dim"):
        hybrid_attention(q, k[..., :4], v)
    with pytest.raises(TypeError, match="v has dtype"):
        hybrid_attention(q, k, v.double())
    with pytest.raises(ValueError, match="backend must be one of"):
        hybrid_attention(q, k, v, backend="cuda-graph")
    with pytest.raises(ValueError, match="not implemented for this op"):
        hybrid_attention(q, k, v, backend="cuda")


def test_triton_rejects_what_it_cannot_run(triton_device):
    q, k, v = _qkv(1, 1, 1, 4, 4, 8, 8, torch.float64)
    with pytest.raises(TypeError, match="backend='triton' takes float16, bfloat16, float32 inputs, got float64"):
        hybrid_attention(q, k, v, backend="triton")
    q, k, v = _qkv(1, 1, 1, 4, 4, 8, 320)
    with pytest.raises(ValueError, match="backend='triton' takes head dims up to 256, got 320"):
        hybrid_attention(q, k, v, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_long_sequence(dtype):
    q, k, v = _qkv(1, 8, 2, 4099, 4099, 128, 128, dtype, "cuda")
    expected = hybrid_attention(q, k, v, prefix=1000, window=300, backend="torch")
    assert_close(hybrid_attention(q, k, v, prefix=1000, window=300, backend="triton"), expected, tolerance(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("fmap", ["elu", "exp"])
def test_gpu_backward_long_sequence(fmap):
    inputs = _grad_inputs(1, 8, 2, 4099, 4099, 128, 128, torch.bfloat16, "cuda")
    kw = dict(prefix=1000, window=300, feature_map=fmap)
    triton_out, triton_grads, cotangents = outputs_and_grads(
        lambda q, k, v: hybrid_attention(q, k, v, backend="triton", **kw), inputs)
    torch_out, torch_grads, _ = outputs_and_grads(lambda q, k, v: hybrid_attention(q, k, v, backend="torch", **kw),
                                                  inputs, cotangents)
    for got, expected in zip(triton_grads, torch_grads):
        assert_close(got, expected, tolerance(torch.bfloat16))


# ---------------------------------------------------------------------------------------------- the custom op
def _grad_inputs(b, hq, hkv, sq, sk, dqk, dv, dtype, device="cpu", transposed=False):
    q, k, v = _qkv(b, hq, hkv, sq, sk, dqk, dv, dtype, device)
    if transposed:  # [B, S, H, D] memory, as transformers hands it over
        q, k, v = (non_contiguous(t) for t in (q, k, v))
    return [t.requires_grad_(True) for t in (q, k, v)]


@pytest.fixture
def short_chunks(monkeypatch):
    monkeypatch.setattr(torch_backend, "QUERY_CHUNK", 8)


@pytest.mark.parametrize(
    "b,hq,hkv,sq,sk,dqk,dv,prefix,window,fmap,transposed",
    [
        (2, 4, 2, 37, 37, 6, 5, 5, 7, "elu", False),  # GQA, Dqk != Dv, prefix + band + far (state and tail)
        (1, 2, 1, 13, 45, 8, 8, 4, 3, "exp", True),  # Sq < Sk, non-contiguous
        (1, 3, 3, 21, 21, 4, 6, 0, 0, "relu", False),  # linear only (no exact key)
        (1, 2, 1, 19, 19, 5, 3, 30, 0, "identity", True),  # every key exact: causal softmax
        (1, 2, 1, 12, 5, 4, 4, 2, 2, "elu", False),  # Sq > Sk: rows that see nothing
    ],
)
def test_gradients_match_float64_autograd_of_the_oracle(short_chunks, b, hq, hkv, sq, sk, dqk, dv, prefix, window,
                                                          fmap, transposed):
    inputs = _grad_inputs(b, hq, hkv, sq, sk, dqk, dv, torch.float32, transposed=transposed)
    kw = dict(prefix=prefix, window=window, feature_map=fmap, scale=0.4)
    assert_grads_match(lambda q, k, v: hybrid_attention(q, k, v, **kw),
                       lambda q, k, v: hybrid_reference(q, k, v, **kw), inputs, 1e-5, name="hybrid_attention")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradients_in_16_bit(dtype):
    inputs = _grad_inputs(1, 4, 2, 150, 150, 16, 8, dtype)
    kw = dict(prefix=5, window=9)
    assert_grads_match(lambda q, k, v: hybrid_attention(q, k, v, **kw), lambda q, k, v: hybrid_reference(q, k, v, **kw),
                       inputs, tolerance(dtype), name="hybrid_attention")


def test_gradcheck_float64_torch_backend(short_chunks):
    inputs = _grad_inputs(1, 2, 1, 19, 21, 3, 2, torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: hybrid_attention(q, k, v, prefix=3, window=4, backend="torch"),
                                    inputs, fast_mode=True)


def test_backward_memory_chunks():
    """Forward and backward go chunk by chunk: nothing near [Sq, Sk] (2 x 1024 x 1024 elements); the largest
    tensors are the inputs, their gradients and one chunk's scores over its prefix + band keys."""
    q, k, v = _grad_inputs(1, 2, 1, 1024, 1024, 8, 8, torch.float32)
    prefix, window, chunk = 16, 16, torch_backend.QUERY_CHUNK
    assert largest_tensor(lambda: hybrid_attention(q, k, v, prefix=prefix, window=window).sum().backward()) \
        <= max(2 * 1024 * 8, 2 * chunk * (prefix + chunk + window))
    assert q.grad is not None and k.grad is not None


def test_no_silent_detach(triton_device):
    """A gradient is wanted: auto and an explicit "triton" both return an output with a backward; under no_grad
    the kernel still runs."""
    q, k, v = _grad_inputs(1, 2, 1, 9, 9, 16, 16, torch.float32, triton_device)
    assert hybrid_attention(q, k, v, prefix=2, window=3).grad_fn is not None
    assert hybrid_attention(q, k, v, prefix=2, window=3, backend="triton").grad_fn is not None
    with torch.no_grad():
        assert_close(hybrid_attention(q, k, v, prefix=2, window=3, backend="triton"),
                     hybrid_reference(q, k, v, prefix=2, window=3))


# -------------------------------------------------------------------------------------------- triton backward
@pytest.mark.parametrize(
    "b,hq,hkv,sq,sk,dqk,dv,prefix,window,fmap,transposed",
    [
        (2, 4, 2, 37, 37, 6, 5, 5, 7, "elu", False),  # GQA, Dqk != Dv, prefix + band + far (tail)
        (1, 2, 1, 13, 45, 8, 8, 4, 3, "exp", True),  # Sq < Sk, non-contiguous
        (1, 3, 3, 21, 21, 4, 6, 0, 0, "relu", False),  # prefix 0, window 0: linear only
        (1, 2, 1, 30, 30, 8, 8, 5, 0, "identity", False),  # window 0
        (1, 2, 1, 19, 19, 5, 3, 30, 0, "elu", True),  # prefix >= Sk: causal softmax
        (1, 2, 1, 12, 5, 4, 4, 2, 2, "exp", False),  # Sq > Sk: rows that see nothing
        (1, 2, 1, 40, 600, 16, 8, 300, 40, "exp", False),  # forward and reverse far states over several chunks
        (1, 4, 2, 70, 300, 16, 16, 0, 7, "elu", True),  # prefix 0 with a band, states, GQA
        (1, 2, 1, 70, 300, 8, 8, 20, 0, "identity", False),  # identity with states
    ],
)
def test_triton_backward_matches_float64_autograd_of_the_oracle(triton_device, b, hq, hkv, sq, sk, dqk, dv, prefix,
                                                                window, fmap, transposed):
    q, k, v = _qkv(b, hq, hkv, sq, sk, dqk, dv, torch.float32, triton_device)
    if fmap == "identity":  # keep the identity denominator away from 0 (positive features)
        q, k = q.abs(), k.abs()
    if transposed:
        q, k, v = (non_contiguous(t) for t in (q, k, v))
    inputs = [t.requires_grad_(True) for t in (q, k, v)]
    kw = dict(prefix=prefix, window=window, feature_map=fmap, scale=0.4)
    assert_grads_match(lambda q, k, v: hybrid_attention(q, k, v, backend="triton", **kw),
                       lambda q, k, v: hybrid_reference(q, k, v, **kw), inputs, 1e-4, name="hybrid_attention triton")


def test_triton_op_called_directly_has_the_backward(triton_device):
    """torch.ops.dsattn.hybrid_attention(..., "triton") itself (not the functional entry, which takes the
    statistics-saving forward): its backward recomputes them."""
    inputs = _grad_inputs(1, 2, 1, 20, 20, 8, 8, torch.float32, triton_device)
    assert_grads_match(lambda q, k, v: torch.ops.dsattn.hybrid_attention(q, k, v, 3, 4, "exp", 0.25, "triton"),
                       lambda q, k, v: hybrid_reference(q, k, v, prefix=3, window=4, feature_map="exp", scale=0.25),
                       inputs, 1e-4, name="hybrid_attention triton op")


def test_triton_backward_bf16(triton_device):
    inputs = _grad_inputs(1, 4, 2, 70, 300, 16, 8, torch.bfloat16, triton_device)
    kw = dict(prefix=5, window=9, feature_map="elu")
    assert_grads_match(lambda q, k, v: hybrid_attention(q, k, v, backend="triton", **kw),
                       lambda q, k, v: hybrid_reference(q, k, v, **kw), inputs, tolerance(torch.bfloat16),
                       name="hybrid_attention triton")


@pytest.mark.parametrize("mean,std", LARGE_EXP_INPUTS)
def test_triton_backward_exp_large_inputs(triton_device, mean, std):
    q, k, v = _large_qkv(mean, std, 1, 2, 1, 40, 300, 8, 8, triton_device)
    inputs = [t.requires_grad_(True) for t in (q, k, v)]
    kw = dict(prefix=5, window=7, feature_map="exp", scale=0.02)
    assert_grads_match(lambda q, k, v: hybrid_attention(q, k, v, backend="triton", **kw),
                       lambda q, k, v: hybrid_reference(q, k, v, **kw), inputs, 1e-4, name="hybrid_attention triton")


def test_triton_backward_memory(triton_device):
    """Nothing near [Sq, Sk] in the Triton backward either (its far sums go through chunk states)."""
    q, k, v = _grad_inputs(1, 2, 1, 300, 300, 8, 8, torch.float32, triton_device)
    assert largest_tensor(lambda: hybrid_attention(q, k, v, prefix=16, window=16, backend="triton").sum().backward()) \
        <= 2 * 300 * 8 * 2
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_opcheck():
    q, k, v = (t.detach() for t in _grad_inputs(1, 4, 2, 11, 13, 16, 8, torch.float32))
    torch.library.opcheck(torch.ops.dsattn.hybrid_attention, (q.requires_grad_(True), k, v, 3, 4, "elu", 0.25, "torch"))
    if dsattn._backend.unusable_reason("triton", q.device) is None:
        torch.library.opcheck(torch.ops.dsattn.hybrid_attention, (q.detach(), k, v, 3, 4, "elu", 0.25, "triton"))


def test_compiles_fullgraph_and_equals_eager():
    inputs = _grad_inputs(1, 4, 2, 29, 29, 16, 8, torch.float32, transposed=True)
    assert_compiles(lambda q, k, v: hybrid_attention(q, k, v, prefix=3, window=5), inputs, name="hybrid_attention")
    with torch.no_grad():
        assert_compiles(lambda q, k, v: hybrid_attention(q[:, :, -1:], k, v, prefix=3, window=5), inputs,
                        name="decode")


def test_triton_offsets_past_int32(triton_device):
    """k/v rows past element 2^31 of their slice (the far state of chunk 1, the far keys and the band) and the
    second query block's rows past it too: strided views of one lazily allocated buffer (q, k and v interleaved in its rows), where only
    the touched rows are ever written."""
    seq_q, seq_k, stride, d = 128, 3 * 256 + 1, 2**23, 16  # three far-state chunks of 256 keys, one key more
    try:
        buf = torch.empty(seq_k * stride, dtype=torch.float16, device=triton_device)
    except (RuntimeError, MemoryError):
        pytest.skip("cannot reserve the address range")
    k = buf.as_strided((1, 1, seq_k, d), (0, d, stride, 1))
    v = buf.as_strided((1, 1, seq_k, d), (0, d, stride, 1), d)
    q = buf.as_strided((1, 1, seq_q, d), (0, d, 4 * stride, 1), 2 * d)  # every 4th row, past k and v's columns
    assert 256 * stride >= 2**31 and 64 * 4 * stride >= 2**31
    for t in (k, v, q):
        t.copy_(torch.randn(t.shape, dtype=torch.float16, device=triton_device))
    got = hybrid_attention(q, k, v, prefix=32, window=64, backend="triton")
    expected = hybrid_reference(q.contiguous(), k.contiguous(), v.contiguous(), prefix=32, window=64)
    assert_close(got, expected, tolerance(torch.float16))
