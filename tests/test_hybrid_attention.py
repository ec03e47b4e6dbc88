"""hybrid_attention: reference vs a brute-force loop (float64), Triton (interpreter on CPU) vs the reference,
equality with causal softmax attention when every key is exact, edge rows, bad input."""

import math

import pytest
import torch

from dsattn.ops.hybrid_attention import hybrid_attention
from dsattn.reference.hybrid_attention import hybrid_attention as hybrid_reference
from dsattn.reference.linear_attention import FEATURE_MAPS, feature_map
from dsattn.testing import assert_close, non_contiguous, poisoned, tolerance


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


# ---------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("fmap", sorted(FEATURE_MAPS))
@pytest.mark.parametrize(
    "sq,sk,prefix,window",
    [(13, 13, 3, 4), (13, 13, 0, 0), (13, 13, 0, 5), (13, 13, 5, 0), (13, 13, 20, 2), (6, 13, 4, 3), (16, 11, 2, 2)],
)
def test_reference_matches_brute_force_float64(fmap, sq, sk, prefix, window):
    q, k, v = _qkv(1, 4, 2, sq, sk, 5, 3, torch.float64)
    expected = _brute_force(q, k, v, prefix, window, fmap)
    # a small chunk so several query chunks, the state carry and the tail product all run
    actual = hybrid_reference(q, k, v, prefix=prefix, window=window, feature_map=fmap, chunk=4)
    assert_close(actual, expected, 1e-10)


def test_reference_equals_causal_softmax_when_all_keys_exact():
    q, k, v = _qkv(2, 4, 2, 40, 40, 8, 6, torch.float64)
    expected = _causal_softmax(q, k, v)
    assert_close(hybrid_reference(q, k, v, prefix=40, chunk=16), expected, 1e-10)
    assert_close(hybrid_reference(q, k, v, prefix=0, window=40, chunk=16), expected, 1e-10)


def test_reference_rows_without_keys_and_linear_only_rows():
    q, k, v = _qkv(1, 2, 2, 9, 5, 4, 4, torch.float64)  # Sq > Sk: the first 4 rows see no key
    out = hybrid_reference(q, k, v, prefix=0, window=0, feature_map="elu")
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))
    assert_close(out, _brute_force(q, k, v, 0, 0, "elu"), 1e-10)
    # prefix = window = 0: no exact key anywhere, normalized causal linear attention
    phi_q, phi_k = feature_map(q, "elu"), feature_map(k, "elu")
    a = (phi_q @ phi_k.transpose(-1, -2)).tril(5 - 9)
    assert_close(out[:, :, 4:], ((a @ v) / a.sum(-1, keepdim=True))[:, :, 4:], 1e-10)
    # relu features that never overlap: the far denominator is exactly 0 -> zero rows, not NaN
    q, k = q.abs(), -k.abs()
    out = hybrid_reference(q, k, v, prefix=0, window=0, feature_map="relu")
    assert torch.equal(out, torch.zeros_like(out))


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
    launch(q, k, v, feature_map(q, "elu"), feature_map(k, "elu"), prefix=3, window=4, scale=0.25, out=out)
    assert_close(out, hybrid_reference(q, k, v, prefix=3, window=4, scale=0.25), 1e-5)


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
        hybrid_attention(q, k, v, backend="cpp")


def test_triton_rejects_what_it_cannot_run(triton_device):
    q, k, v = _qkv(1, 1, 1, 4, 4, 8, 8, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        hybrid_attention(q, k, v, backend="triton")
    q, k, v = _qkv(1, 1, 1, 4, 4, 8, 320)
    with pytest.raises(ValueError, match="head dims up to"):
        hybrid_attention(q, k, v, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_long_sequence(dtype):
    q, k, v = _qkv(1, 8, 2, 4099, 4099, 128, 128, dtype, "cuda")
    expected = hybrid_reference(q, k, v, prefix=1000, window=300)
    assert_close(hybrid_attention(q, k, v, prefix=1000, window=300, backend="triton"), expected, tolerance(dtype))
