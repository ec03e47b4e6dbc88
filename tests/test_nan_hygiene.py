"""NaN hygiene (issue 16): keys and values a query row cannot see never enter its arithmetic. NaN and Inf are
planted in the K and V rows of keys outside rows' visible sets (outside the window, causally hidden, not
listed, listed only as a future key, not selected by top-k, out of range behind a view); the rows that cannot
see them are finite and equal the oracle on the clean inputs, and so are their q gradients. Where every row
is blind to the poison (a prefix before every window, keys no row lists or selects), the gradients of q, k
and v are finite and equal float64 autograd of the oracle on the clean inputs everywhere; at the poisoned
rows that is zero (no row sees them). Rows that do see the poison are not finite (it is not dropped).

Backends: the torch backends of sliding_window_attention (+ sinks, varlen, decode), sparse_attention (both
strategies) and topk_sparse_attention, and the Triton sparse-attention kernel (interpreter on CPU; forward,
training forward's lse and backward), which topk_sparse_attention's Triton path runs too."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dsattn
from dsattn.reference.sliding_window_attention import sliding_window_attention as sliding_ref
from dsattn.reference.sliding_window_attention import sliding_window_attention_varlen as sliding_varlen_ref
from dsattn.reference.sliding_window_attention import visible_mask
from dsattn.reference.sparse_attention import listing_counts
from dsattn.reference.sparse_attention import sparse_attention as sparse_ref
from dsattn.reference.topk_sparse_attention import selected_mask
from dsattn.reference.topk_sparse_attention import topk_sparse_attention as topk_ref
from dsattn.testing import assert_close
from dsattn.torch_backend import sliding_window_attention as sliding_torch
from dsattn.torch_backend import sparse_attention as sparse_torch
from dsattn.torch_backend import topk_sparse_attention as topk_torch

RTOL = 1e-5  # float32 inputs against the float64 oracle
POISON = (float("nan"), float("inf"), float("-inf"))


def _qkv(b, hq, hkv, sq, sk, dqk, dv, device="cpu"):
    return (torch.randn(b, hq, sq, dqk, device=device), torch.randn(b, hkv, sk, dqk, device=device),
            torch.randn(b, hkv, sk, dv, device=device))


def _poison(k, v, keys):
    """Copies of k [B, Hkv, Sk, Dqk] / v with one NaN or +-Inf entry in the K and V rows of keys (bool
    [B, Hkv, Sk]); a whole NaN V row for every third key."""
    k, v = k.clone(), v.clone()
    for n, (b, h, j) in enumerate(keys.nonzero().tolist()):
        k[b, h, j, n % k.shape[-1]] = POISON[n % 3]
        if n % 3 == 2:
            v[b, h, j] = float("nan")
        else:
            v[b, h, j, (n + 1) % v.shape[-1]] = POISON[(n + 1) % 3]
    return k, v


def _check(run, oracle, q, k, v, poisoned, sees, *, grads=True, reaches=True, nan_rows=False, rtol=RTOL):
    """run(q, k, v) -> out (or (out, lse)) on the poisoned k/v against oracle(q, k, v) in float64 on the clean
    ones. poisoned: bool [B, Hkv, Sk]; sees: bool broadcastable to [B, Hq, Sq, Sk], the keys each row sees.
    Clean rows (seeing no poisoned key) must be finite and equal, their q gradients too; when every row is
    clean, every gradient (zero at the poisoned keys). reaches: every row that sees the poison is not finite
    (as the oracle's: each poisoned key's value holds a NaN / Inf). nan_rows (the torch backends): those rows
    are NaN, and so are their q gradients."""
    b, hq, sq = q.shape[:3]
    hkv, sk = k.shape[1], k.shape[2]
    sees = sees.expand(b, hq, sq, sk)
    clean = ~(sees & poisoned.repeat_interleave(hq // hkv, 1)[:, :, None, :]).any(-1)  # [B, Hq, Sq]
    bad_k, bad_v = _poison(k, v, poisoned)
    leaves = [t.detach().clone().requires_grad_(grads) for t in (q, bad_k, bad_v)]
    ref_leaves = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    got, ref = run(*leaves), oracle(*ref_leaves)
    if isinstance(got, tuple):  # (out, lse): the clean rows' lse too (-inf: a row without a key)
        (got, lse), (ref, ref_lse) = got, ref
        keyed = clean & torch.isfinite(ref_lse)
        assert keyed.any() and torch.isfinite(lse[keyed]).all()
        assert_close(lse[keyed], ref_lse[keyed], rtol, name="lse of clean rows")
        assert (lse[clean & ~keyed] == float("-inf")).all()
    assert torch.isfinite(got[clean]).all(), "a hidden NaN / Inf reached a row"
    assert_close(got[clean], ref[clean], rtol, name="clean rows")
    assert clean.any()
    if reaches:
        assert (~torch.isfinite(got[~clean])).any(-1).all(), "a row that sees the poison lost it"
    if nan_rows:
        assert torch.isnan(got[~clean]).all()
    if not grads:
        return
    cot = torch.randn(ref.shape, dtype=torch.float64)
    g = torch.autograd.grad(got, leaves, cot.to(got.dtype))
    r = torch.autograd.grad(ref, ref_leaves, cot)
    assert torch.isfinite(g[0][clean]).all()
    assert_close(g[0][clean], r[0][clean], rtol, name="dq of clean rows")
    if nan_rows:
        assert torch.isnan(g[0][~clean]).all()
    if clean.all():
        for name, gi, ri in (("dq", g[0], r[0]), ("dk", g[1], r[1]), ("dv", g[2], r[2])):
            assert_close(gi, ri, rtol, name=name)
        assert (g[1][poisoned] == 0).all() and (g[2][poisoned] == 0).all()


def _keys(b, hkv, sk, positions):
    keys = torch.zeros(b, hkv, sk, dtype=torch.bool)
    keys[:, :, positions] = True
    return keys


# --------------------------------------------------------------------------------------- sliding window
def _sliding(backend, window, causal, sinks=None, chunk_size=None):
    def run(q, k, v):
        if chunk_size is None:
            return dsattn.sliding_window_attention(q, k, v, window, causal=causal, sinks=sinks, backend=backend)
        return _SlidingChunks.apply(q, k, v, window, causal, sinks, chunk_size)
    return run


class _SlidingChunks(torch.autograd.Function):
    """The torch backend with a forced chunk size (several chunks on test shapes), forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, window, causal, sinks, chunk_size):
        ctx.save_for_backward(q, k, v)
        ctx.args = (window, causal, sinks, chunk_size)
        return sliding_torch.sliding_window_attention(q, k, v, window, causal=causal, sinks=sinks,
                                                      chunk_size=chunk_size)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        window, causal, sinks, chunk_size = ctx.args
        dq, dk, dv, _ = sliding_torch.sliding_window_attention_backward(
            grad_out, q, k, v, window, causal=causal, scale=q.shape[-1] ** -0.5, sinks=sinks, chunk_size=chunk_size)
        return dq, dk, dv, None, None, None, None


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("causal,with_sinks", [(True, False), (True, True), (False, False)])
def test_sliding_window_torch(causal, with_sinks, chunk_size):
    b, hq, hkv, sq, sk, window = 2, 6, 2, 23, 37, 5
    q, k, v = _qkv(b, hq, hkv, sq, sk, 16, 12)
    sinks = torch.randn(hq) if with_sinks else None
    run = _sliding("torch", window, causal, sinks, chunk_size)

    def oracle(q, k, v):
        return sliding_ref(q, k, v, window, causal=causal, sinks=None if sinks is None else sinks.double())
    sees = visible_mask(sq, sk, window, causal)
    # Before every row's window (the first row sits at 14): every row blind, all gradients checked.
    _check(run, oracle, q, k, v, _keys(b, hkv, sk, [0, 3, 9]), sees)
    # Inside the rows' spans: hidden from most rows of a chunk, seen by a few.
    poisoned = _keys(b, hkv, sk, [18, 29])
    poisoned[1, 0, 18] = False
    _check(run, oracle, q, k, v, poisoned, sees, nan_rows=True)


def test_sliding_window_torch_decode():
    """One query row over a long cache: everything before its window is poisoned."""
    q, k, v = _qkv(1, 4, 1, 1, 300, 32, 32)
    window = 17
    _check(_sliding("torch", window, True), lambda q, k, v: sliding_ref(q, k, v, window), q, k, v,
           _keys(1, 1, 300, slice(0, 300 - window)), visible_mask(1, 300, window, True))


def test_sliding_window_torch_varlen():
    """Packed sequences: keys of another sequence, before a row's window or (a sequence without query rows)
    seen by no row never reach it; a poisoned key inside a window reaches only the rows that see it."""
    lens_q, lens_k, window, hq, hkv = [9, 0, 14, 1], [15, 6, 14, 20], 4, 4, 2
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lens_q), hq, 16)
    k, v = torch.randn(sum(lens_k), hkv, 16), torch.randn(sum(lens_k), hkv, 8)
    sees = torch.zeros(sum(lens_q), sum(lens_k), dtype=torch.bool)
    for s in range(len(lens_q)):
        sees[cu_q[s]:cu_q[s + 1], cu_k[s]:cu_k[s + 1]] = visible_mask(lens_q[s], lens_k[s], window, True)

    def run(q, k, v):  # [total, H, D] as [1, H, total, D] for the checker
        return dsattn.sliding_window_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1),
                                                      v[0].transpose(0, 1), cu_q, cu_k, max(lens_q), max(lens_k),
                                                      window, backend="torch").transpose(0, 1)[None]

    def oracle(q, k, v):
        return sliding_varlen_ref(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_q, cu_k,
                                  max(lens_q), max(lens_k), window).transpose(0, 1)[None]
    as_bhsd = [t.transpose(0, 1)[None] for t in (q, k, v)]
    blind = [0, 2, 15, 18, 35, 40, 50]  # seq 0 before its rows' windows, seq 1 (no rows), seq 3 before its row's
    _check(run, oracle, *as_bhsd, _keys(1, hkv, sum(lens_k), blind), sees)
    _check(run, oracle, *as_bhsd, _keys(1, hkv, sum(lens_k), [8, 28]), sees, nan_rows=True)


# ----------------------------------------------------------------------------------------------- sparse
def _indices(b, sq, sk, topk, never, *, hidden_future=None):
    """int32 [B, Sq, topk]: random distinct keys outside `never`, some -1; with hidden_future=(key, rows) that
    key is listed by those rows only (causally after them)."""
    allowed = torch.ones(sk, dtype=torch.bool)
    allowed[never] = False
    pool = allowed.nonzero().squeeze(1)
    idx = torch.stack([pool[torch.randperm(pool.numel())[:topk]] for _ in range(b * sq)]).view(b, sq, topk)
    idx = torch.where(torch.rand(idx.shape) < 0.2, -1, idx)
    if hidden_future is not None:
        key, rows = hidden_future
        idx = torch.where(idx == key, -1, idx)
        idx[:, rows, 0] = key
    return idx.to(torch.int32)


def _sparse_sees(indices, hq, sk, causal):
    return listing_counts(indices, hq, sk, causal) > 0


class _SparseTorch(torch.autograd.Function):
    """The torch backend with a forced strategy in chunks of 3 rows, forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, indices, causal, strategy):
        ctx.save_for_backward(q, k, v, indices)
        ctx.args = (causal, strategy)
        return sparse_torch.sparse_attention(q, k, v, indices, causal=causal, chunk_size=3, strategy=strategy)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, indices = ctx.saved_tensors
        causal, strategy = ctx.args
        grads = sparse_torch.sparse_attention_backward(grad_out, q, k, v, indices, causal=causal,
                                                       scale=q.shape[-1] ** -0.5, chunk_size=3, strategy=strategy)
        return *grads, None, None, None


def _sparse_runs(backend, indices, causal):
    if backend in ("gather", "dense"):
        return lambda q, k, v: _SparseTorch.apply(q, k, v, indices, causal, backend)
    return lambda q, k, v: dsattn.sparse_attention(q, k, v, indices, causal=causal, backend=backend)


@pytest.fixture(params=["gather", "dense", "triton"])
def sparse_backend(request):
    if request.param == "triton":
        request.getfixturevalue("triton_device")
    return request.param


@pytest.mark.parametrize("causal", [False, True])
def test_sparse_keys_no_row_sees(sparse_backend, causal):
    """Keys no row lists, and (causal) a key listed only by rows it comes after: every gradient checked."""
    b, hq, hkv, sq, sk = 2, 4, 2, 9, 29
    q, k, v = _qkv(b, hq, hkv, sq, sk, 16, 24)
    never = [2, 11, 27, 28]
    indices = _indices(b, sq, sk, 8, never, hidden_future=(27, [0, 3, 5]) if causal else None)
    _check(_sparse_runs(sparse_backend, indices, causal),
           lambda q, k, v: sparse_ref(q, k, v, indices, causal=causal), q, k, v,
           _keys(b, hkv, sk, never), _sparse_sees(indices, hq, sk, causal))


def test_sparse_keys_some_rows_see(sparse_backend):
    """Per-kv-head lists (GQA); a poisoned key listed by some rows: the others stay clean."""
    b, hq, hkv, sq, sk = 1, 6, 3, 11, 23
    q, k, v = _qkv(b, hq, hkv, sq, sk, 16, 16)
    indices = torch.stack([_indices(b, sq, sk, 6, []) for _ in range(hkv)], 1)  # [B, Hkv, Sq, T]
    seen = int(indices[0, 0, 4, 0].clamp(min=0))
    _check(_sparse_runs(sparse_backend, indices, True), lambda q, k, v: sparse_ref(q, k, v, indices, causal=True),
           q, k, v, _keys(b, hkv, sk, [seen, 22]), _sparse_sees(indices, hq, sk, True),
           nan_rows=sparse_backend == "dense")


def test_sparse_out_of_range_entries_behind_a_view(sparse_backend):
    """k / v are views of longer buffers whose rows past Sk are NaN; entries >= Sk are "no key" in the
    backends (the op rejects them, so this calls the backends directly)."""
    b, hq, hkv, sq, sk = 1, 4, 1, 7, 19
    q, k, v = _qkv(b, hq, hkv, sq, sk + 8, 16, 16)
    k[:, :, sk:], v[:, :, sk:] = float("nan"), float("inf")
    indices = _indices(b, sq, sk, 6, [])
    indices[:, :, -1] = sk + torch.arange(sq, dtype=torch.int32) % 8
    expected = sparse_ref(q.double(), k[:, :, :sk].double(), v[:, :, :sk].double(),
                          torch.where(indices >= sk, -1, indices))
    if sparse_backend == "triton":
        from dsattn.triton_kernels.sparse_attention import sparse_attention as launch

        got = launch(q, k[:, :, :sk], v[:, :, :sk], indices, causal=False, scale=16**-0.5)
    else:
        got = sparse_torch.sparse_attention(q, k[:, :, :sk], v[:, :, :sk], indices, chunk_size=3,
                                            strategy=sparse_backend)
    assert_close(got, expected, RTOL)


def test_sparse_triton_training_forward_lse(triton_device):
    """The training forward's base-2 log-sum-exp of rows that cannot see the poison."""
    from dsattn.triton_kernels.sparse_attention import sparse_attention_fwd_lse

    b, hq, hkv, sq, sk = 1, 4, 2, 8, 21
    q, k, v = _qkv(b, hq, hkv, sq, sk, 32, 16)
    indices = _indices(b, sq, sk, 7, [4], hidden_future=(20, [1, 2]))
    listed = _sparse_sees(indices, hq, sk, True)

    def oracle(q, k, v):
        scores = torch.einsum("bhsd,bhkd->bhsk", q, k.repeat_interleave(hq // hkv, 1)) * 32**-0.5
        counts = listing_counts(indices, hq, sk, True).double()
        lse = torch.logsumexp(torch.where(listed, scores + counts.log(), float("-inf")), -1) / math.log(2)
        return sparse_ref(q, k, v, indices, causal=True), lse
    _check(lambda q, k, v: sparse_attention_fwd_lse(q, k, v, indices, causal=True, scale=32**-0.5), oracle,
           q, k, v, _keys(b, hkv, sk, [4, 20]), listed, grads=False)


# ------------------------------------------------------------------------------------------------ top-k
def _topk_sees(q, k, top_k, causal):
    """The keys each row selects on the clean inputs (float64)."""
    sq, sk = q.shape[2], k.shape[2]
    kk = k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    scores = torch.einsum("bhsd,bhkd->bhsk", q.double(), kk)
    visible = (torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + sk - sq) if causal else \
        torch.ones(sq, sk, dtype=torch.bool)
    return selected_mask(scores, visible.expand_as(scores), top_k)


@pytest.fixture(params=["torch", "triton"])
def topk_backend(request):
    if request.param == "triton":
        request.getfixturevalue("triton_device")
    return request.param


@pytest.mark.parametrize("causal", [False, True])
def test_topk_values_no_row_selects(topk_backend, causal):
    """A key that scores last for every row (q leans on one direction, the key against it) and holds NaN / Inf
    in its value only: visible, never selected, so every gradient is checked."""
    b, hq, hkv, sq, sk, top_k = 1, 4, 2, 9, 26, 5
    q, k, v = _qkv(b, hq, hkv, sq, sk, 16, 16)
    q[..., 0] = q[..., 0].abs() + 4
    loser = 13
    k[:, :, loser, 0] = -40
    sees = _topk_sees(q, k, top_k, causal)
    assert not sees[..., loser].any()

    def run(q, k, v):
        return dsattn.topk_sparse_attention(q, k, v, top_k, causal=causal, backend=topk_backend)

    def poison_v_only(q, k_bad, v_bad):  # keep the loser's key finite (a NaN score would win the selection)
        return run(q, torch.where(torch.isfinite(k_bad), k_bad, k.detach()), v_bad)
    _check(poison_v_only, lambda q, k, v: topk_ref(q, k, v, top_k, causal=causal), q, k, v,
           _keys(b, hkv, sk, [loser]), sees)


def test_topk_causally_hidden_keys(topk_backend):
    """Poisoned future keys (K and V): the rows before them are finite and equal, their q gradients too (the
    rows after them may or may not select a NaN / Inf score: not checked)."""
    b, hq, hkv, sq, sk, top_k = 1, 4, 2, 10, 21, 4
    q, k, v = _qkv(b, hq, hkv, sq, sk, 16, 8)
    causal = visible_mask(sq, sk, sk, True)
    torch_backend = topk_backend == "torch"  # rows seeing a NaN / Inf key are NaN, whatever they select
    _check(lambda q, k, v: dsattn.topk_sparse_attention(q, k, v, top_k, backend=topk_backend),
           lambda q, k, v: topk_ref(q, k, v, top_k), q, k, v, _keys(b, hkv, sk, [16, 19]), causal,
           reaches=torch_backend, nan_rows=torch_backend)


def test_topk_torch_small_chunks():
    """Chunks of two rows: key 7 sits inside the first chunk's key span, hidden from its first row."""
    b, hq, hkv, sq, sk, top_k = 1, 2, 1, 9, 15, 3

    class Chunked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            ctx.save_for_backward(q, k, v)
            return topk_torch.topk_sparse_attention(q, k, v, top_k, chunk_elements=2 * hq * sk)

        @staticmethod
        def backward(ctx, grad_out):
            q, k, v = ctx.saved_tensors
            return topk_torch.topk_sparse_attention_backward(grad_out, q, k, v, top_k, causal=True,
                                                             scale=q.shape[-1] ** -0.5, chunk_elements=2 * hq * sk)
    q, k, v = _qkv(b, hq, hkv, sq, sk, 8, 8)
    _check(Chunked.apply, lambda q, k, v: topk_ref(q, k, v, top_k), q, k, v, _keys(b, hkv, sk, [7]),
           visible_mask(sq, sk, sk, True), nan_rows=True)


# ------------------------------------------------------------------------- the blocked sliding-window path
@pytest.mark.parametrize("causal,sq,sk,window", [(True, 45, 61, 7), (False, 50, 50, 9), (True, 70, 33, 8)])
def test_sliding_window_torch_blocked_path(causal, sq, sk, window, monkeypatch):
    """Finite K/V with a window well inside the keys take the blocked path (query blocks batched over unfold
    views of the keys: few large ops per call); forward, q/k/v/sinks gradients against float64 autograd of
    the oracle (GQA, odd sizes, Sq < Sk and Sq > Sk, a symmetric window, a strided q)."""
    from dsattn.testing import assert_grads_match, non_contiguous

    calls = []
    monkeypatch.setattr(sliding_torch, "attend_blocks",
                        lambda *a, **kw: calls.append(1) or _attend_blocks(*a, **kw))
    monkeypatch.setattr(sliding_torch, "MIN_CHUNK", 4)  # several blocks per group on test shapes
    q, k, v = _qkv(2, 6, 2, sq, sk, 16, 12)
    inputs = [non_contiguous(q).requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True),
              torch.randn(6, requires_grad=True)]
    assert_grads_match(lambda q, k, v, s: dsattn.sliding_window_attention(q, k, v, window, causal=causal, sinks=s,
                                                                          backend="torch"),
                       lambda q, k, v, s: sliding_ref(q, k, v, window, causal=causal, sinks=s), inputs, RTOL,
                       name="sliding_window_attention (blocked)")
    assert len(calls) >= 2  # the forward and the backward's recompute


_attend_blocks = sliding_torch.attend_blocks


# ----------------------------------------------------------------------- traced: the same code, no host read
class _Backend(torch.autograd.Function):
    """A torch backend's forward fwd(q, k, v) and backward bwd(grad_out, q, k, v) -> (dq, dk, dv, ...) as one
    differentiable call."""

    @staticmethod
    def forward(ctx, fwd, bwd, q, k, v):
        ctx.save_for_backward(q, k, v)
        ctx.bwd = bwd
        return fwd(q, k, v)

    @staticmethod
    def backward(ctx, grad_out):
        return None, None, *ctx.bwd(grad_out, *ctx.saved_tensors)[:3]


def _traced_case(name):
    """(fwd, bwd, oracle, q, k, v, [(poisoned, sees, nan_rows), ...]) of a torch backend on one shape: keys
    every row is blind to (every gradient checked), then keys some rows see."""
    b, hq, hkv, sq, sk = 2, 4, 2, 11, 29
    q, k, v = _qkv(b, hq, hkv, sq, sk, 16, 12)
    scale = 16**-0.5
    if name.startswith("sliding"):
        # A window well inside the keys takes the blocked path, a long one the chunked path.
        window, causal = (5, True) if name == "sliding_blocked" else (12, False)
        assert sliding_torch.blocked(window, sk) == (name == "sliding_blocked")
        sinks = torch.randn(hq)

        def fwd(q, k, v):
            return sliding_torch.sliding_window_attention(q, k, v, window, causal=causal, sinks=sinks)

        def bwd(g, q, k, v):
            return sliding_torch.sliding_window_attention_backward(g, q, k, v, window, causal=causal, scale=scale,
                                                                   sinks=sinks)

        def oracle(q, k, v):
            return sliding_ref(q, k, v, window, causal=causal, sinks=sinks.double())
        sees = visible_mask(sq, sk, window, causal)  # rows at 18..28: keys from 14 (causal) / 7 on
        seen = [20, 25] if causal else [8]  # by rows 20..28 / 18..19
        return fwd, bwd, oracle, q, k, v, [(_keys(b, hkv, sk, [0, 4, 6]), sees, False),
                                           (_keys(b, hkv, sk, seen), sees, True)]
    if name.startswith("sparse"):
        strategy = name.split("_")[1]
        indices = _indices(b, sq, sk, 7, [2, 11, 28], hidden_future=(28, [0, 3, 5]))
        indices[:, 6, 1] = 11  # listed by row 6 only

        def fwd(q, k, v):
            return sparse_torch.sparse_attention(q, k, v, indices, causal=True, strategy=strategy)

        def bwd(g, q, k, v):
            return sparse_torch.sparse_attention_backward(g, q, k, v, indices, causal=True, scale=scale,
                                                          strategy=strategy)

        def oracle(q, k, v):
            return sparse_ref(q, k, v, indices, causal=True)
        sees = _sparse_sees(indices, hq, sk, True)
        return fwd, bwd, oracle, q, k, v, [(_keys(b, hkv, sk, [2, 28]), sees, False),
                                           (_keys(b, hkv, sk, [11]), sees, strategy == "dense")]
    top_k = 4

    def fwd(q, k, v):
        return topk_torch.topk_sparse_attention(q, k, v, top_k)

    def bwd(g, q, k, v):
        return topk_torch.topk_sparse_attention_backward(g, q, k, v, top_k, causal=True, scale=scale)

    def oracle(q, k, v):
        return topk_ref(q, k, v, top_k)
    # Future keys: the rows before them are blind; the rows after see them (and are NaN).
    return fwd, bwd, oracle, q, k, v, [(_keys(b, hkv, sk, [23, 27]), visible_mask(sq, sk, sk, True), True)]


TRACED = ["sliding_blocked", "sliding_chunked", "sparse_dense", "sparse_gather", "topk"]


@pytest.mark.parametrize("name", TRACED)
def test_torch_backends_compiled(name):
    """The checks above on the torch backends traced by torch.compile (aot_eager, fullgraph: no graph break,
    so no host read), forward and backward (its recompute under torch.autograd.grad traced too)."""
    fwd, bwd, oracle, q, k, v, checks = _traced_case(name)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: _Backend.apply(fwd, bwd, q, k, v), backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for poisoned, sees, nan_rows in checks:
            _check(compiled, oracle, q, k, v, poisoned, sees, nan_rows=nan_rows)


def test_public_ops_compiled():
    """dsattn.<op>(..., backend="torch") under torch.compile (aot_eager, fullgraph): with Triton interpreting
    (CPU) the op's forward is opaque and runs eagerly, its backward (the torch backend's) is traced; where
    Triton compiles, the forward is traced too."""
    b, hq, hkv, sq, sk, window, top_k = 1, 4, 2, 9, 23, 4, 3
    q, k, v = _qkv(b, hq, hkv, sq, sk, 16, 8)
    indices = _indices(b, sq, sk, 5, [1, 7])
    torch._dynamo.reset()
    for op, oracle, poisoned, sees in (  # keys before every window / not listed; a key after some rows
            (lambda q, k, v: dsattn.sliding_window_attention(q, k, v, window, backend="torch"),
             lambda q, k, v: sliding_ref(q, k, v, window), [1, 7], visible_mask(sq, sk, window, True)),
            (lambda q, k, v: dsattn.sparse_attention(q, k, v, indices, causal=True, backend="torch"),
             lambda q, k, v: sparse_ref(q, k, v, indices, causal=True), [1, 7], _sparse_sees(indices, hq, sk, True)),
            (lambda q, k, v: dsattn.topk_sparse_attention(q, k, v, top_k, backend="torch"),
             lambda q, k, v: topk_ref(q, k, v, top_k), [20], visible_mask(sq, sk, sk, True))):
        _check(torch.compile(op, backend="aot_eager", fullgraph=True), oracle, q, k, v,
               _keys(b, hkv, sk, poisoned), sees, nan_rows=True)


class _DataDependent(TorchDispatchMode):
    """Records the ops that read tensor data on the host or size their output by it."""

    OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
           torch.ops.aten.masked_select.default, torch.ops.aten.unique_consecutive.default,
           torch.ops.aten._unique2.default}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            self.seen.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", TRACED)
def test_torch_backends_no_host_read(name):
    """Eager on NaN / Inf inputs, forward and backward run no op that reads data on the host (the path traced
    is the eager one), and both trace with fake tensors (make_fx)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    fwd, bwd, _, q, k, v, checks = _traced_case(name)
    k, v = _poison(k, v, checks[-1][0])
    with _DataDependent() as mode:
        out = fwd(q, k, v)
        bwd(torch.randn_like(out), q, k, v)
    assert not mode.seen
    make_fx(fwd, tracing_mode="fake", _allow_non_fake_inputs=True)(q, k, v)  # (closures: indices, sinks)
    make_fx(bwd, tracing_mode="fake", _allow_non_fake_inputs=True)(torch.randn_like(out), q, k, v)
