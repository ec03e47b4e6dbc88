"""topk_sparse_attention: the oracle and the chunked torch backend vs brute force (float64), dense equality
when top_k >= Sk, the Triton path (indexer kernel selection + sparse attention kernel; interpreter here) vs
brute force and the torch backend, the custom op (gradients through the selected keys against float64
autograd of the oracle, opcheck, torch.compile, no silent detach), bad input."""

import pytest
import torch

import dsattn
from dsattn.reference.topk_sparse_attention import topk_sparse_attention as reference
from dsattn.testing import assert_close, assert_compiles, assert_grads_match, non_contiguous, tolerance
from dsattn.torch_backend import topk_sparse_attention as torch_backend

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
@pytest.mark.parametrize("impl", ["oracle", "torch"])
def test_reference_equals_brute_force(impl, hq, hkv, sq, sk, top_k, causal):
    q = torch.randn(2, hq, sq, 8, dtype=torch.float64)
    k = torch.randn(2, hkv, sk, 8, dtype=torch.float64)
    v = torch.randn(2, hkv, sk, 6, dtype=torch.float64)
    if impl == "oracle":
        got = reference(q, k, v, top_k, causal=causal)
    else:
        got = dsattn.topk_sparse_attention(q, k, v, top_k, causal=causal, backend="torch")
    assert_close(got, brute_force(q, k, v, top_k, 8**-0.5, causal), 1e-10)


@pytest.mark.parametrize("sq,sk", [(9, 6), (5, 17)])
def test_reference_in_small_chunks_and_rows_without_visible_keys(sq, sk):
    """Chunks of 1-2 query rows (the causal key bound per chunk), GQA, Dqk != Dv; with Sq > Sk the first causal
    rows see no key and are zeros (the oracle alike)."""
    q = torch.randn(2, 4, sq, 8, dtype=torch.float64)
    k = torch.randn(2, 2, sk, 8, dtype=torch.float64)
    v = torch.randn(2, 2, sk, 5, dtype=torch.float64)
    expected = brute_force(q, k, v, 3, 0.3, True)
    for got in (torch_backend.topk_sparse_attention(q, k, v, 3, causal=True, scale=0.3, chunk_elements=2 * 4 * sk * 2),
                reference(q, k, v, 3, causal=True, scale=0.3)):
        assert_close(got, expected, 1e-10)
        if sq > sk:
            assert got[:, :, : sq - sk].abs().max() == 0


def test_non_finite_keys_a_row_cannot_see_or_does_not_select_never_reach_it():
    """The oracle: NaN / Inf in the k/v of a future key (causal) and in the value of a visible key that loses
    the selection leave the rows, and their q gradients, equal to the clean inputs'."""
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    v = torch.randn(1, 1, 4, 6, dtype=torch.float64)
    loser = int((q[0, 0, 2] @ k[0, 0, :3].T).argmin())  # row 2 sees keys 0-2 and keeps 2 (top_k): this one loses
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[:, :, 3], bad_v[:, :, 3] = float("nan"), float("inf")  # after rows 0-2
    bad_v[:, :, loser] = float("nan")
    rows = [*range(loser), 2]  # row 2 and the rows before the loser (which keep every key they see)
    clean = [t.clone().requires_grad_(True) for t in (q, k, v)]
    dirty = [t.clone().requires_grad_(True) for t in (q, bad_k, bad_v)]
    outs = []
    for leaves in (clean, dirty):
        out = reference(*leaves, 2, causal=True)[:, :, rows]
        out.sum().backward()
        outs.append(out)
    assert torch.isfinite(outs[1]).all() and torch.equal(outs[0], outs[1])
    # dq is per row; dk/dv also collect row 3's backward, which sees key 3 (its NaN there is legitimate).
    assert torch.equal(clean[0].grad[:, :, rows], dirty[0].grad[:, :, rows])


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


def test_triton_selection_beyond_the_kernel_limit_is_the_torch_top_k(triton_device, monkeypatch):
    """Where the indexer kernel cannot take top_k, the Triton path selects with the torch backend's chunked
    top-k (the same keys)."""
    import dsattn.ops.lightning_indexer_topk as indexer

    monkeypatch.setattr(indexer, "triton_topk", lambda *a, **kw: None)
    q, k, v = (torch.randn(1, 4, 9, 16, device=triton_device) for _ in range(3))
    got = dsattn.topk_sparse_attention(q, k[:, :2], v[:, :2], 4, backend="triton")
    assert_close(got, brute_force(q.cpu(), k[:, :2].cpu(), v[:, :2].cpu(), 4, 16**-0.5, True), tolerance(torch.float32))


# ----------------------------------------------------------------------------------------- the custom op
def _grad_inputs(b, hq, hkv, sq, sk, dqk, dv, dtype=torch.float32, device="cpu", transposed=False):
    q = torch.randn(b, hq, sq, dqk, dtype=dtype, device=device)
    k = torch.randn(b, hkv, sk, dqk, dtype=dtype, device=device)
    v = torch.randn(b, hkv, sk, dv, dtype=dtype, device=device)
    if transposed:  # [B, S, H, D] memory, as transformers hands it over
        q, k, v = (non_contiguous(t) for t in (q, k, v))
    return [t.requires_grad_(True) for t in (q, k, v)]


@pytest.mark.parametrize(
    "b,hq,hkv,sq,sk,dqk,dv,top_k,causal,transposed",
    [
        (2, 4, 2, 9, 13, 8, 6, 4, True, False),  # GQA, Dqk != Dv, Sq < Sk
        (1, 3, 1, 11, 11, 5, 7, 3, False, True),  # non-causal, non-contiguous
        (1, 2, 1, 7, 4, 8, 8, 2, True, False),  # Sq > Sk: rows that see nothing
        (1, 2, 2, 6, 6, 8, 8, 50, True, False),  # top_k >= Sk: dense
    ],
)
def test_gradients_match_float64_autograd_of_the_oracle(b, hq, hkv, sq, sk, dqk, dv, top_k, causal, transposed,
                                                          monkeypatch):
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 3 * b * hq * sk)  # chunks of 3 rows
    inputs = _grad_inputs(b, hq, hkv, sq, sk, dqk, dv, transposed=transposed)
    assert_grads_match(lambda q, k, v: dsattn.topk_sparse_attention(q, k, v, top_k, causal=causal, scale=0.3),
                       lambda q, k, v: reference(q, k, v, top_k, causal=causal, scale=0.3), inputs, 1e-5,
                       name="topk_sparse_attention")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradients_in_16_bit(dtype):
    inputs = _grad_inputs(1, 4, 2, 9, 13, 16, 8, dtype)
    assert_grads_match(lambda q, k, v: dsattn.topk_sparse_attention(q, k, v, 5),
                       lambda q, k, v: reference(q, k, v, 5), inputs, tolerance(dtype), name="topk_sparse_attention")


def test_gradcheck_float64_torch_backend():
    q, k, v = _grad_inputs(1, 2, 1, 6, 8, 4, 3, torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: dsattn.topk_sparse_attention(q, k, v, 3, backend="torch"),
                                    (q, k, v))


def test_backward_memory_chunks(monkeypatch):
    """The backward recomputes chunk by chunk, like the forward: no score block of more than one chunk's rows."""
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 4 * 2 * 64)  # 4 rows of 2 heads x 64 keys
    rows = []
    einsum = torch.einsum
    monkeypatch.setattr(torch, "einsum", lambda eq, *ops: rows.append((eq, einsum(eq, *ops).shape)) or einsum(eq, *ops))
    q, k, v = _grad_inputs(1, 2, 1, 64, 64, 8, 8)
    dsattn.topk_sparse_attention(q, k, v, 8).sum().backward()
    assert q.grad is not None and k.grad is not None
    scores = [shape for eq, shape in rows if eq.endswith("->bhgck")]
    assert scores and max(shape[-2] for shape in scores) <= 4


def test_no_silent_detach(triton_device):
    """A gradient is wanted: auto and an explicit backend="triton" both return a graph, and with "triton" it
    is the sparse-attention Triton backward that runs (and is correct)."""
    from dsattn.triton_kernels import sparse_attention as kernels

    q, k, v = _grad_inputs(1, 2, 1, 7, 7, 16, 16, device=triton_device)
    assert dsattn.topk_sparse_attention(q, k, v, 3).grad_fn is not None
    calls = []
    backward = kernels.sparse_attention_backward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "sparse_attention_backward", lambda *a, **kw: calls.append(1) or backward(*a, **kw))
        assert_grads_match(lambda q, k, v: dsattn.topk_sparse_attention(q, k, v, 3, backend="triton"),
                           lambda q, k, v: reference(q, k, v, 3), [q, k, v],
                           tolerance(q.dtype, tf32=triton_device == "cuda"), name="topk_sparse_attention")
    assert calls, "backend='triton' did not run the Triton backward"
    with torch.no_grad():
        assert_close(dsattn.topk_sparse_attention(q, k, v, 3, backend="triton"), reference(q, k, v, 3))


@pytest.mark.parametrize(
    "b,hq,hkv,sq,sk,dqk,dv,top_k,causal,transposed,dtype",
    [
        (2, 4, 2, 6, 11, 24, 16, 4, True, False, torch.float32),  # GQA (dk/dv summed over the group), Sq < Sk
        (1, 3, 1, 8, 8, 16, 24, 3, False, True, torch.float32),  # MQA, non-causal, non-contiguous, Dv > Dqk
        (1, 2, 1, 7, 4, 16, 16, 2, True, False, torch.float32),  # Sq > Sk: rows that see nothing
        (1, 2, 2, 6, 6, 16, 16, 50, True, False, torch.float32),  # top_k >= Sk: dense
        (1, 4, 2, 6, 11, 32, 16, 5, True, False, torch.bfloat16),
    ],
)
def test_triton_gradients_match_float64_autograd_of_the_oracle(triton_device, b, hq, hkv, sq, sk, dqk, dv, top_k,
                                                                 causal, transposed, dtype):
    """Gradients through the keys the Triton path selects (the training forward saves its selection and lse)."""
    inputs = _grad_inputs(b, hq, hkv, sq, sk, dqk, dv, dtype, triton_device, transposed=transposed)
    assert_grads_match(
        lambda q, k, v: dsattn.topk_sparse_attention(q, k, v, top_k, causal=causal, scale=0.3, backend="triton"),
        lambda q, k, v: reference(q, k, v, top_k, causal=causal, scale=0.3), inputs,
        tolerance(dtype, tf32=triton_device == "cuda"), name="topk_sparse_attention triton")


def test_triton_backward_through_the_public_op(triton_device):
    """torch.ops.dsattn.topk_sparse_attention called directly (nothing saved): its backward selects again and
    recomputes (out, lse) with the training forward."""
    q, k, v = _grad_inputs(1, 4, 2, 6, 11, 16, 8, device=triton_device)
    assert_grads_match(lambda q, k, v: torch.ops.dsattn.topk_sparse_attention(q, k, v, 4, True, 0.3, "triton"),
                       lambda q, k, v: reference(q, k, v, 4, causal=True, scale=0.3), [q, k, v],
                       tolerance(q.dtype, tf32=triton_device == "cuda"), name="topk_sparse_attention")


def test_opcheck():
    q, k, v = (t.detach() for t in _grad_inputs(1, 4, 2, 3, 7, 16, 8))
    backends = ["torch"] + (["triton"] if dsattn._backend.unusable_reason("triton", q.device) is None else [])
    for backend in backends:
        torch.library.opcheck(torch.ops.dsattn.topk_sparse_attention,
                              (q.requires_grad_(True), k, v, 3, True, 0.25, backend))
    if "triton" in backends:
        torch.library.opcheck(torch.ops.dsattn.topk_sparse_attention_fwd_lse,
                              (q.requires_grad_(True), k.requires_grad_(True), v, 3, True, 0.25))


def test_compiles_fullgraph_and_equals_eager():
    inputs = _grad_inputs(1, 4, 2, 11, 11, 16, 8, transposed=True)
    assert_compiles(lambda q, k, v: dsattn.topk_sparse_attention(q, k, v, 4), inputs, name="topk_sparse_attention")
    with torch.no_grad():
        assert_compiles(lambda q, k, v: dsattn.topk_sparse_attention(q[:, :, -1:], k, v, 4), inputs, name="decode")
