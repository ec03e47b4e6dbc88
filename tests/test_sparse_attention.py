"""dsattn.sparse_attention: the chunked reference proven in float64 against a brute-force loop, the Triton
kernel (interpreter on CPU, compiled on a GPU) against the reference, and bad input rejected by name."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from dsattn.ops.sparse_attention import sparse_attention
from dsattn.reference.sparse_attention import sparse_attention as sparse_attention_ref
from dsattn.testing import assert_close, non_contiguous, poisoned, tolerance


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


# ----------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("strategy", ["gather", "dense"])
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
    actual = sparse_attention_ref(q, k, v, indices, causal=causal, scale=scale, chunk_size=2, strategy=strategy)
    assert_close(actual, expected, 1e-12)
    assert torch.equal(actual[:, :, 0], torch.zeros_like(actual[:, :, 0]))


def test_reference_listing_every_key_is_dense_causal_attention():
    q, k, v = _inputs(2, 4, 2, 9, 9, 8, 8, torch.float64)
    indices = torch.arange(9, dtype=torch.int32).flip(0).expand(2, 9, 9)  # every key, in any order
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_close(sparse_attention_ref(q, k, v, indices, causal=True), expected, 1e-12)


@pytest.mark.parametrize("hq,hkv,sq,sk,topk,picks", [(4, 4, 64, 64, 16, "dense"), (8, 1, 1, 512, 4, "gather")])
def test_reference_auto_strategy(hq, hkv, sq, sk, topk, picks, monkeypatch):
    """auto takes dense when topk is a sizeable part of the keys (prefill) and gather when it is not (decode);
    both give the same numbers (fp32)."""
    module = importlib.import_module("dsattn.reference.sparse_attention")  # the package attribute is the function
    q, k, v = _inputs(1, hq, hkv, sq, sk, 16, 8)
    indices = _random_indices((1, sq), topk, sk)
    taken = []
    for name in ("_dense", "_gather"):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=real: (taken.append(_n), _f(*a))[1])
    auto = sparse_attention_ref(q, k, v, indices, causal=True)
    assert taken == [f"_{picks}"]
    other = "gather" if picks == "dense" else "dense"
    assert_close(auto, sparse_attention_ref(q, k, v, indices, causal=True, strategy=other), 1e-5)
    with pytest.raises(ValueError, match="strategy"):
        sparse_attention_ref(q, k, v, indices, strategy="sparse")


@pytest.mark.parametrize("strategy", ["gather", "dense"])
def test_duplicates_count_once_per_listing(strategy):
    q, k, v = _inputs(1, 1, 1, 1, 4, 4, 4, torch.float64)
    once = sparse_attention_ref(q, k, v, torch.tensor([[[0, 2]]], dtype=torch.int32), strategy=strategy)
    twice = sparse_attention_ref(q, k, v, torch.tensor([[[0, 0, 2]]], dtype=torch.int32), strategy=strategy)
    s = (q[0, 0, 0] @ k[0, 0, [0, 2]].T) * 4**-0.5
    w = torch.softmax(s + torch.tensor([2.0, 1.0], dtype=torch.float64).log(), dim=0)  # key 0 weighs double
    assert_close(twice[0, 0, 0], w @ v[0, 0, [0, 2]], 1e-12)
    assert not torch.allclose(once, twice)


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
    expected = sparse_attention_ref(q, k, v, indices, causal=True)
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
    with pytest.raises(ValueError, match="backend='cpp' is not implemented"):
        sparse_attention(q, k, v, idx, backend="cpp")
    with pytest.raises(TypeError, match="backend='triton' supports"):
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
