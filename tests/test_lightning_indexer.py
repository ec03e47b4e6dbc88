"""lightning_indexer_topk: streaming reference vs brute force (float64), index sets, padding, bad input."""

import pytest
import torch

import dsattn
from dsattn.reference import lightning_indexer as ref


def brute_force(q_idx, k_idx, weights, top_k, scale, causal):
    """Full score matrix by loops over heads, then a sort: [B, Sq, top_k] index sets and their scores."""
    b, sq, hi, d = q_idx.shape
    sk = k_idx.shape[1]
    scores = torch.zeros(b, sq, sk, dtype=torch.float64)
    for h in range(hi):
        s = torch.relu(scale * q_idx[:, :, h].double() @ k_idx.double().transpose(1, 2))
        scores += weights[:, :, h, None].double() * s
    if causal:
        pos = torch.arange(sq)[:, None] + (sk - sq)
        scores = scores.masked_fill(torch.arange(sk)[None, :] > pos, float("-inf"))
    return scores


def check_against_brute_force(got, scores, top_k):
    b, sq, sk = scores.shape
    for bi in range(b):
        for i in range(sq):
            row = scores[bi, i]
            visible = int(torch.isfinite(row).sum())
            n = min(top_k, visible)
            chosen = got[bi, i]
            assert (chosen[n:] == -1).all(), (bi, i, chosen)
            sel = chosen[:n].long()
            assert len(set(sel.tolist())) == n and (sel >= 0).all()
            # The chosen scores are the n largest (as a multiset: robust to ties), highest first.
            expect = row.sort(descending=True).values[:n]
            assert torch.allclose(row[sel].sort(descending=True).values, expect)
            assert (row[sel][:-1] >= row[sel][1:]).all()


@pytest.mark.parametrize(
    "b,sq,sk,hi,d,top_k,causal",
    [(1, 1, 1, 1, 4, 1, True), (2, 17, 17, 3, 8, 7, True), (1, 9, 40, 2, 16, 64, True), (2, 13, 29, 4, 8, 5, False),
     (1, 33, 33, 2, 8, 33, True)],
)
def test_reference_equals_brute_force(b, sq, sk, hi, d, top_k, causal):
    q = torch.randn(b, sq, hi, d, dtype=torch.float64)
    k = torch.randn(b, sk, d, dtype=torch.float64)
    w = torch.randn(b, sq, hi, dtype=torch.float64)
    scale = d**-0.5
    # Small chunks so the running top-k merge across key chunks and query chunks is exercised.
    got = ref.lightning_indexer_topk(q, k, w, top_k, scale=scale, causal=causal, query_chunk=5, key_chunk=6)
    assert got.dtype == torch.int32 and got.shape == (b, sq, top_k)
    check_against_brute_force(got, brute_force(q, k, w, top_k, scale, causal), top_k)


def test_public_op_matches_reference_and_pads_rows_with_few_visible_keys():
    q, k, w = torch.randn(1, 20, 2, 8), torch.randn(1, 20, 8), torch.rand(1, 20, 2)
    got = dsattn.lightning_indexer_topk(q, k, w, 2048)
    assert got.shape == (1, 20, 2048)
    assert (got[0, 0, 1:] == -1).all() and got[0, 0, 0] == 0  # query 0 sees only key 0
    assert ((got[0, 19] >= 0).sum()) == 20
    check_against_brute_force(got, brute_force(q, k, w, 2048, 8**-0.5, True), 2048)


def test_non_contiguous_inputs():
    q = torch.randn(2, 4, 11, 8).transpose(1, 2)  # [B, Sq, Hi, D] strided
    k = torch.randn(2, 8, 11).transpose(1, 2)
    w = torch.randn(2, 4, 11).transpose(1, 2)
    got = dsattn.lightning_indexer_topk(q, k, w, 5)
    check_against_brute_force(got, brute_force(q, k, w, 5, 8**-0.5, True), 5)


def test_streaming_never_holds_the_score_matrix(monkeypatch):
    """Every score block the reference computes is at most query_chunk x key_chunk x Hi: O(S x top_k)
    working memory for long S, never [B, Sq, Hi, Sk]."""
    seen = []
    real = ref.indexer_scores

    def spy(q_idx, k_idx, weights, scale, relu=True):
        seen.append((q_idx.shape[1], k_idx.shape[1]))
        return real(q_idx, k_idx, weights, scale, relu=relu)

    monkeypatch.setattr(ref, "indexer_scores", spy)
    sq = 3000
    ref.lightning_indexer_topk(torch.randn(1, sq, 2, 4), torch.randn(1, sq, 4), torch.rand(1, sq, 2), 16,
                               query_chunk=256, key_chunk=512)
    assert seen and max(c_q for c_q, _ in seen) <= 256 and max(c_k for _, c_k in seen) <= 512


def test_bad_input_is_named():
    q, k, w = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 8), torch.rand(1, 4, 2)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        dsattn.lightning_indexer_topk(q, k, w, 0)
    with pytest.raises(ValueError, match="q_idx must be 4-D"):
        dsattn.lightning_indexer_topk(q[0], k, w, 2)
    with pytest.raises(ValueError, match="k_idx must be"):
        dsattn.lightning_indexer_topk(q, torch.randn(1, 4, 7), w, 2)
    with pytest.raises(ValueError, match="weights must be"):
        dsattn.lightning_indexer_topk(q, k, torch.rand(1, 4, 3), 2)
    with pytest.raises(TypeError, match="top_k must be an int"):
        dsattn.lightning_indexer_topk(q, k, w, 2.0)
    with pytest.raises(TypeError, match="k_idx must have dtype"):
        dsattn.lightning_indexer_topk(q, k.int(), w, 2)
    with pytest.raises(ValueError, match="backend='triton' is not implemented"):
        dsattn.lightning_indexer_topk(q, k, w, 2, backend="triton")
