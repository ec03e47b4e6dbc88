"""dsattn.indexer_kl_loss: the oracle and both backends (torch chunked; Triton in the interpreter on CPU) against
a float64 brute force over rows and keys (value and gradients of q_idx, k_idx, weights), dense warm-up and
sparse lists (-1, duplicates, causal future keys), GQA, Sq < Sk, Sq > Sk (rows with no key), causal=False; the
target gets no gradient; memory stays below [Sq, Sk]; opcheck; bad input rejected by name."""

import pytest
import torch

import dsattn
from dsattn import capabilities
from dsattn.reference.indexer_kl_loss import indexer_kl_loss as indexer_kl_loss_ref
from dsattn.testing import assert_close, assert_compiles, assert_grads_match, largest_tensor, non_contiguous, tolerance
from dsattn.torch_backend import indexer_kl_loss as torch_backend

BACKENDS = [b for b in ("torch", "triton") if b in capabilities.of("indexer_kl_loss")]


def _usable(backend, device):
    reason = dsattn._backend.unusable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(reason)


def _inputs(b, sq, sk, hi, di, h, hkv, dqk, dtype=torch.float32, device="cpu"):
    q_idx = torch.randn(b, sq, hi, di, dtype=dtype, device=device)
    k_idx = torch.randn(b, sk, di, dtype=dtype, device=device)
    weights = torch.randn(b, sq, hi, dtype=dtype, device=device)
    q = torch.randn(b, h, sq, dqk, dtype=dtype, device=device) * 2
    k = torch.randn(b, hkv, sk, dqk, dtype=dtype, device=device)
    return [q_idx, k_idx, weights, q, k]


def _indices(b, sq, sk, topk, device="cpu"):
    """int32 [B, Sq, topk]: random keys (future ones included), some -1, a duplicate, an all-empty row."""
    idx = torch.randint(0, sk, (b, sq, topk), dtype=torch.int32)
    idx = torch.where(torch.rand(idx.shape) < 0.2, -1, idx)
    idx[:, 0] = -1
    if topk > 1:
        idx[:, -1, 1] = idx[:, -1, 0] = sk - 1  # listed twice: counts once
    return idx.to(device)


def _brute_force(q_idx, k_idx, weights, q, k, indices=None, scale=None, index_scale=None, causal=True):
    """Row by row over the set of keys each row sees, in float64 (differentiable in q_idx, k_idx, weights)."""
    b, sq, _, di = q_idx.shape
    h, hkv, sk, dqk = q.shape[1], k.shape[1], k.shape[2], q.shape[3]
    scale = dqk**-0.5 if scale is None else scale
    index_scale = di**-0.5 if index_scale is None else index_scale
    q_idx, k_idx, weights, q, k = (t.double() for t in (q_idx, k_idx, weights, q, k))
    total, rows = q_idx.sum() * 0, 0
    for bi in range(b):
        for i in range(sq):
            pos = i + sk - sq
            keys = range(sk) if indices is None else set(indices[bi, i].tolist())
            keys = sorted(j for j in keys if 0 <= j < sk and (not causal or j <= pos))
            if not keys:
                continue
            keys = torch.tensor(keys)
            index = (weights[bi, i, :, None] * torch.relu(index_scale * q_idx[bi, i] @ k_idx[bi, keys].T)).sum(0)
            with torch.no_grad():
                p = torch.stack([torch.softmax(scale * q[bi, hh, i] @ k[bi, hh // (h // hkv), keys].T, dim=0)
                                 for hh in range(h)]).mean(0)
            total = total + (torch.xlogy(p, p) - p * torch.log_softmax(index, dim=0)).sum()
            rows += 1
    return total / max(rows, 1)


def _call(backend, **options):
    return lambda q_idx, k_idx, weights, q, k: dsattn.indexer_kl_loss(q_idx, k_idx, weights, q, k, backend=backend,
                                                                       **options)


SHAPES = [  # b, sq, sk, hi, di, h, hkv, dqk
    (2, 6, 7, 3, 16, 4, 2, 8),  # GQA, Sq < Sk
    (1, 5, 37, 4, 12, 2, 2, 150),  # several key tiles, odd Di, Dqk in two Triton chunks
    (1, 8, 5, 2, 16, 3, 1, 16),  # Sq > Sk: the first rows see no key (causal); MQA
]


# ----------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_and_torch_chunks_match_brute_force(shape, causal, sparse):
    x = _inputs(*shape, dtype=torch.float64)
    indices = _indices(shape[0], shape[1], shape[2], 6) if sparse else None
    expected = _brute_force(*x, indices, 0.3, 0.2, causal)
    assert_close(indexer_kl_loss_ref(*x, indices=indices, scale=0.3, index_scale=0.2, causal=causal), expected, 1e-12)
    fwd = torch_backend.indexer_kl_loss(*x, indices=indices, scale=0.3, index_scale=0.2, causal=causal,
                                        query_chunk=4, key_chunk=3)
    assert_close(fwd, expected, 1e-12)
    assert fwd.item() > 0


def test_listing_every_visible_key_is_the_dense_loss():
    x = _inputs(1, 7, 10, 2, 8, 2, 1, 8, dtype=torch.float64)
    every = torch.arange(10, dtype=torch.int32).expand(1, 7, 10).flip(-1).contiguous()
    for causal in (True, False):
        assert_close(dsattn.indexer_kl_loss(*x, indices=every, causal=causal),
                     dsattn.indexer_kl_loss(*x, causal=causal), 1e-12)


def test_equal_distributions_give_zero_and_no_rows_give_zero():
    # One index head with unit weight whose relu scores equal the single target head's logits: KL = 0.
    q_idx = torch.rand(1, 5, 1, 8, dtype=torch.float64)
    k_idx = torch.rand(1, 5, 8, dtype=torch.float64)
    w = torch.ones(1, 5, 1, dtype=torch.float64)
    loss = dsattn.indexer_kl_loss(q_idx, k_idx, w, q_idx.transpose(1, 2), k_idx[:, None], scale=0.5, index_scale=0.5)
    assert abs(loss.item()) < 1e-14
    x = [t.requires_grad_(i < 3) for i, t in enumerate(_inputs(1, 4, 6, 2, 8, 2, 2, 8))]
    for backend in BACKENDS:
        _usable(backend, "cpu")
        loss = dsattn.indexer_kl_loss(*x, indices=torch.full((1, 4, 3), -1, dtype=torch.int32), backend=backend)
        assert loss.item() == 0.0
        grads = torch.autograd.grad(loss, x[:3])
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sq,sk,topk", [(3, 4, 0), (0, 4, None), (3, 0, None), (3, 0, 2)])
def test_empty_shapes_give_zero(backend, sq, sk, topk, device):
    _usable(backend, device)
    x = [t.requires_grad_(i < 3) for i, t in enumerate(_inputs(1, sq, sk, 2, 16, 2, 1, 16, device=device))]
    indices = None if topk is None else torch.full((1, sq, topk), -1, dtype=torch.int32, device=device)
    loss = dsattn.indexer_kl_loss(*x, indices=indices, backend=backend)
    grads = torch.autograd.grad(loss, x[:3])
    assert loss.item() == 0.0 and all(g.shape == t.shape and not g.any() for g, t in zip(grads, x))


# ---------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_value_and_gradients_match_brute_force(backend, shape, causal, sparse, device):
    _usable(backend, device)
    x = [t.requires_grad_(i < 3) for i, t in enumerate(_inputs(*shape, device=device))]
    indices = _indices(shape[0], shape[1], shape[2], 6, device) if sparse else None
    assert_grads_match(_call(backend, indices=indices, causal=causal),
                       lambda *y: _brute_force(*y, indices, None, None, causal), x, 1e-5, name=backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_and_strided_inputs(backend, dtype, device):
    _usable(backend, device)
    x = _inputs(1, 7, 11, 4, 32, 4, 2, 16, dtype=dtype, device=device)
    x = [non_contiguous(t) if t.dim() == 4 else t for t in x]
    for i in range(3):
        x[i].requires_grad_(True)
    indices = _indices(1, 7, 11, 8, device)
    for idx in (None, indices):
        assert_grads_match(_call(backend, indices=idx), lambda *y: indexer_kl_loss_ref(*y, indices=idx), x,
                           tolerance(dtype), name=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_gets_no_gradient(backend, device):
    _usable(backend, device)
    x = [t.requires_grad_(True) for t in _inputs(1, 6, 6, 2, 8, 2, 1, 8, device=device)]
    loss = dsattn.indexer_kl_loss(*x, backend=backend)
    loss.backward()
    assert x[3].grad is None and x[4].grad is None
    assert all(t.grad is not None for t in x[:3])
    # Only the target requires grad: nothing to differentiate.
    y = [t.detach().requires_grad_(i >= 3) for i, t in enumerate(x)]
    assert dsattn.indexer_kl_loss(*y, backend=backend).grad_fn is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_q_heads_per_kv_head(backend, device):
    """70 q heads on one kv head: two q-head blocks of the Triton kernels; int64 lists."""
    _usable(backend, device)
    x = [t.requires_grad_(i < 3) for i, t in enumerate(_inputs(1, 3, 5, 2, 16, 70, 1, 16, device=device))]
    indices = _indices(1, 3, 5, 4, device).long()
    assert_grads_match(_call(backend, indices=indices), lambda *y: indexer_kl_loss_ref(*y, indices=indices), x,
                       1e-5, name=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_keys_a_row_cannot_use_stays_out(backend, device):
    _usable(backend, device)
    x = [t.requires_grad_(i < 3) for i, t in enumerate(_inputs(1, 6, 9, 2, 8, 2, 1, 8, device=device))]
    indices = torch.tensor([[[4, 1, -1], [2, 3, 1]] * 3], dtype=torch.int32, device=device)
    k_idx, k = x[1].detach().clone(), x[4].clone()
    k_idx[0, 8], k[0, 0, 8] = float("nan"), float("nan")  # never listed
    k_idx[0, 0], k[0, 0, 0] = float("nan"), float("nan")  # key 0: a gathered stand-in for -1 must not read it
    k_idx.requires_grad_(True)
    loss = dsattn.indexer_kl_loss(x[0], k_idx, x[2], x[3], k, indices=indices, backend=backend)
    grads = torch.autograd.grad(loss, (x[0], k_idx, x[2]))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    clean = [t.detach().clone() for t in (x[0], k_idx, x[2], x[3], k)]
    clean[1][0, 0] = clean[1][0, 8] = clean[4][0, 0, 0] = clean[4][0, 0, 8] = 0.0
    assert_close(loss, indexer_kl_loss_ref(*clean, indices=indices), 1e-5)


def test_memory_stays_below_sq_by_sk():
    sq = sk = 256
    x = [t.requires_grad_(i < 3) for i, t in enumerate(_inputs(1, sq, sk, 2, 16, 2, 1, 16))]
    for indices in (None, torch.randint(-1, sk, (1, sq, 64), dtype=torch.int32)):
        def step():
            torch.autograd.grad(dsattn.indexer_kl_loss(*x, indices=indices, backend="torch"), x[:3])

        assert largest_tensor(step) < sq * sk


def test_opcheck():
    x = _inputs(1, 3, 5, 2, 16, 2, 1, 16)
    indices = _indices(1, 3, 5, 4)
    quick = ("test_schema", "test_autograd_registration", "test_faketensor")
    for backend in BACKENDS:
        if dsattn._backend.unusable_reason(backend, torch.device("cpu")) is not None:
            continue
        for idx in (None, indices):
            args = (*[t.detach().requires_grad_(i < 3) for i, t in enumerate(x)], idx, 0.25, 0.5, True, backend)
            # The traced autograd check (seconds each) once per backend, on the op whose backward it takes.
            full = (idx is None) == (backend == "torch")
            torch.library.opcheck(torch.ops.dsattn.indexer_kl_loss, args, test_utils=quick)
            torch.library.opcheck(torch.ops.dsattn.indexer_kl_loss_fwd, args,
                                  **({} if full else {"test_utils": quick}))


def test_compiles_fullgraph_and_equals_eager():
    x = [t.requires_grad_(i < 3) for i, t in enumerate(_inputs(1, 6, 8, 2, 16, 2, 1, 16))]
    indices = _indices(1, 6, 8, 4)
    assert_compiles(lambda *y: dsattn.indexer_kl_loss(*y[:5], indices=y[5]), [*x, indices], backends=("aot_eager",),
                    name="indexer_kl_loss")


# --------------------------------------------------------------------------------------- bad input
def _bad(name, **change):
    x = dict(zip(("q_idx", "k_idx", "weights", "q", "k"), _inputs(1, 4, 6, 2, 8, 2, 1, 8)))
    kw = dict(indices=None, scale=None, index_scale=None, causal=True, backend="auto")
    x.update({k: v for k, v in change.items() if k in x})
    kw.update({k: v for k, v in change.items() if k in kw})
    return name, x, kw


@pytest.mark.parametrize("name,x,kw", [
    _bad("q_idx", q_idx=torch.randn(1, 4, 8)),
    _bad("q_idx", q_idx=torch.randn(1, 4, 2, 0)),
    _bad("k_idx", k_idx=torch.randn(1, 6, 4)),
    _bad("k_idx", k_idx=torch.randn(1, 6, 8).int()),
    _bad("weights", weights=torch.randn(1, 4, 3)),
    _bad("q", q=torch.randn(1, 2, 5, 8)),
    _bad("k", k=torch.randn(1, 1, 6, 4)),
    _bad("k", k=torch.randn(1, 1, 6, 8, dtype=torch.float64)),
    _bad("heads", k=torch.randn(1, 3, 6, 8)),
    _bad("indices", indices=torch.zeros(1, 4, 2)),
    _bad("indices", indices=torch.zeros(1, 5, 2, dtype=torch.int32)),
    _bad("indices", indices=torch.full((1, 4, 2), 6, dtype=torch.int32)),
    _bad("indices", indices=torch.full((1, 4, 2), -2, dtype=torch.int32)),
    _bad("scale", scale=0.0),
    _bad("index_scale", index_scale=float("inf")),
    _bad("index_scale", index_scale="1"),
    _bad("causal", causal=1),
    _bad("backend", backend="cuda"),
])
def test_bad_input_is_rejected_by_name(name, x, kw):
    with pytest.raises((ValueError, TypeError), match=name):
        dsattn.indexer_kl_loss(*x.values(), **kw)
