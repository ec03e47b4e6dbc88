"""topk_sparse_attention: reference vs brute force (float64), dense equality when top_k >= Sk, the Triton path
(indexer kernel selection + sparse attention kernel; interpreter here) vs brute force and the reference, bad
input."""

import pytest
import torch

import dsattn
from dsattn.testing import assert_close, non_contiguous, tolerance



def brute_force(q, k, v, top_k, scale, causal):
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    out = torch.zeros(b, hq, sq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh, vh = k[bi, h // (hq // hkv)].double(), v[bi, h // (hq // hkv)].double()
            for i in range(sq):
                s = scale * kh @ q[bi, h, i].double()
                if causal:
                    s[max(0, i + sk - sq + 1):] = float("-inf")
                keep = s.topk(min(top_k, sk)).indices
                keep = keep[torch.isfinite(s[keep])]
                p = torch.softmax(s[keep], 0)
                out[bi, h, i] = p @ vh[keep]
    return out


@pytest.mark.parametrize("hq,hkv,sq,sk,top_k,causal", [(2, 2, 9, 9, 3, True), (4, 2, 7, 15, 5, True),
                                                        (2, 1, 6, 11, 4, False), (3, 3, 1, 12, 1, True),
                                                        (2, 1, 6, 4, 6, False)])  # Sk <= top_k: no selection
def test_reference_equals_brute_force(hq, hkv, sq, sk, top_k, causal):
    q = torch.randn(2, hq, sq, 8, dtype=torch.float64)
    k = torch.randn(2, hkv, sk, 8, dtype=torch.float64)
    v = torch.randn(2, hkv, sk, 6, dtype=torch.float64)
    got = dsattn.topk_sparse_attention(q, k, v, top_k, causal=causal, backend="torch")
    assert_close(got, brute_force(q, k, v, top_k, 8**-0.5, causal), 1e-10)


@pytest.mark.parametrize("sq,sk", [(9, 6), (5, 17)])
def test_reference_in_small_chunks_and_rows_without_visible_keys(sq, sk):
    """Chunks of 1-2 query rows (the causal key bound per chunk), GQA, Dqk != Dv; with Sq > Sk the first causal
    rows see no key and are zeros."""
    from dsattn.reference.topk_sparse_attention import topk_sparse_attention as reference

    q = torch.randn(2, 4, sq, 8, dtype=torch.float64)
    k = torch.randn(2, 2, sk, 8, dtype=torch.float64)
    v = torch.randn(2, 2, sk, 5, dtype=torch.float64)
    got = reference(q, k, v, 3, causal=True, scale=0.3, chunk_elements=2 * 4 * sk * 2)
    expected = brute_force(q, k, v, 3, 0.3, True)
    assert_close(got, expected, 1e-10)
    if sq > sk:
        assert got[:, :, : sq - sk].abs().max() == 0


def test_top_k_at_least_sk_is_dense_causal_attention():
    q, k, v = torch.randn(1, 4, 13, 8, dtype=torch.float64), torch.randn(1, 2, 13, 8, dtype=torch.float64), \
        torch.randn(1, 2, 13, 5, dtype=torch.float64)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             is_causal=True)
    assert_close(dsattn.topk_sparse_attention(q, k, v, 13), dense, 1e-10)
    assert_close(dsattn.topk_sparse_attention(q, k, v, 500), dense, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_path_equals_reference(triton_device, dtype):
    q = torch.randn(1, 4, 17, 16, device=triton_device, dtype=dtype)
    k = torch.randn(1, 2, 17, 16, device=triton_device, dtype=dtype)
    v = torch.randn(1, 2, 17, 8, device=triton_device, dtype=dtype)
    expected = dsattn.topk_sparse_attention(q, k, v, 7, backend="torch")
    got = dsattn.topk_sparse_attention(non_contiguous(q), non_contiguous(k), non_contiguous(v), 7, backend="triton")
    assert_close(got, expected, tolerance(dtype))


@pytest.mark.parametrize("hq,hkv,sq,sk,top_k,causal", [(4, 2, 7, 15, 5, True), (2, 1, 6, 11, 4, False),
                                                        (3, 3, 1, 40, 9, True), (2, 2, 9, 9, 50, True)])
def test_triton_path_equals_brute_force(triton_device, hq, hkv, sq, sk, top_k, causal):
    """GQA, non-causal, decode (Sq < Sk) and top_k >= Sk (dense) through the Triton selection, fp32."""
    q = torch.randn(2, hq, sq, 16, device=triton_device)
    k = torch.randn(2, hkv, sk, 16, device=triton_device)
    v = torch.randn(2, hkv, sk, 8, device=triton_device)
    got = dsattn.topk_sparse_attention(q, k, v, top_k, causal=causal, backend="triton")
    assert_close(got, brute_force(q.cpu(), k.cpu(), v.cpu(), top_k, 16**-0.5, causal), tolerance(torch.float32))


def test_triton_selection_is_the_indexer_kernel(triton_device, monkeypatch):
    """backend="triton" selects with the Triton indexer kernel, not the torch streaming top-k."""
    import sys

    from dsattn.triton_kernels import lightning_indexer_topk as kernel

    calls = []
    real = kernel.indexer_topk
    monkeypatch.setattr(kernel, "indexer_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(sys.modules["dsattn.ops.topk_sparse_attention"], "topk_indices",
                        lambda *a, **kw: pytest.fail("torch selection used"))
    q, k, v = (torch.randn(1, 2, 5, 16, device=triton_device) for _ in range(3))
    dsattn.topk_sparse_attention(q, k, v, 3, backend="triton")
    assert calls


def test_bad_input_is_named():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        dsattn.topk_sparse_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        dsattn.topk_sparse_attention(torch.randn(1, 3, 4, 8), k, v, 2)
    with pytest.raises(TypeError, match="causal must be a bool"):
        dsattn.topk_sparse_attention(q, k, v, 2, causal=None)
    with pytest.raises(ValueError, match="backend='cuda' is not implemented"):
        dsattn.topk_sparse_attention(q, k, v, 2, backend="cuda")
