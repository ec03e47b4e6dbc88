"""torch.ops.dsattn_C.topk_select (radix-select top-k: CPU twin here, CUDA kernel on a GPU) against a float64
stable-sort reference (indices exact: ties go to the lower index), and lightning_indexer_topk's "cpp"/"cuda"
backends (top_k > 2048) against its torch backend (the streaming top-k)."""

import importlib
import pytest
import torch

import dsattn
from dsattn._backend import unusable_reason

requires_cpp = pytest.mark.skipif(unusable_reason("cpp", torch.device("cpu"), "topk_select") is not None,
                                  reason="dsattn._C with topk_select is not built")


def expected_topk(scores, lengths, k):
    """Per row, the valid columns ordered by (NaN last, score descending, index ascending), first k, -1 padded."""
    rows, cols = scores.shape
    out = torch.full((rows, k), -1, dtype=torch.int32)
    for r in range(rows):
        n = cols if lengths is None else max(0, min(int(lengths[r]), cols))
        v = scores[r, :n].double().cpu()
        nan = torch.isnan(v)
        by_score = torch.sort(torch.where(nan, float("inf"), -v), stable=True).indices
        order = by_score[torch.sort(nan[by_score].int(), stable=True).indices][:k]
        out[r, : order.numel()] = order.int()
    return out


def _lengths(rows, cols, k, gen):
    """Mixed row lengths: full, shorter than k, 0, beyond T (clamped), random."""
    picks = [cols, min(cols, max(0, k - 1)), 0, cols + 5] + torch.randint(0, cols + 1, (rows,), generator=gen).tolist()
    return torch.tensor(picks[:rows], dtype=torch.int32)


CASES = [(3, 1000, 1), (4, 1000, 7), (5, 999, 999), (4, 37, 50), (6, 4097, 2500), (4, 5001, 4096), (2, 1, 1)]


@requires_cpp
@pytest.mark.parametrize("rows,cols,k", CASES)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_cpu_matches_stable_sort(rows, cols, k, with_lengths):
    gen = torch.Generator().manual_seed(rows * cols + k)
    scores = torch.randn(rows, cols, generator=gen)
    lengths = _lengths(rows, cols, k, gen) if with_lengths else None
    got = torch.ops.dsattn_C.topk_select(scores, lengths, k)
    assert got.dtype == torch.int32 and got.shape == (rows, k)
    assert torch.equal(got, expected_topk(scores, lengths, k))


@requires_cpp
@pytest.mark.parametrize("levels", [1, 3, 50])
def test_cpu_many_ties_take_the_lower_index(levels):
    gen = torch.Generator().manual_seed(levels)
    scores = torch.randint(0, levels, (5, 3001), generator=gen).float() * 0.25 - 0.5  # negative, zero, positive
    lengths = torch.tensor([3001, 2999, 100, 0, 2048], dtype=torch.int32)
    for k in (1, 7, 2048, 2999, 4096):
        assert torch.equal(torch.ops.dsattn_C.topk_select(scores, lengths, k), expected_topk(scores, lengths, k)), k


@requires_cpp
def test_cpu_strided_and_misaligned_rows():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(6, 2 * 3000 + 13, generator=gen)
    for scores in (base[:, 1:3001], base[::2, 5:2998], base[1:, 7:3006]):
        assert scores.stride(-1) == 1
        lengths = _lengths(scores.shape[0], scores.shape[1], 2500, gen)
        assert torch.equal(torch.ops.dsattn_C.topk_select(scores, lengths, 2500), expected_topk(scores, lengths, 2500))


@requires_cpp
def test_cpu_non_finite_scores_nan_ranks_last():
    scores = torch.tensor([[1.0, float("nan"), float("-inf"), float("inf"), -0.0, 0.0, -2.0, float("nan")]])
    got = torch.ops.dsattn_C.topk_select(scores, None, 10)
    # -0.0 ranks below +0.0 (their bits differ; the kernels order bit patterns); NaN below -inf, ties by index.
    assert got.tolist() == [[3, 0, 5, 4, 6, 2, 1, 7, -1, -1]]
    assert torch.ops.dsattn_C.topk_select(scores, None, 3).tolist() == [[3, 0, 5]]


@requires_cpp
def test_cpu_bad_input_is_named():
    s = torch.randn(3, 10)
    with pytest.raises(TypeError, match="scores must be float32"):
        torch.ops.dsattn_C.topk_select(s.double(), None, 2)
    with pytest.raises(ValueError, match="scores must be 2-D"):
        torch.ops.dsattn_C.topk_select(s[0], None, 2)
    with pytest.raises(ValueError, match="contiguous last dim"):
        torch.ops.dsattn_C.topk_select(s.t(), None, 2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        torch.ops.dsattn_C.topk_select(s, None, 0)
    with pytest.raises(TypeError, match="lengths must be int32"):
        torch.ops.dsattn_C.topk_select(s, torch.tensor([1, 2, 3]), 2)
    with pytest.raises(ValueError, match="lengths must be"):
        torch.ops.dsattn_C.topk_select(s, torch.tensor([1, 2], dtype=torch.int32), 2)


# ------------------------------------------------------------------------------------- lightning_indexer_topk


def _indexer_inputs(b, sq, sk, hi, d, dtype=torch.float32, device="cpu"):
    q = torch.randn(b, sq, hi, d, dtype=dtype, device=device)
    k = torch.randn(b, sk, d, dtype=dtype, device=device)
    w = torch.randn(b, sq, hi, device=device) * hi**-0.5
    return q, k, w


def _same_selection(got, want, q, k, w, causal):
    """Same -1 padding, distinct indices, and the chosen scores equal the reference's as sorted multisets (ties
    among equal scores may pick different keys). Scores are recomputed in float64 per row."""
    from dsattn.reference.lightning_indexer_topk import indexer_scores

    got, want = got.cpu(), want.cpu()
    assert torch.equal(got < 0, want < 0)
    b, sq = got.shape[:2]
    sk = k.shape[1]
    scores = indexer_scores(q.double().cpu(), k.double().cpu(), w.double().cpu(), q.shape[-1] ** -0.5)
    for bi in range(b):
        for i in range(sq):
            n = int((got[bi, i] >= 0).sum())
            sel, ref_sel = got[bi, i, :n].long(), want[bi, i, :n].long()
            assert len(set(sel.tolist())) == n
            if causal and n:
                assert int(sel.max()) <= i + sk - sq
            row = scores[bi, i]
            atol = 1e-4 * max(1.0, float(row.abs().max()))
            assert torch.allclose(row[sel], row[ref_sel].sort(descending=True).values, rtol=0, atol=atol), (bi, i)


@requires_cpp
@pytest.mark.parametrize("sq,sk,top_k,causal", [(6, 5000, 4096, True), (5, 5000, 2500, True),
                                                 (3, 4500, 2500, False), (40, 300, 512, True),
                                                 (12, 5, 3, True)])
def test_indexer_cpp_matches_torch(sq, sk, top_k, causal):
    q, k, w = _indexer_inputs(2, sq, sk, 4, 16)
    got = dsattn.lightning_indexer_topk(q, k, w, top_k, causal=causal, backend="cpp")
    want = dsattn.lightning_indexer_topk(q, k, w, top_k, causal=causal, backend="torch")
    assert got.dtype == torch.int32 and got.shape == want.shape
    _same_selection(got, want, q, k, w, causal)


@requires_cpp
def test_indexer_cpp_strided_half_inputs():
    q, _, w = _indexer_inputs(1, 4, 3000, 4, 16, torch.bfloat16)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k = torch.randn(1, 3000, 32, dtype=torch.bfloat16)[..., ::2]  # strided key rows
    got = dsattn.lightning_indexer_topk(q, k, w, 2100, backend="cpp")
    want = dsattn.lightning_indexer_topk(q, k, w, 2100, backend="torch")
    _same_selection(got, want, q.float(), k.float(), w, True)


def test_indexer_compiled_backends_are_named():
    q, k, w = _indexer_inputs(1, 4, 8, 2, 8)
    with pytest.raises(ValueError, match="backend='cuda' cannot run here"):
        dsattn.lightning_indexer_topk(q, k, w, 4, backend="cuda")
    with pytest.raises(TypeError, match="backend='cpp' takes float16, bfloat16, float32 inputs, got float64"):
        dsattn.lightning_indexer_topk(q.double(), k.double(), w, 4, backend="cpp")


# ------------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("rows,cols,k", CASES + [(8, 131072, 4096), (3, 131072, 16384), (5, 65537, 2049)])
@pytest.mark.parametrize("ties", [False, True])
def test_cuda_matches_cpu_twin(rows, cols, k, ties):
    if unusable_reason("cuda", torch.device("cuda"), "topk_select") is not None:
        pytest.skip("dsattn._C_cuda with topk_select is not built")
    gen = torch.Generator().manual_seed(cols + k)
    scores = torch.randn(rows, cols + 3, generator=gen)
    if ties:
        scores = scores.mul(2).round()
    for view in (scores[:, :cols], scores[:, 1 : cols + 1]):  # aligned (float4 loads) and misaligned rows
        lengths = _lengths(rows, cols, k, gen)
        for lens in (None, lengths):
            want = torch.ops.dsattn_C.topk_select(view, lens, k)
            got = torch.ops.dsattn_C.topk_select(view.cuda(), None if lens is None else lens.cuda(), k)
            assert torch.equal(got.cpu(), want), (rows, cols, k, ties)


@pytest.mark.gpu
@pytest.mark.parametrize("sq,sk,top_k", [(64, 8192, 4096), (3, 20000, 16384)])
def test_indexer_cuda_matches_cpp(sq, sk, top_k):
    if unusable_reason("cuda", torch.device("cuda"), "topk_select") is not None:
        pytest.skip("dsattn._C_cuda with topk_select is not built")
    q, k, w = _indexer_inputs(1, sq, sk, 8, 32, device="cuda")
    got = dsattn.lightning_indexer_topk(q, k, w, top_k)  # auto: cuda beyond the Triton kernel's 2048
    want = dsattn.lightning_indexer_topk(q.cpu(), k.cpu(), w.cpu(), top_k, backend="cpp")
    _same_selection(got, want, q, k, w, True)


@requires_cpp
def test_auto_on_cpu_takes_cpp_from_256_keys(monkeypatch):
    from dsattn import _backend

    op = importlib.import_module("dsattn.ops.lightning_indexer_topk")
    monkeypatch.delenv("DSATTN_BACKEND", raising=False)
    q, k, w = _indexer_inputs(1, 2, 2600, 2, 8)

    def chosen(*args):
        with _backend.recording() as ran:
            dsattn.lightning_indexer_topk(*args)
        return ran["lightning_indexer_topk"]

    assert chosen(q, k, w, 2049) == {"cpp"}
    assert chosen(q, k, w, op.CPP_FROM_TOP_K) == {"cpp"}
    assert chosen(q, k, w, op.CPP_FROM_TOP_K - 1) == {"torch"}  # few keys per row: torch
    assert chosen(q, k[:, :200], w, 4096) == {"torch"}  # min(top_k, Sk) < 256
    assert chosen(q.double(), k.double(), w, 2049) == {"torch"}  # float64: the torch reference
