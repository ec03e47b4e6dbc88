"""dsattn.sparse_attention: the oracle and the chunked torch backend (both strategies) proven in float64
against a brute-force loop, the Triton kernel (interpreter on CPU, compiled on a GPU) against the oracle, the
custom op (gradients against float64 autograd of the oracle, opcheck, torch.compile, no silent detach, the
range check skipped under compile) and bad input rejected by name."""

import pytest
import torch
import torch.nn.functional as F

import dsattn
from dsattn import capabilities
from dsattn.ops.sparse_attention import sparse_attention
from dsattn.reference.sparse_attention import sparse_attention as sparse_attention_ref
from dsattn.testing import assert_close, assert_compiles, assert_grads_match, non_contiguous, poisoned, tolerance
from dsattn.torch_backend import sparse_attention as torch_backend


def _random_indices(lead, topk, seq_k, *, empty=0.2, device="cpu"):
    """int32 [*lead, topk]: distinct keys per row in random order, a fraction set to -1; when topk > seq_k
    the surplus entries are -1 too."""
    perm = torch.rand(*lead, max(topk, seq_k)).argsort(dim=-1)[..., :topk]
    perm = torch.where(perm < seq_k, perm, -1)
    perm = torch.where(torch.rand(perm.shape) < empty, -1, perm)
    return perm.to(torch.int32).to(device)


def _inputs(b, hq, hkv, sq, sk, dqk, dv, dtype=torch.float32, device="cpu"):
    q = torch.randn(b, hq, sq, dqk, dtype=dtype, device=device)
    k = torch.randn(b, hkv, sk, dqk, dtype=dtype, device=device)
    v = torch.randn(b, hkv, sk, dv, dtype=dtype, device=device)
    return q, k, v


def _brute_force(q, k, v, indices, causal, scale):
    """One (batch, head, query) at a time over the listed keys, duplicates included, in float64."""
    b, hq, sq, _ = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    groups = hq // hkv
    out = torch.zeros(b, hq, sq, dv, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            for i in range(sq):
                row = indices[bi, i] if indices.dim() == 3 else indices[bi, h // groups, i]
                keys = [j for j in row.tolist() if j >= 0 and (not causal or j <= i + sk - sq)]
                if not keys:
                    continue
                scores = torch.stack([q[bi, h, i].double() @ k[bi, h // groups, j].double() for j in keys]) * scale
                weights = torch.softmax(scores, dim=0)
                out[bi, h, i] = sum(w * v[bi, h // groups, j].double() for w, j in zip(weights, keys))
    return out


def _run(impl, q, k, v, indices, causal=False, scale=None):
    """The oracle, or the torch backend with one strategy in chunks of 2 rows."""
    if impl == "oracle":
        return sparse_attention_ref(q, k, v, indices, causal=causal, scale=scale)
    return torch_backend.sparse_attention(q, k, v, indices, causal=causal, scale=scale, chunk_size=2, strategy=impl)


# ----------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("strategy", ["oracle", "gather", "dense"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,hq,hkv,sq,sk,dqk,dv,topk", [(2, 4, 2, 5, 11, 8, 6, 7), (1, 3, 1, 6, 6, 5, 5, 9),
                                                        (1, 2, 2, 3, 9, 4, 4, 2)])  # Sq < Sk: rows at the end
def test_reference_matches_brute_force(b, hq, hkv, sq, sk, dqk, dv, topk, causal, per_head, strategy):
    q, k, v = _inputs(b, hq, hkv, sq, sk, dqk, dv, torch.float64)
    lead = (b, hkv, sq) if per_head else (b, sq)
    indices = _random_indices(lead, topk, sk)
    indices[..., 0, :] = -1  # one all-empty row
    indices[..., -1, -2:] = indices[..., -1, :1]  # a duplicated key: counts once per listing
    scale = 0.37
    expected = _brute_force(q, k, v, indices, causal, scale)
    actual = _run(strategy, q, k, v, indices, causal, scale)
    assert_close(actual, expected, 1e-12)
    assert torch.equal(actual[:, :, 0], torch.zeros_like(actual[:, :, 0]))


@pytest.mark.parametrize("impl", ["oracle", "gather", "dense"])
def test_reference_listing_every_key_is_dense_causal_attention(impl):
    q, k, v = _inputs(2, 4, 2, 9, 9, 8, 8, torch.float64)
    indices = torch.arange(9, dtype=torch.int32).flip(0).expand(2, 9, 9)  # every key, in any order
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_close(_run(impl, q, k, v, indices, causal=True), expected, 1e-12)


@pytest.mark.parametrize("hq,hkv,sq,sk,topk,picks", [(4, 4, 64, 64, 16, "dense"), (8, 1, 1, 512, 4, "gather")])
def test_torch_backend_auto_strategy(hq, hkv, sq, sk, topk, picks, monkeypatch):
    """auto takes dense when topk is a sizeable part of the keys (prefill) and gather when it is not (decode);
    both give the same numbers (fp32)."""
    module = torch_backend
    q, k, v = _inputs(1, hq, hkv, sq, sk, 16, 8)
    indices = _random_indices((1, sq), topk, sk)
    taken = []
    for name in ("_dense_chunk", "_gather_chunk"):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=real: (taken.append(_n), _f(*a))[1])
    auto = module.sparse_attention(q, k, v, indices, causal=True)
    assert taken and set(taken) == {f"_{picks}_chunk"}
    other = "gather" if picks == "dense" else "dense"
    assert_close(auto, module.sparse_attention(q, k, v, indices, causal=True, strategy=other), 1e-5)
    with pytest.raises(ValueError, match="strategy"):
        module.sparse_attention(q, k, v, indices, strategy="sparse")


@pytest.mark.parametrize("strategy", ["oracle", "gather", "dense"])
def test_duplicates_count_once_per_listing(strategy):
    q, k, v = _inputs(1, 1, 1, 1, 4, 4, 4, torch.float64)
    once = _run(strategy, q, k, v, torch.tensor([[[0, 2]]], dtype=torch.int32))
    twice = _run(strategy, q, k, v, torch.tensor([[[0, 0, 2]]], dtype=torch.int32))
    s = (q[0, 0, 0] @ k[0, 0, [0, 2]].T) * 4**-0.5
    w = torch.softmax(s + torch.tensor([2.0, 1.0], dtype=torch.float64).log(), dim=0)  # key 0 weighs double
    assert_close(twice[0, 0, 0], w @ v[0, 0, [0, 2]], 1e-12)
    assert not torch.allclose(once, twice)


@pytest.mark.parametrize("impl", ["oracle", "gather", "dense"])
def test_non_finite_unlisted_keys_never_reach_a_row(impl):
    """NaN / Inf in the k and v rows of keys a row does not list (nor lists only as a future key under causal,
    nor as -1) leave that row and its gradients finite and equal to the clean inputs' (more in
    test_nan_hygiene)."""
    q, k, v = _inputs(1, 2, 1, 4, 8, 8, 8, torch.float64)
    indices = torch.tensor([[[0, 1, -1], [1, 2, 7], [0, 3, -1], [3, 2, 1]]], dtype=torch.int32)
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[:, :, 7], bad_v[:, :, 7] = float("nan"), float("inf")  # row 1 lists key 7 after its position
    bad_k[:, :, 5], bad_v[:, :, 6] = float("-inf"), float("nan")  # listed by no row
    clean = [t.clone().requires_grad_(True) for t in (q, k, v)]
    dirty = [t.clone().requires_grad_(True) for t in (q, bad_k, bad_v)]
    outs = []
    for leaves in (clean, dirty):
        out = _run(impl, *leaves, indices, causal=True)
        out.backward(torch.ones_like(out))
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(clean[0].grad, dirty[0].grad)
    for i in (1, 2):
        assert torch.equal(clean[i].grad[:, :, :5], dirty[i].grad[:, :, :5])


# ------------------------------------------------------------------------------------------- kernels
CASES = {
    # name: (b, hq, hkv, sq, sk, dqk, dv, topk, per_head, causal)
    "topk1": (1, 2, 2, 5, 13, 16, 16, 1, False, False),
    "topk7_gqa_causal": (2, 4, 2, 7, 19, 24, 24, 7, False, True),
    "topk64_per_head_causal": (1, 6, 3, 9, 77, 32, 32, 64, True, True),
    "topk_ge_seq_decode_rows": (1, 2, 1, 3, 37, 40, 24, 45, False, True),
    "mla_dims_mqa": (1, 8, 1, 3, 29, 192, 128, 16, False, True),
    "mla_latent_576_512": (1, 16, 1, 2, 20, 576, 512, 8, False, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(triton_device, case, dtype):
    b, hq, hkv, sq, sk, dqk, dv, topk, per_head, causal = CASES[case]
    q, k, v = _inputs(b, hq, hkv, sq, sk, dqk, dv, dtype, triton_device)
    indices = _random_indices((b, hkv, sq) if per_head else (b, sq), topk, sk, device=triton_device)
    indices[..., 1, :] = -1  # an all -1 row gives zeros
    expected = sparse_attention_ref(q.double(), k.double(), v.double(), indices, causal=causal)
    actual = sparse_attention(q, k, v, indices, causal=causal, backend="triton")
    assert actual.dtype == dtype and actual.shape == (b, hq, sq, dv)
    assert_close(actual, expected, tolerance(dtype, tf32=triton_device == "cuda"))
    assert torch.equal(actual[:, :, 1], torch.zeros_like(actual[:, :, 1]))


def test_triton_non_contiguous_inputs_and_every_output_written(triton_device):
    from dsattn.triton_kernels.sparse_attention import sparse_attention as launch

    b, hq, hkv, sq, sk, d, topk = 2, 4, 2, 6, 51, 16, 45  # topk > BLOCK_N: two splits possible
    q, k, v = (non_contiguous(t) for t in _inputs(b, hq, hkv, sq, sk, d, d, device=triton_device))
    indices = non_contiguous(_random_indices((b, sq), topk, sk, device=triton_device))
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or indices.is_contiguous())
    expected = sparse_attention_ref(q, k, v, indices, causal=True)
    for splits in (1, 2):
        out = poisoned((b, hq, sq, d), q.dtype, triton_device)
        launch(q, k, v, indices, causal=True, scale=d**-0.5, splits=splits, out=out)
        assert_close(out, expected, tolerance(q.dtype, tf32=triton_device == "cuda"))


@pytest.mark.parametrize("splits", [3, 7])
def test_triton_split_decode_matches_reference(triton_device, splits):
    """Decode: one query over a long list, split over programs and merged by the combine kernel; one split
    holds only -1 entries and one only future keys."""
    from dsattn.triton_kernels.sparse_attention import sparse_attention as launch

    b, hq, hkv, sk, d, topk = 2, 4, 1, 300, 32, 200
    q, k, v = _inputs(b, hq, hkv, 1, sk, d, d, device=triton_device)
    indices = _random_indices((b, 1), topk, sk, empty=0.1, device=triton_device)
    indices[0, 0, :40] = -1
    expected = sparse_attention_ref(q, k, v, indices, causal=True)
    out = launch(q, k, v, indices, causal=True, scale=d**-0.5, splits=splits)
    assert_close(out, expected, tolerance(q.dtype, tf32=triton_device == "cuda"))


def test_causal_skips_future_listed_keys(triton_device):
    """Chunked prefill (Sq < Sk): query i sits at i + Sk - Sq; listing a later key changes nothing."""
    q, k, v = _inputs(1, 2, 1, 4, 10, 16, 16, device=triton_device)
    visible = torch.tensor([[[0, 6, -1], [1, 7, -1], [2, 8, -1], [3, 9, -1]]], dtype=torch.int32, device=triton_device)
    with_future = visible.clone()
    with_future[..., 2] = 9  # key 9 is visible only to the last query
    for backend in ("torch", "triton"):
        a = sparse_attention(q, k, v, visible, causal=True, backend=backend)
        c = sparse_attention(q, k, v, with_future, causal=True, backend=backend)
        assert torch.equal(a[:, :, :3], c[:, :, :3]), backend
        assert not torch.allclose(a[:, :, 3], c[:, :, 3]), backend
    # Only future keys: zeros.
    future_only = torch.full((1, 4, 2), 9, dtype=torch.int32, device=triton_device)
    out = sparse_attention(q, k, v, future_only, causal=True, backend="triton")
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))


def test_int64_indices_equal_int32(triton_device):
    q, k, v = _inputs(1, 2, 1, 5, 12, 16, 16, device=triton_device)
    indices = _random_indices((1, 5), 6, 12, device=triton_device)
    for backend in ("torch", "triton"):
        as_int64 = sparse_attention(q, k, v, indices.long(), backend=backend)
        assert torch.equal(as_int64, sparse_attention(q, k, v, indices, backend=backend))


def test_empty_topk_gives_zeros(triton_device):
    q, k, v = _inputs(1, 2, 1, 3, 8, 16, 16, device=triton_device)
    indices = torch.empty(1, 3, 0, dtype=torch.int32, device=triton_device)
    for backend in ("torch", "triton"):
        out = sparse_attention(q, k, v, indices, backend=backend)
        assert out.shape == (1, 2, 3, 16) and torch.equal(out, torch.zeros_like(out)), backend


def test_auto_backend_runs(device):
    q, k, v = _inputs(1, 2, 2, 3, 8, 16, 16, device=device)
    indices = _random_indices((1, 3), 4, 8, device=device)
    assert_close(sparse_attention(q, k, v, indices), sparse_attention_ref(q, k, v, indices), 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("sq,sk,topk", [(1, 131072, 2048), (512, 4096, 2048)])
def test_gpu_dsa_shapes(sq, sk, topk):
    """DeepSeek-V3.2 MLA-latent shapes on a GPU: 128 heads over one shared 576/512 latent KV head."""
    q, k, v = _inputs(1, 128, 1, sq, sk, 576, 512, torch.bfloat16, "cuda")
    indices = _random_indices((1, sq), topk, sk, empty=0.05, device="cuda")
    # The torch backend's gather (proven against the oracle above): the oracle's [Sq, Sk, D] would not fit.
    expected = torch_backend.sparse_attention(q, k, v, indices, causal=True, strategy="gather")
    assert_close(sparse_attention(q, k, v, indices, causal=True, backend="triton"), expected, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_long_prefill_memory_is_linear(backend):
    """S = 32768, topk = 2048: beyond the inputs and the output, the kernel (and the chunked reference) hold
    far less than one [S, S] score matrix (2 GiB in bf16)."""
    s, topk = 32768, 2048
    q, k, v = _inputs(1, 16, 1, s, s, 128, 128, torch.bfloat16, "cuda")
    indices = torch.randint(0, s, (1, s, topk), dtype=torch.int32, device="cuda")  # causal skips the future ones
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = sparse_attention(q, k, v, indices, causal=True, backend=backend)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()
    assert extra < 2**30, f"{backend}: {extra / 2**20:.0f} MiB beyond inputs and output"


# ----------------------------------------------------------------------------------------- bad input
def _good():
    q, k, v = _inputs(1, 4, 2, 3, 8, 16, 12)
    return q, k, v, _random_indices((1, 3), 4, 8)


def test_bad_indices_rank_and_shape():
    q, k, v, idx = _good()
    with pytest.raises(ValueError, match="indices must be 3-D"):
        sparse_attention(q, k, v, idx[0])
    with pytest.raises(ValueError, match="indices must be 3-D"):
        sparse_attention(q, k, v, idx[None, None])
    with pytest.raises(ValueError, match=r"indices must be \[B, Sq, topk\]"):
        sparse_attention(q, k, v, idx[:, :2])
    with pytest.raises(ValueError, match=r"indices must be \[B, Hkv, Sq, topk\]"):
        sparse_attention(q, k, v, idx[:, None].expand(1, 3, 3, 4))  # 3 heads, k has 2


def test_bad_indices_dtype_and_device():
    q, k, v, idx = _good()
    with pytest.raises(TypeError, match="indices must have dtype"):
        sparse_attention(q, k, v, idx.float())
    with pytest.raises(TypeError, match="indices must be a torch.Tensor"):
        sparse_attention(q, k, v, idx.tolist())
    with pytest.raises(ValueError, match="indices is on meta"):
        sparse_attention(q, k, v, idx.to("meta"))


@pytest.mark.parametrize("bad", [8, 100, -2])
def test_out_of_range_indices(bad):
    q, k, v, idx = _good()
    idx[0, 1, 2] = bad
    with pytest.raises(ValueError, match=r"indices must lie in \[-1, Sk=8\)"):
        sparse_attention(q, k, v, idx)


def test_bad_qkv_and_options():
    q, k, v, idx = _good()
    with pytest.raises(ValueError, match="q must be 4-D"):
        sparse_attention(q[0], k, v, idx)
    with pytest.raises(TypeError, match="k has dtype"):
        sparse_attention(q, k.half(), v, idx)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        sparse_attention(q[:, :3], k, v, idx)
    with pytest.raises(ValueError, match="k head dim"):
        sparse_attention(q[..., :8], k, v, idx)
    with pytest.raises(TypeError, match="causal must be a bool"):
        sparse_attention(q, k, v, idx, causal=1)
    with pytest.raises(TypeError, match="scale must be a float"):
        sparse_attention(q, k, v, idx, scale="0.1")
    with pytest.raises(ValueError, match="backend must be one of"):
        sparse_attention(q, k, v, idx, backend="cudnn")
    with pytest.raises(ValueError, match="backend='cuda' is not implemented"):
        sparse_attention(q, k, v, idx, backend="cuda")
    with pytest.raises(TypeError, match="backend='triton' takes float16, bfloat16, float32"):
        sparse_attention(q.double(), k.double(), v.double(), idx, backend="triton")


def test_every_launch_config_is_compiled_ahead_of_time():
    """Every (BLOCK_H, BLOCK_DV, num_warps, num_stages) the launcher can pick is in aot_specs(), split and not."""
    from dsattn.triton_kernels import sparse_attention as kernels

    specs = {(s.name, s.num_warps, s.num_stages) for s in kernels.aot_specs()}
    for dtype in kernels.DTYPES:
        for groups in (1, 3, 16, 17, 32, 33, 64, 128):
            for dv in (16, 64, 65, 128, 192, 512):
                block_h, block_dv, num_warps, num_stages = kernels.block_config(groups, dv)
                for split in ("", "_split"):
                    name = f"fwd_{kernels.TRITON_DTYPE[dtype]}_h{block_h}_dv{block_dv}{split}"
                    assert (name, num_warps, num_stages) in specs, name
    # Training, 16-bit at the usual head dims (64/64, 128/128, MLA 192/128 and 576/512): the forward that
    # writes lse and the backward.
    for dtype in (torch.float16, torch.bfloat16):
        for groups in (1, 3, 16, 17, 32, 33, 64, 128):
            for dqk, dv in ((64, 64), (128, 128), (192, 128), (576, 512)):
                block_h, block_dv, num_warps, num_stages = kernels.block_config(groups, dv)
                name = f"fwd_lse_{kernels.TRITON_DTYPE[dtype]}_h{block_h}_dv{block_dv}"
                assert (name, num_warps, num_stages) in specs, name
                block_h, block_dq, block_dv, num_warps, num_stages = kernels.bwd_block_config(groups, dqk, dv)
                name = f"bwd_{kernels.TRITON_DTYPE[dtype]}_h{block_h}_dq{block_dq}_dv{block_dv}"
                assert (name, num_warps, num_stages) in specs, name


# ----------------------------------------------------------------------------------------- the custom op
def _grad_inputs(b, hq, hkv, sq, sk, dqk, dv, dtype=torch.float32, device="cpu", transposed=False):
    q, k, v = _inputs(b, hq, hkv, sq, sk, dqk, dv, dtype, device)
    if transposed:  # [B, S, H, D] memory, as transformers hands it over
        q, k, v = (non_contiguous(t) for t in (q, k, v))
    return [t.requires_grad_(True) for t in (q, k, v)]


@pytest.fixture(params=["gather", "dense"])
def strategy(request, monkeypatch):
    """Force the torch backend's strategy for calls through the op ("auto" picks by the call's shape)."""
    monkeypatch.setattr(torch_backend, "DENSE_WORK_PER_GATHERED_ROW", 0 if request.param == "gather" else 10**9)
    return request.param


@pytest.mark.parametrize(
    "b,hq,hkv,sq,sk,dqk,dv,topk,per_head,causal,transposed",
    [
        (2, 4, 2, 7, 11, 8, 6, 5, False, True, False),  # GQA, Dqk != Dv, Sq < Sk
        (1, 3, 3, 9, 9, 5, 7, 12, True, False, True),  # per-head lists longer than Sk, non-contiguous
        (1, 2, 1, 6, 4, 8, 8, 3, False, True, False),  # Sq > Sk: rows that see nothing
    ],
)
def test_gradients_match_float64_autograd_of_the_oracle(strategy, b, hq, hkv, sq, sk, dqk, dv, topk, per_head,
                                                          causal, transposed):
    inputs = _grad_inputs(b, hq, hkv, sq, sk, dqk, dv, transposed=transposed)
    indices = _random_indices((b, hkv, sq) if per_head else (b, sq), topk, sk)
    indices[..., 1, :] = -1  # a row with no key
    indices[..., -1, -2:] = indices[..., -1, :1]  # a duplicated key: its gradient counts twice
    assert_grads_match(lambda q, k, v: sparse_attention(q, k, v, indices, causal=causal, scale=0.3),
                       lambda q, k, v: sparse_attention_ref(q, k, v, indices, causal=causal, scale=0.3), inputs,
                       1e-5, name=f"sparse_attention ({strategy})")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradients_in_16_bit(strategy, dtype):
    inputs = _grad_inputs(1, 4, 2, 9, 13, 16, 8, dtype)
    indices = _random_indices((1, 9), 6, 13)
    assert_grads_match(lambda q, k, v: sparse_attention(q, k, v, indices, causal=True),
                       lambda q, k, v: sparse_attention_ref(q, k, v, indices, causal=True), inputs, tolerance(dtype),
                       name=f"sparse_attention ({strategy})")


def test_gradcheck_float64_torch_backend(strategy):
    q, k, v = _grad_inputs(1, 2, 1, 5, 7, 4, 3, torch.float64)
    indices = _random_indices((1, 5), 4, 7)
    indices[0, 2, 1] = indices[0, 2, 0]
    assert torch.autograd.gradcheck(lambda q, k, v: sparse_attention(q, k, v, indices, causal=True,
                                                                     backend="torch"), (q, k, v))


def test_backward_memory_chunks(strategy, monkeypatch):
    """The backward recomputes chunk by chunk, like the forward: no score block holds more than one chunk of
    rows (gather: [rows, topk] per head; dense: [rows, Sk] within the score budget), never [Sq, Sk]."""
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 2 * 16 * 24)  # gather: 2 rows of 16 x (16 + 8)
    monkeypatch.setattr(torch_backend, "DENSE_CHUNK_ELEMENTS", 2 * 4 * 64)  # dense: 2 rows of 4 x 64
    rows = []
    einsum = torch.einsum
    monkeypatch.setattr(torch, "einsum", lambda eq, *ops: rows.append((eq, einsum(eq, *ops).shape)) or einsum(eq, *ops))
    q, k, v = _grad_inputs(1, 4, 1, 64, 64, 16, 8)
    indices = _random_indices((1, 64), 16, 64)
    sparse_attention(q, k, v, indices, causal=True).sum().backward()
    assert q.grad is not None and k.grad is not None
    scores = [shape for eq, shape in rows if eq.endswith("->bhgct") or eq.endswith("->bhgck")]
    assert scores and max(shape[-2] for shape in scores) <= 2


def test_no_silent_detach(triton_device):
    """A gradient is wanted: auto and an explicit backend="triton" both return a graph, and with "triton" it
    is the Triton backward that runs (and is correct)."""
    from dsattn.triton_kernels import sparse_attention as kernels

    q, k, v = _grad_inputs(1, 2, 1, 5, 9, 16, 16, device=triton_device)
    indices = _random_indices((1, 5), 4, 9, device=triton_device)
    assert sparse_attention(q, k, v, indices).grad_fn is not None
    calls = []
    backward = kernels.sparse_attention_backward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "sparse_attention_backward", lambda *a, **kw: calls.append(1) or backward(*a, **kw))
        assert_grads_match(lambda q, k, v: sparse_attention(q, k, v, indices, backend="triton"),
                           lambda q, k, v: sparse_attention_ref(q, k, v, indices), [q, k, v],
                           tolerance(q.dtype, tf32=triton_device == "cuda"), name="sparse_attention")
    assert calls, "backend='triton' did not run the Triton backward"
    with torch.no_grad():
        assert_close(sparse_attention(q, k, v, indices, backend="triton"), sparse_attention_ref(q, k, v, indices))


TRITON_GRAD_CASES = {
    # name: (b, hq, hkv, sq, sk, dqk, dv, topk, per_head, causal, transposed, dtype)
    "gqa_dqk_ne_dv_chunked_prefill": (2, 4, 2, 7, 19, 24, 16, 9, False, True, False, torch.float32),
    "per_head_two_topk_blocks_strided": (1, 6, 3, 5, 30, 32, 32, 40, True, False, True, torch.float32),
    "mla_dims_mqa": (1, 8, 1, 3, 29, 192, 128, 16, False, True, False, torch.float32),
    "mla_latent_576_512": (1, 16, 1, 2, 20, 576, 512, 8, False, True, False, torch.float32),
    "two_head_blocks": (1, 66, 1, 2, 11, 16, 16, 5, False, False, False, torch.float32),
    "bf16_gqa": (1, 4, 2, 9, 13, 16, 8, 6, False, True, False, torch.bfloat16),
    "bf16_per_head_strided": (1, 4, 2, 6, 21, 64, 64, 12, True, True, True, torch.bfloat16),
}


@pytest.mark.parametrize("case", list(TRITON_GRAD_CASES))
def test_triton_gradients_match_float64_autograd_of_the_oracle(triton_device, case):
    """The Triton backward (through the functional entry: the training forward saves lse) on lists with -1
    entries, an all -1 row, a duplicated key (its gradient counts once per listing) and, causal, keys after
    the query's position (Sq < Sk: query i at i + Sk - Sq)."""
    b, hq, hkv, sq, sk, dqk, dv, topk, per_head, causal, transposed, dtype = TRITON_GRAD_CASES[case]
    inputs = _grad_inputs(b, hq, hkv, sq, sk, dqk, dv, dtype, triton_device, transposed=transposed)
    indices = _random_indices((b, hkv, sq) if per_head else (b, sq), topk, sk, device=triton_device)
    indices[..., 1, :] = -1  # a row with no key: zeros out, zero gradients
    indices[..., -1, -2:] = indices[..., -1, :1]  # a duplicated key
    if causal:
        indices[..., 0, 0] = sk - 1  # a listed future key (query 0 sits at Sk - Sq)
    rtol = tolerance(dtype, tf32=triton_device == "cuda")
    assert_grads_match(lambda q, k, v: sparse_attention(q, k, v, indices, causal=causal, scale=0.3, backend="triton"),
                       lambda q, k, v: sparse_attention_ref(q, k, v, indices, causal=causal, scale=0.3), inputs, rtol,
                       name=f"sparse_attention triton ({case})")


def test_triton_gradients_of_rows_without_keys_are_zero(triton_device):
    """Rows that list only -1 or only future keys: zero output, and they give no gradient anywhere."""
    q, k, v = _grad_inputs(1, 2, 1, 4, 10, 16, 16, device=triton_device)
    indices = torch.tensor([[[0, 6, -1], [-1, -1, -1], [9, -1, 9], [3, 9, 1]]], dtype=torch.int32,
                           device=triton_device)  # row 2 sits at position 8: keys 9 are future
    out = sparse_attention(q, k, v, indices, causal=True, backend="triton")
    grad = torch.zeros_like(out)
    grad[:, :, 1:3] = 1.0  # only the empty rows carry a cotangent
    out.backward(grad)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t)), "a row without keys produced a gradient"


def test_triton_backward_keeps_non_finite_unlisted_keys_out(triton_device):
    """NaN / Inf in k/v rows no row lists (or lists only as a future key, or as -1) reach neither the outputs
    nor any gradient of the Triton backward: equal to the clean inputs'."""
    q, k, v = _inputs(1, 2, 1, 4, 8, 16, 16, device=triton_device)
    indices = torch.tensor([[[0, 1, -1], [1, 2, 7], [0, 3, -1], [3, 2, 1]]], dtype=torch.int32, device=triton_device)
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[:, :, 7], bad_v[:, :, 7] = float("nan"), float("inf")  # row 1 lists key 7 after its position
    bad_k[:, :, 5], bad_v[:, :, 6] = float("-inf"), float("nan")  # listed by no row
    results = []
    for leaves in ([t.clone().requires_grad_(True) for t in (q, k, v)],
                   [t.clone().requires_grad_(True) for t in (q, bad_k, bad_v)]):
        out = sparse_attention(*leaves, indices, causal=True, backend="triton")
        out.backward(torch.ones_like(out))
        results.append([out, *(t.grad for t in leaves)])
    for clean, dirty in zip(*results):
        assert torch.equal(clean, dirty)


def test_triton_backward_through_the_public_op(triton_device):
    """torch.ops.dsattn.sparse_attention called directly (no saved lse), int64 per-head lists: its backward
    recomputes (out, lse) with the training forward."""
    q, k, v = _grad_inputs(1, 4, 2, 6, 17, 16, 8, device=triton_device)
    indices = _random_indices((1, 2, 6), 7, 17, device=triton_device).long()
    assert_grads_match(lambda q, k, v: torch.ops.dsattn.sparse_attention(q, k, v, indices, True, 0.3, "triton"),
                       lambda q, k, v: sparse_attention_ref(q, k, v, indices, causal=True, scale=0.3), [q, k, v],
                       tolerance(q.dtype, tf32=triton_device == "cuda"), name="sparse_attention")


def test_triton_backward_compiles(triton_device):
    """The Triton training forward and backward ops under torch.compile(fullgraph, aot_eager)."""
    inputs = [*_grad_inputs(1, 4, 2, 7, 13, 16, 8, device=triton_device, transposed=True),
              _random_indices((1, 7), 5, 13, device=triton_device)]
    assert_compiles(lambda q, k, v, i: sparse_attention(q, k, v, i, causal=True, backend="triton"), inputs,
                    backends=("aot_eager",), name="sparse_attention triton")


def test_opcheck():
    q, k, v = (t.detach() for t in _grad_inputs(1, 4, 2, 5, 11, 16, 8))
    backends = ["torch"] + (["triton"] if dsattn._backend.unusable_reason("triton", q.device) is None else [])
    indices = _random_indices((1, 5), 6, 11)
    for backend in backends:
        torch.library.opcheck(torch.ops.dsattn.sparse_attention,
                              (q.requires_grad_(True), k, v, indices, True, 0.25, backend))
    if "triton" in backends:
        torch.library.opcheck(torch.ops.dsattn.sparse_attention_fwd_lse,
                              (q.requires_grad_(True), k.requires_grad_(True), v, indices, True, 0.25))
    # Per-head int64 lists: schema and fake kernel (the traced autograd path is the one above).
    torch.library.opcheck(torch.ops.dsattn.sparse_attention,
                          (q, k, v, _random_indices((1, 2, 5), 6, 11).long(), True, 0.25, "torch"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compiles_fullgraph_and_equals_eager():
    inputs = [*_grad_inputs(1, 4, 2, 13, 13, 16, 8, transposed=True), _random_indices((1, 13), 5, 13)]
    assert_compiles(lambda q, k, v, i: sparse_attention(q, k, v, i, causal=True), inputs, name="sparse_attention")
    with torch.no_grad():
        assert_compiles(lambda q, k, v, i: sparse_attention(q[:, :, -1:], k, v, i[:, -1:], causal=True), inputs,
                        name="decode")


def test_range_check_is_eager_only_and_bad_entries_read_nothing():
    """Under torch.compile the host-side range check is skipped; an out-of-range entry is then "no key" on
    every backend (and an int64 one does not wrap into range when converted to int32)."""
    q, k, v = _inputs(1, 2, 1, 4, 9, 16, 8)
    indices = _random_indices((1, 4), 5, 9)
    bad = indices.clone().long()
    bad[0, :, 0] = torch.tensor([9, 2**32 + 1, -7, 100])
    none = bad.clone()
    none[0, :, 0] = -1
    with pytest.raises(ValueError, match="indices must lie in"):
        sparse_attention(q, k, v, bad)
    compiled = torch.compile(lambda q, k, v, i: sparse_attention(q, k, v, i), fullgraph=True, backend="aot_eager")
    assert_close(compiled(q, k, v, bad), sparse_attention(q, k, v, none), 1e-6)
    torch._dynamo.reset()
    backends = ["torch"] + (["triton"] if dsattn._backend.unusable_reason("triton", q.device) is None else [])
    for backend in backends:
        got = torch.ops.dsattn.sparse_attention(q, k, v, bad, False, 0.25, backend)
        assert_close(got, sparse_attention_ref(q, k, v, none, scale=0.25), 1e-5, name=backend)


def test_int32_offset_limit_is_declared_and_checked():
    """128 heads of 128 dims in a transposed [B, S, H, D] k at S=128k reach past int32 offsets within one
    (batch, kv head) slice (meta tensors: no memory): a backend that declares int32 offsets refuses them; the
    sparse kernel indexes in 64 bits there, so neither op's Triton backend declares a limit."""
    k = torch.empty(2, 2**17 + 64, 128, 128, device="meta").transpose(1, 2)
    offset = capabilities.max_offset(k[0, 0])
    assert offset >= 2**31
    request = capabilities.Request(dtype=torch.bfloat16, offset=offset)
    int32 = capabilities.Capability(dtypes=capabilities.KERNEL_FLOATS, max_offset=capabilities.INT32_OFFSETS)
    assert "int32 offsets" in str(int32.refusal(request))
    for op in ("sparse_attention", "topk_sparse_attention"):
        assert capabilities.of(op)["triton"].refusal(request) is None
        assert capabilities.of(op)["torch"].refusal(request) is None


def test_triton_offsets_past_int32(triton_device):
    """Listed keys past element 2^31 of their (batch, kv head) slice and a GQA group whose second q head lies
    there too (strided views of lazily allocated buffers: only the touched rows are ever written)."""
    seq_k, stride, d, hq, topk = 2**17 + 64, 2**14, 16, 2, 8
    try:
        k_buf = torch.empty(seq_k * stride, dtype=torch.float16, device=triton_device)
        v_buf = torch.empty(seq_k * stride, dtype=torch.float16, device=triton_device)
        q_buf = torch.empty(2**31 + 2 * d, dtype=torch.float16, device=triton_device)
    except (RuntimeError, MemoryError):
        pytest.skip("cannot reserve the address ranges")
    k = k_buf.as_strided((1, 1, seq_k, d), (0, d, stride, 1))
    v = v_buf.as_strided((1, 1, seq_k, d), (0, d, stride, 1))
    q = q_buf.as_strided((1, hq, 2, d), (0, 2**31, d, 1))  # head 1 starts at element 2^31
    lo = seq_k - 2 * topk
    assert lo * stride > 2**31
    k[:, :, lo:] = torch.randn(1, 1, seq_k - lo, d, dtype=torch.float16, device=triton_device)
    v[:, :, lo:] = torch.randn(1, 1, seq_k - lo, d, dtype=torch.float16, device=triton_device)
    q.copy_(torch.randn(1, hq, 2, d, dtype=torch.float16, device=triton_device))
    generator = torch.Generator().manual_seed(0)
    local = torch.stack([torch.randperm(seq_k - lo, generator=generator)[:topk] for _ in range(2)])[None]
    local = local.to(torch.int32).to(triton_device)  # [1, Sq=2, topk], keys counted from lo
    got = sparse_attention(q, k, v, local + lo, causal=True, backend="triton")
    expected = sparse_attention_ref(q.contiguous(), k[:, :, lo:].contiguous(), v[:, :, lo:].contiguous(), local,
                                    causal=True)
    assert_close(got, expected, tolerance(torch.float16))
