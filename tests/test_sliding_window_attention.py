"""Sliding-window attention: the oracle and the torch backend against brute force in float64, the Triton
kernels (prefill, split-K decode, varlen; the interpreter on CPU) against the oracle, the custom op (opcheck,
gradients against float64 autograd of the oracle, torch.compile, no silent detach), and bad input."""

import pytest
import torch

import dsattn
from dsattn import capabilities
from dsattn.torch_backend import sliding_window_attention as torch_backend
from dsattn.reference.sliding_window_attention import sliding_window_attention as reference
from dsattn.reference.sliding_window_attention import sliding_window_attention_varlen as reference_varlen
from dsattn.testing import assert_close, assert_compiles, assert_grads_match, non_contiguous, poisoned, tolerance

swa = dsattn.sliding_window_attention
sliding_window_attention_varlen = dsattn.sliding_window_attention_varlen


def brute_force(q, k, v, window, causal, scale, sinks):
    """One row at a time, straight from SPEC's visibility rule, with the sink as an extra softmax logit."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    out = torch.zeros(b, hq, sq, v.shape[3], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            for i in range(sq):
                p = i + sk - sq
                keys = [j for j in range(sk) if (p - window < j <= p if causal else abs(p - j) < window)]
                if not keys:
                    continue
                logits = torch.stack([q[bi, h, i].double() @ k[bi, kv, j].double() * scale for j in keys])
                if sinks is not None:
                    logits = torch.cat([logits, sinks[h : h + 1].double()])
                weights = torch.softmax(logits, 0)[: len(keys)]
                out[bi, h, i] = sum(w * v[bi, kv, j].double() for w, j in zip(weights, keys))
    return out


def make_qkv(b, hq, hkv, sq, sk, dqk, dv, dtype=torch.float32, device="cpu"):
    q = torch.randn(b, hq, sq, dqk, dtype=dtype, device=device)
    k = torch.randn(b, hkv, sk, dqk, dtype=dtype, device=device)
    v = torch.randn(b, hkv, sk, dv, dtype=dtype, device=device)
    return q, k, v


# ----------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize(
    "b,hq,hkv,sq,sk,dqk,dv,window,causal,with_sinks",
    [
        (1, 4, 2, 9, 9, 8, 4, 3, True, True),  # GQA, Dqk != Dv, sinks
        (2, 2, 1, 7, 7, 4, 4, 1, True, False),  # window 1: the diagonal only
        (1, 2, 2, 3, 11, 4, 6, 4, True, True),  # Sq < Sk (chunked prefill)
        (1, 2, 1, 6, 3, 4, 4, 2, True, True),  # Sq > Sk: leading rows see nothing -> zeros
        (1, 3, 1, 8, 8, 4, 4, 20, True, False),  # window >= Sk: full causal
        (2, 2, 2, 7, 7, 4, 4, 3, False, True),  # symmetric window
    ],
)
@pytest.mark.parametrize("chunk_size", ["oracle", 2, None])
def test_reference_and_torch_backend_match_brute_force(b, hq, hkv, sq, sk, dqk, dv, window, causal, with_sinks,
                                                       chunk_size):
    q, k, v = make_qkv(b, hq, hkv, sq, sk, dqk, dv, torch.float64)
    sinks = torch.randn(hq, dtype=torch.float64) if with_sinks else None
    if chunk_size == "oracle":
        out = reference(q, k, v, window, causal=causal, scale=0.4, sinks=sinks)
    else:
        out = torch_backend.sliding_window_attention(q, k, v, window, causal=causal, scale=0.4, sinks=sinks,
                                                     chunk_size=chunk_size)
    assert_close(out, brute_force(q, k, v, window, causal, 0.4, sinks), 1e-12)
    if sq > sk:
        assert torch.all(out[:, :, : sq - sk] == 0)


def test_reference_full_window_equals_sdpa_causal():
    q, k, v = make_qkv(1, 4, 4, 33, 33, 16, 16, torch.float64)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(reference(q, k, v, 10**9), expected, 1e-12)


def test_torch_backend_memory_is_o_s_times_window(monkeypatch):
    """No [Sq, Sk] tensor: every score block the torch backend builds spans at most chunk + 2 * window keys."""
    module = torch_backend
    widest = []
    matmul = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b: widest.append(matmul(a, b).shape[-1]) or matmul(a, b))
    q, k, v = make_qkv(1, 2, 1, 2048, 2048, 8, 8)
    out = module.sliding_window_attention(q, k, v, 16)
    assert widest and max(widest) <= module.MIN_CHUNK + 2 * 16
    assert_close(out[:, :, -64:], reference(q[:, :, -64:], k, v, 16), 1e-6)


def test_varlen_reference_matches_brute_force():
    lens_q, lens_k = [3, 0, 5, 2], [3, 4, 7, 0]
    q = torch.randn(sum(lens_q), 4, 8, dtype=torch.float64)
    k = torch.randn(sum(lens_k), 2, 8, dtype=torch.float64)
    v = torch.randn(sum(lens_k), 2, 6, dtype=torch.float64)
    sinks = torch.randn(4, dtype=torch.float64)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    out = reference_varlen(q, k, v, cu_q, cu_k, 5, 7, 3, sinks=sinks)
    for s in range(len(lens_q)):
        q0, q1, k0, k1 = cu_q[s].item(), cu_q[s + 1].item(), cu_k[s].item(), cu_k[s + 1].item()
        if q1 == q0:
            continue
        seq = [t[a:z].transpose(0, 1)[None] for t, a, z in ((q, q0, q1), (k, k0, k1), (v, k0, k1))]
        expected = brute_force(*seq, 3, True, 8**-0.5, sinks)[0].transpose(0, 1)
        assert_close(out[q0:q1], expected, 1e-12)
    assert torch.all(out[cu_q[3] : cu_q[4]] == 0)  # a sequence without keys outputs zeros


# ----------------------------------------------------------------------------------------- triton
def _cu(lengths, device="cpu"):
    return torch.tensor([0] + lengths, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)


def _run_triton(q, k, v, window, causal=True, scale=None, sinks=None):
    """The kernels through the launcher with a NaN-poisoned output buffer: every element must be written."""
    from dsattn.triton_kernels import sliding_window_attention as kernels

    out = poisoned((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), q.dtype, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kernels.sliding_window_attention(q, k, v, window, causal, scale, None if sinks is None else sinks.float(), out=out)
    return out


@pytest.mark.parametrize(
    "hq,hkv,sq,sk,dqk,dv,window,causal,with_sinks,dtype",
    [
        (4, 1, 17, 17, 64, 64, 7, True, True, torch.float32),  # GQA 4, sinks
        (8, 1, 129, 129, 32, 16, 64, True, False, torch.bfloat16),  # GQA 8, Dqk != Dv
        (2, 2, 129, 129, 64, 64, 200, True, True, torch.float16),  # window >= S: full causal
        (2, 2, 33, 100, 24, 40, 1, True, False, torch.float32),  # chunked prefill, window 1, odd dims
        (2, 1, 40, 20, 16, 16, 5, True, True, torch.float32),  # Sq > Sk: rows with no key -> 0
        (128, 1, 1, 50, 16, 16, 7, True, True, torch.float32),  # Sq = 1 with 128 groups: the prefill kernel
        (2, 1, 45, 45, 16, 16, 7, False, True, torch.float32),  # symmetric window
        (1, 1, 300, 300, 16, 16, 100, False, False, torch.float32),  # symmetric, unmasked interior blocks
        (2, 1, 300, 300, 32, 32, 200, True, True, torch.bfloat16),  # unmasked interior blocks
        (1, 1, 1000, 1000, 16, 16, 64, True, False, torch.float32),  # long-ish: only the window's blocks
        (1, 1, 1000, 1000, 16, 16, 333, True, False, torch.float16),
    ],
)
def test_triton_prefill_matches_reference(triton_device, hq, hkv, sq, sk, dqk, dv, window, causal, with_sinks, dtype):
    q, k, v = make_qkv(1, hq, hkv, sq, sk, dqk, dv, dtype, triton_device)
    sinks = torch.randn(hq, device=triton_device) if with_sinks else None
    out = _run_triton(q, k, v, window, causal, sinks=sinks)
    expected = reference(q, k, v, window, causal=causal, sinks=sinks)
    assert_close(out, expected, tolerance(dtype, tf32=False))


def test_triton_non_contiguous_inputs(triton_device):
    # [B, S, H, D] memory seen as [B, H, S, D] (what transformers hands over), and a strided head-dim slice.
    q, k, v = make_qkv(2, 4, 2, 37, 37, 32, 32, torch.float32, triton_device)
    sinks = torch.randn(4, device=triton_device)
    expected = reference(q, k, v, 9, sinks=sinks)
    q_nc, k_nc, v_nc = non_contiguous(q), non_contiguous(k), torch.cat([v, v], -1)[..., ::2]
    assert not (q_nc.is_contiguous() or k_nc.is_contiguous())
    v_nc.copy_(v)
    assert_close(swa(q_nc, k_nc, v_nc, 9, sinks=sinks, backend="triton"), expected)
    # Decode through the same strided views.
    assert_close(swa(q_nc[:, :, -1:], k_nc, v_nc, 9, sinks=sinks, backend="triton"), expected[:, :, -1:])


@pytest.mark.parametrize(
    "hq,hkv,sq,sk,window,with_sinks,dtype",
    [
        (8, 1, 1, 300, 64, True, torch.float32),  # Sq = 1, GQA 8
        (4, 4, 1, 257, 1000, False, torch.bfloat16),  # window >= cache
        (4, 1, 3, 211, 7, True, torch.float16),  # a few rows at once (chunked decode)
        (2, 2, 1, 1, 1, True, torch.float32),  # a one-token cache
        (32, 1, 1, 300, 64, True, torch.float16),  # MQA-like: the 64-row tile
        (16, 1, 3, 150, 20, False, torch.bfloat16),  # 48 rows: the 64-row tile, chunked decode
    ],
)
def test_triton_decode_matches_reference(triton_device, monkeypatch, hq, hkv, sq, sk, window, with_sinks, dtype):
    from dsattn.triton_kernels import sliding_window_attention as kernels

    monkeypatch.setattr(kernels, "MIN_KEYS_PER_SPLIT", 32)  # several splits even on these short caches
    q, k, v = make_qkv(2, hq, hkv, sq, sk, 32, 16, dtype, triton_device)
    sinks = torch.randn(hq, device=triton_device) if with_sinks else None
    out = _run_triton(q, k, v, window, sinks=sinks)
    assert_close(out, reference(q, k, v, window, sinks=sinks), tolerance(dtype))


def test_decode_splits_only_cover_the_window(triton_device, monkeypatch):
    """Decode reads the window's keys only: poisoning the cache before the window changes nothing."""
    from dsattn.triton_kernels import sliding_window_attention as kernels

    monkeypatch.setattr(kernels, "MIN_KEYS_PER_SPLIT", 32)
    q, k, v = make_qkv(1, 4, 1, 1, 500, 32, 32, torch.float32, triton_device)
    expected = reference(q, k, v, 100)
    k[:, :, :400] = float("nan")
    v[:, :, :400] = float("nan")
    assert_close(_run_triton(q, k, v, 100), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_varlen_matches_reference(triton_device, dtype):
    from dsattn.triton_kernels import sliding_window_attention as kernels

    lens_q, lens_k = [17, 1, 0, 70, 5], [17, 90, 3, 70, 0]  # uneven, decode-like, empty q, empty k
    hq, hkv = 4, 2
    q = torch.randn(sum(lens_q), hq, 32, dtype=dtype, device=triton_device)
    k = torch.randn(sum(lens_k), hkv, 32, dtype=dtype, device=triton_device)
    v = torch.randn(sum(lens_k), hkv, 24, dtype=dtype, device=triton_device)
    sinks = torch.randn(hq, device=triton_device)
    cu_q, cu_k = _cu(lens_q, triton_device), _cu(lens_k, triton_device)
    expected = reference_varlen(q, k, v, cu_q, cu_k, 70, 90, 13, sinks=sinks)
    out = poisoned((sum(lens_q), hq, 24), dtype, triton_device)
    kernels.sliding_window_attention_varlen(q, k, v, cu_q, cu_k, 70, 13, True, 32**-0.5, sinks, out=out)
    assert_close(out, expected, tolerance(dtype))
    assert torch.all(out[cu_q[4] : cu_q[5]] == 0)
    # The public entry, with strided (non-contiguous) token-major inputs.
    q_nc = q.transpose(0, 1).contiguous().transpose(0, 1)  # head-major memory
    v_nc = non_contiguous(v)  # a strided head dim
    assert not (q_nc.is_contiguous() or v_nc.is_contiguous())
    got = sliding_window_attention_varlen(q_nc, k, v_nc, cu_q, cu_k, 70, 90, 13, sinks=sinks, backend="triton")
    assert_close(got, expected, tolerance(dtype))


def test_torch_backend_and_auto(device):
    q, k, v = make_qkv(1, 2, 1, 20, 20, 16, 16, torch.float32, device)
    expected = reference(q, k, v, 5)
    assert_close(swa(q, k, v, 5, backend="torch"), expected)
    assert_close(swa(q, k, v, 5), expected, 3e-4)  # auto: triton on CUDA (tf32-free fp32), torch on CPU


def test_triton_head_dim_limit(triton_device):
    q, k, v = make_qkv(1, 1, 1, 4, 4, 576, 512, torch.float32, triton_device)
    with pytest.raises(ValueError, match="backend='triton' takes head dims up to 256, got 576"):
        swa(q, k, v, 4, backend="triton")
    # "auto" falls back to the reference, which takes any width (MLA 576/512).
    assert_close(swa(q, k, v, 4), reference(q, k, v, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_long_prefill_and_decode(dtype):
    q, k, v = make_qkv(1, 8, 2, 4096, 4096, 128, 128, dtype, "cuda")
    sinks = torch.randn(8, device="cuda")
    assert_close(swa(q, k, v, 1024, sinks=sinks), reference(q, k, v, 1024, sinks=sinks), tolerance(dtype))
    assert_close(swa(q[:, :, -1:], k, v, 1024, sinks=sinks), reference(q[:, :, -1:], k, v, 1024, sinks=sinks),
                 tolerance(dtype))


# ----------------------------------------------------------------------------------------- bad input
def test_bad_input_is_named():
    q, k, v = make_qkv(1, 4, 2, 5, 5, 8, 8)
    with pytest.raises(ValueError, match="window must be >= 1"):
        swa(q, k, v, 0)
    with pytest.raises(TypeError, match="window must be an int"):
        swa(q, k, v, 2.0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        swa(q, k, v, 2, causal=1)
    with pytest.raises(ValueError, match="q must be 4-D"):
        swa(q[0], k, v, 2)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        swa(q[:, :3], k, v, 2)
    with pytest.raises(ValueError, match="k head dim"):
        swa(q, k[..., :4], v, 2)
    with pytest.raises(TypeError, match="v has dtype"):
        swa(q, k, v.half(), 2)
    with pytest.raises(TypeError, match="q must have dtype"):
        swa(q.int(), k.int(), v.int(), 2)
    with pytest.raises(ValueError, match=r"sinks must have shape \[4\]"):
        swa(q, k, v, 2, sinks=torch.zeros(2))
    with pytest.raises(ValueError, match="sinks must be 1-D"):
        swa(q, k, v, 2, sinks=torch.zeros(1, 4))
    with pytest.raises(TypeError, match="sinks must have dtype"):
        swa(q, k, v, 2, sinks=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="scale must be a float"):
        swa(q, k, v, 2, scale="x")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a positive finite number"):
            swa(q, k, v, 2, scale=bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        swa(q, k, v, 2, backend="nope")
    with pytest.raises(ValueError, match="'cuda' is not implemented"):
        swa(q, k, v, 2, backend="cuda")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="k is on"):
            swa(q, k.cuda(), v, 2)
        with pytest.raises(ValueError, match="sinks is on"):
            swa(q, k, v, 2, sinks=torch.zeros(4, device="cuda"))


def test_varlen_bad_input_is_named():
    q, k, v = torch.randn(6, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    cu_q, cu_k = _cu([2, 4]), _cu([4, 5])
    assert sliding_window_attention_varlen(q, k, v, cu_q, cu_k, 4, 5, 3).shape == (6, 4, 8)
    with pytest.raises(ValueError, match="q must be 3-D"):
        sliding_window_attention_varlen(q[None], k, v, cu_q, cu_k, 4, 5, 3)
    with pytest.raises(ValueError, match="window must be >= 1"):
        sliding_window_attention_varlen(q, k, v, cu_q, cu_k, 4, 5, 0)
    with pytest.raises(ValueError, match="k and v must agree"):
        sliding_window_attention_varlen(q, k, v[:8], cu_q, cu_k, 4, 5, 3)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        sliding_window_attention_varlen(q[:, :3], k, v, cu_q, cu_k, 4, 5, 3)
    with pytest.raises(TypeError, match="cu_seqlens_q must have dtype"):
        sliding_window_attention_varlen(q, k, v, cu_q.long(), cu_k, 4, 5, 3)
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0 and end at the token count 9"):
        sliding_window_attention_varlen(q, k, v, cu_q, _cu([4, 4]), 4, 5, 3)
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        sliding_window_attention_varlen(q, k, v, torch.tensor([0, 7, 6], dtype=torch.int32), cu_k, 7, 5, 3)
    with pytest.raises(ValueError, match="same length"):
        sliding_window_attention_varlen(q, k, v, cu_q, _cu([4, 5, 0]), 4, 5, 3)
    with pytest.raises(ValueError, match="max_seqlen_q=3 is shorter"):
        sliding_window_attention_varlen(q, k, v, cu_q, cu_k, 3, 5, 3)
    with pytest.raises(TypeError, match="max_seqlen_k must be an int"):
        sliding_window_attention_varlen(q, k, v, cu_q, cu_k, 4, 5.0, 3)
    with pytest.raises(ValueError, match=r"sinks must have shape \[4\]"):
        sliding_window_attention_varlen(q, k, v, cu_q, cu_k, 4, 5, 3, sinks=torch.zeros(3))


def test_triton_rejects_float64(triton_device):
    q, k, v = make_qkv(1, 2, 1, 5, 5, 8, 8, torch.float64, triton_device)
    with pytest.raises(TypeError, match="backend='triton' takes float16, bfloat16, float32 inputs, got float64"):
        swa(q, k, v, 2, backend="triton")
    with pytest.raises(TypeError, match="takes float16, bfloat16, float32 inputs"):
        sliding_window_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), _cu([5]), _cu([5]), 5, 5, 2,
                   backend="triton")
    assert_close(swa(q, k, v, 2), reference(q, k, v, 2), 1e-12)  # "auto" computes float64 in the reference


# ----------------------------------------------------------------------------------------- the custom op
def _grad_inputs(b, hq, hkv, sq, sk, dqk, dv, dtype, device="cpu", sinks=True, transposed=False):
    q, k, v = make_qkv(b, hq, hkv, sq, sk, dqk, dv, dtype, device)
    if transposed:  # [B, S, H, D] memory, as transformers hands it over
        q, k, v = (non_contiguous(t) for t in (q, k, v))
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    s = torch.randn(hq, dtype=dtype, device=device, requires_grad=True) if sinks else None
    return [*leaves, s]


@pytest.mark.parametrize(
    "b,hq,hkv,sq,sk,dqk,dv,window,causal,sinks,transposed",
    [
        (2, 4, 2, 37, 37, 16, 8, 9, True, True, False),  # GQA, Dqk != Dv, sinks
        (1, 2, 1, 13, 53, 24, 16, 7, True, False, True),  # Sq < Sk, non-contiguous
        (1, 3, 3, 21, 21, 12, 12, 5, False, True, False),  # symmetric window
        (1, 4, 1, 30, 30, 8, 8, 100, True, True, True),  # window >= S: full causal
        (1, 2, 1, 10, 4, 8, 8, 3, True, True, False),  # Sq > Sk: rows that see nothing
    ],
)
def test_gradients_match_float64_autograd_of_the_oracle(b, hq, hkv, sq, sk, dqk, dv, window, causal, sinks,
                                                          transposed):
    inputs = _grad_inputs(b, hq, hkv, sq, sk, dqk, dv, torch.float32, sinks=sinks, transposed=transposed)

    def run(q, k, v, s):
        return swa(q, k, v, window, causal=causal, sinks=s)

    def oracle(q, k, v, s):
        return reference(q, k, v, window, causal=causal, sinks=s)

    assert_grads_match(run, oracle, inputs, 1e-5, name="sliding_window_attention")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradients_in_16_bit(dtype):
    inputs = _grad_inputs(1, 4, 2, 33, 33, 32, 16, dtype)
    assert_grads_match(lambda q, k, v, s: swa(q, k, v, 8, sinks=s), lambda q, k, v, s: reference(q, k, v, 8, sinks=s),
                       inputs, tolerance(dtype), name="sliding_window_attention")


def test_gradcheck_float64_torch_backend():
    q, k, v, s = _grad_inputs(1, 2, 1, 7, 9, 4, 3, torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v, s: swa(q, k, v, 3, sinks=s, backend="torch"), (q, k, v, s))


def test_backward_memory_chunks(monkeypatch):
    """The backward recomputes chunk by chunk: no score block wider than chunk + 2 * window keys."""
    widest = []
    matmul = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b: widest.append(matmul(a, b).shape[-1]) or matmul(a, b))
    q, k, v, _ = _grad_inputs(1, 2, 1, 1024, 1024, 8, 8, torch.float32, sinks=False)
    swa(q, k, v, 16).sum().backward()
    assert q.grad is not None and max(widest) <= torch_backend.MIN_CHUNK + 2 * 16


def test_no_silent_detach(triton_device):
    """A gradient is wanted: triton has a backward, which is what runs (and is correct)."""
    q, k, v, s = _grad_inputs(1, 2, 1, 9, 9, 16, 16, torch.float32, triton_device)
    assert swa(q, k, v, 4, sinks=s).grad_fn is not None
    from dsattn.triton_kernels import sliding_window_attention as kernels

    calls = []
    backward = kernels.sliding_window_attention_backward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "sliding_window_attention_backward", lambda *a: calls.append(1) or backward(*a))
        assert_grads_match(lambda q, k, v, s: swa(q, k, v, 4, sinks=s, backend="triton"),
                           lambda q, k, v, s: reference(q, k, v, 4, sinks=s), [q, k, v, s], 1e-5,
                           name="sliding_window_attention")
    assert calls, "backend='triton' did not run the Triton backward"
    with torch.no_grad():
        assert_close(swa(q, k, v, 4, sinks=s, backend="triton"), reference(q, k, v, 4, sinks=s))


@pytest.mark.parametrize(
    "b,hq,hkv,sq,sk,dqk,dv,window,causal,sinks,transposed,dtype",
    [
        (2, 4, 2, 37, 37, 16, 8, 9, True, True, False, torch.float32),  # GQA, Dqk != Dv, sinks
        (1, 2, 1, 13, 53, 24, 16, 7, True, False, True, torch.float32),  # Sq < Sk, non-contiguous
        (1, 2, 1, 10, 4, 8, 8, 3, True, True, False, torch.float32),  # Sq > Sk: rows that see nothing
        (1, 2, 2, 50, 50, 16, 16, 1, True, True, False, torch.float32),  # window 1
        (1, 2, 1, 60, 60, 16, 16, 500, True, False, False, torch.float32),  # window >= S: full causal
        (1, 1, 1, 200, 200, 16, 16, 70, False, True, False, torch.float32),  # symmetric, unmasked interior
        (1, 2, 1, 200, 200, 16, 16, 70, True, True, True, torch.float32),  # unmasked interior tiles
        (1, 2, 1, 70, 150, 16, 16, 40, True, True, False, torch.float32),  # chunked prefill, interior tiles
        (1, 4, 1, 300, 300, 32, 16, 130, True, True, False, torch.bfloat16),  # bf16 at its tiles, GQA 4
    ],
)
def test_triton_gradients_match_float64_autograd_of_the_oracle(triton_device, b, hq, hkv, sq, sk, dqk, dv, window,
                                                                 causal, sinks, transposed, dtype):
    inputs = _grad_inputs(b, hq, hkv, sq, sk, dqk, dv, dtype, triton_device, sinks=sinks, transposed=transposed)

    def run(q, k, v, s):
        return swa(q, k, v, window, causal=causal, sinks=s, backend="triton")

    def oracle(q, k, v, s):
        return reference(q, k, v, window, causal=causal, sinks=s)

    assert_grads_match(run, oracle, inputs, 1e-5 if dtype == torch.float32 else tolerance(dtype),
                       name="sliding_window_attention")


@pytest.mark.parametrize(
    "sq,sk,bad,dtype",
    [
        # key 30: NaN key (rows 30..38 see it; rows 39.. share its masked edge block); key 50: -Inf value; key 69:
        # NaN value, causally hidden from rows 61..68 of the same diagonal block
        (70, 70, {30: ("k", float("nan")), 50: ("v", float("-inf")), 69: ("v", float("nan"))}, torch.float32),
        # chunked prefill: keys 10 and 41 lie before every row's window (41 in the first row's masked edge block)
        (20, 70, {10: ("v", float("nan")), 41: ("k", float("inf"))}, torch.float32),
        (70, 70, {30: ("v", float("inf")), 69: ("k", float("nan"))}, torch.bfloat16),
    ],
)
def test_triton_hidden_nan_and_inf_never_reach_a_row(triton_device, sq, sk, bad, dtype):
    """SPEC: a NaN or Inf in a key or value a row cannot see (outside its window, causally hidden) never reaches
    that row, forward or backward; rows that do see one are not finite (never a silent finite result)."""
    window, hq = 9, 2
    q, k, v, s = _grad_inputs(1, hq, 1, sq, sk, 16, 16, dtype, triton_device)
    clean = [t.detach().clone().requires_grad_(True) for t in (q, k, v, s)]
    with torch.no_grad():
        for j, (which, value) in bad.items():
            (k if which == "k" else v)[:, :, j, 3] = value
    pos = torch.arange(sq) + sk - sq
    sees = (torch.arange(sk)[None, :] <= pos[:, None]) & (torch.arange(sk)[None, :] > pos[:, None] - window)
    tainted = sees[:, sorted(bad)].any(1)  # rows that see a bad key
    clean_keys = ~sees[tainted].any(0)
    clean_keys[sorted(bad)] = False
    out = swa(q, k, v, window, sinks=s, backend="triton")
    expected = reference(*(t.detach().double() for t in clean[:3]), window, sinks=s.detach().double())
    assert_close(out[:, :, ~tainted], expected[:, :, ~tainted], tolerance(dtype), name="clean rows")
    assert not torch.isfinite(out[:, :, tainted]).all(-1).any(), "a row that sees a NaN/Inf key came out finite"
    cotangent = torch.randn(out.shape, dtype=torch.float64)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), cotangent.to(dtype))
    ref = reference(*(t.double() for t in clean[:3]), window, sinks=clean[3].double())
    rq, rk, rv = torch.autograd.grad(ref, clean[:3], cotangent)
    assert_close(dq[:, :, ~tainted], rq[:, :, ~tainted], tolerance(dtype), name="dq of clean rows")
    assert_close(dk[:, :, clean_keys], rk[:, :, clean_keys], tolerance(dtype), name="dk of untouched keys")
    assert_close(dv[:, :, clean_keys], rv[:, :, clean_keys], tolerance(dtype), name="dv of untouched keys")


def test_triton_backward_through_the_public_op(triton_device):
    """torch.ops.dsattn.sliding_window_attention called directly (no saved lse): its backward recomputes it."""
    q, k, v, s = _grad_inputs(1, 4, 2, 21, 29, 16, 8, torch.float32, triton_device)
    assert_grads_match(lambda q, k, v, s: torch.ops.dsattn.sliding_window_attention(q, k, v, 6, True, 0.3, s, "triton"),
                       lambda q, k, v, s: reference(q, k, v, 6, scale=0.3, sinks=s), [q, k, v, s], 1e-5,
                       name="sliding_window_attention")


def test_varlen_gradients_match_the_oracle():
    lens = [5, 0, 9, 3]
    q = torch.randn(sum(lens), 4, 8, dtype=torch.float32, requires_grad=True)
    k = torch.randn(sum(lens), 2, 8, dtype=torch.float32, requires_grad=True)
    v = torch.randn(sum(lens), 2, 6, dtype=torch.float32, requires_grad=True)
    s = torch.randn(4, requires_grad=True)
    cu = _cu(lens)
    assert_grads_match(lambda q, k, v, s: sliding_window_attention_varlen(q, k, v, cu, cu, 9, 9, 4, sinks=s),
                       lambda q, k, v, s: reference_varlen(q, k, v, cu, cu, 9, 9, 4, sinks=s), [q, k, v, s], 1e-5,
                       name="sliding_window_attention_varlen")


def _varlen_grad_inputs(lens_q, lens_k, hq, hkv, dqk, dv, dtype, device, sinks, strided):
    q = torch.randn(sum(lens_q), hq, dqk, dtype=dtype, device=device)
    k = torch.randn(sum(lens_k), hkv, dqk, dtype=dtype, device=device)
    v = torch.randn(sum(lens_k), hkv, dv, dtype=dtype, device=device)
    if strided:  # head-major memory for q, a strided head dim for k and v
        q = q.transpose(0, 1).contiguous().transpose(0, 1)
        k, v = non_contiguous(k), non_contiguous(v)
        assert not any(t.is_contiguous() for t in (q, k, v))
    s = torch.randn(hq, dtype=dtype, device=device) if sinks else None
    leaves = [None if t is None else t.requires_grad_(True) for t in (q, k, v, s)]
    return leaves, _cu(lens_q, device), _cu(lens_k, device)


@pytest.mark.parametrize(
    "lens_q,lens_k,hq,hkv,dqk,dv,window,causal,sinks,strided,dtype",
    [
        # GQA, Dqk != Dv, an empty q sequence, Sq < Sk, decode-like (one row over 9 keys)
        ([13, 0, 29, 5, 1], [13, 4, 41, 5, 9], 4, 2, 16, 8, 5, True, True, False, torch.float32),
        # window >= every length; a sequence without keys (its rows see nothing); strided inputs
        ([7, 30, 3], [20, 30, 0], 2, 1, 12, 12, 100, True, True, True, torch.float32),
        # symmetric window 1 (the diagonal only; with sinks, else dq and dk are exactly 0)
        ([11, 0, 23, 6], [11, 5, 23, 17], 2, 2, 16, 16, 1, False, True, False, torch.float32),
        # unmasked interior tiles in a sequence that starts off the tile grid (token 33 / 45)
        ([33, 70], [45, 90], 2, 1, 16, 16, 40, True, True, False, torch.float32),
        ([33, 70], [33, 90], 1, 1, 16, 8, 30, False, False, False, torch.float32),
        # 16 bit at its tiles: GQA 4, strided, sinks
        ([37, 0, 64], [50, 9, 64], 4, 1, 32, 16, 9, True, True, True, torch.bfloat16),
        ([21, 40], [21, 55], 2, 2, 16, 24, 200, False, True, False, torch.bfloat16),
    ],
)
def test_triton_varlen_gradients_match_float64_autograd_of_the_oracle(
        triton_device, lens_q, lens_k, hq, hkv, dqk, dv, window, causal, sinks, strided, dtype):
    from dsattn.triton_kernels import sliding_window_attention as kernels

    inputs, cu_q, cu_k = _varlen_grad_inputs(lens_q, lens_k, hq, hkv, dqk, dv, dtype, triton_device, sinks, strided)
    max_q, max_k = max(lens_q), max(lens_k)

    def run(q, k, v, s):
        return sliding_window_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window, causal=causal, sinks=s,
                                               backend="triton")

    def oracle(q, k, v, s):
        return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window, causal=causal, sinks=s)

    calls = []
    backward = kernels.sliding_window_attention_varlen_backward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "sliding_window_attention_varlen_backward", lambda *a: calls.append(1) or backward(*a))
        assert_grads_match(run, oracle, inputs, 1e-5 if dtype == torch.float32 else tolerance(dtype),
                           name="sliding_window_attention_varlen")
    assert calls, "backend='triton' did not run the Triton varlen backward"


def test_triton_varlen_backward_through_the_public_op(triton_device):
    """torch.ops.dsattn.sliding_window_attention_varlen called directly (no saved lse): its backward
    recomputes it, with the key count for max_seqlen_k."""
    (q, k, v, s), cu_q, cu_k = _varlen_grad_inputs([6, 0, 9], [6, 3, 15], 2, 1, 16, 8, torch.float32, triton_device,
                                                   True, False)
    assert_grads_match(
        lambda q, k, v, s: torch.ops.dsattn.sliding_window_attention_varlen(q, k, v, cu_q, cu_k, 9, 4, True, 0.3, s,
                                                                            "triton"),
        lambda q, k, v, s: reference_varlen(q, k, v, cu_q, cu_k, 9, 15, 4, scale=0.3, sinks=s), [q, k, v, s], 1e-5,
        name="sliding_window_attention_varlen")


def test_opcheck():
    q, k, v, s = (t.detach() for t in _grad_inputs(1, 4, 2, 11, 13, 16, 8, torch.float32))
    backends = ["torch"] + (["triton"] if dsattn._backend.unusable_reason("triton", q.device) is None else [])
    for backend in backends:
        torch.library.opcheck(torch.ops.dsattn.sliding_window_attention,
                              (q.requires_grad_(True), k, v, 5, True, 0.25, s, backend))
    if "triton" in backends:
        torch.library.opcheck(torch.ops.dsattn.sliding_window_attention_fwd_lse,
                              (q.requires_grad_(True), k.requires_grad_(True), v, 5, True, 0.25, s))
    qv, kv, vv = (t.detach()[0].transpose(0, 1).contiguous() for t in (q, k, v))
    cu_q, cu_k = _cu([4, 7]), _cu([5, 8])
    for backend in backends:
        torch.library.opcheck(torch.ops.dsattn.sliding_window_attention_varlen,
                              (qv.detach(), kv, vv, cu_q, cu_k, 7, 5, True, 0.25, s, backend))


def test_opcheck_varlen_triton_training(triton_device):
    """The varlen Triton training op with inputs that require grad (its backward op traced too)."""
    (q, k, v, s), cu_q, cu_k = (_varlen_grad_inputs([3, 5], [4, 6], 2, 1, 16, 8, torch.float32, triton_device,
                                                    True, False))
    q, k, v, s = (t.detach() for t in (q, k, v, s))
    torch.library.opcheck(torch.ops.dsattn.sliding_window_attention_varlen_fwd_lse,
                          (q.requires_grad_(True), k.requires_grad_(True), v, cu_q, cu_k, 5, 6, 3, False, 0.25, s))


def test_compiles_fullgraph_and_equals_eager():
    inputs = _grad_inputs(1, 4, 2, 29, 29, 16, 8, torch.float32, transposed=True)
    assert_compiles(lambda q, k, v, s: swa(q, k, v, 6, sinks=s), inputs, name="sliding_window_attention")
    with torch.no_grad():
        assert_compiles(lambda q, k, v, s: swa(q[:, :, -1:], k, v, 6, sinks=s), inputs, name="decode")


def test_int32_offset_limit_is_declared_and_checked():
    """Two [S, H, D] sequences at S=128k with H x D = 16k reach past int32 offsets (meta tensors: no memory):
    a backend that declares int32 offsets refuses them; the sliding-window kernels index in 64 bits."""
    q = torch.empty(2, 2**17, 128, 128, device="meta").transpose(1, 2)
    assert capabilities.max_offset(q) >= 2**31
    request = capabilities.Request(dtype=torch.bfloat16, head_dim=128, offset=capabilities.max_offset(q))
    int32 = capabilities.Capability(dtypes=capabilities.KERNEL_FLOATS, max_offset=capabilities.INT32_OFFSETS)
    assert "int32 offsets" in str(int32.refusal(request))
    assert capabilities.of("sliding_window_attention")["triton"].refusal(request) is None


def test_triton_offsets_past_int32(triton_device):
    """Decode over a cache whose key stride puts the window's keys past element 2^31 (a strided view of a
    lazily allocated buffer: only the window's rows are ever touched)."""
    seq_k, stride, window, d = 2**17 + 300, 2**14, 100, 16
    try:
        k_buf = torch.empty(seq_k * stride, dtype=torch.float16, device=triton_device)
        v_buf = torch.empty(seq_k * stride, dtype=torch.float16, device=triton_device)
    except (RuntimeError, MemoryError):
        pytest.skip("cannot reserve the 4 GiB address range")
    k = k_buf.as_strided((1, 1, seq_k, d), (0, d, stride, 1))
    v = v_buf.as_strided((1, 1, seq_k, d), (0, d, stride, 1))
    lo = seq_k - window
    assert lo * stride > 2**31
    k[:, :, lo:] = torch.randn(1, 1, window, d, dtype=torch.float16, device=triton_device)
    v[:, :, lo:] = torch.randn(1, 1, window, d, dtype=torch.float16, device=triton_device)
    q = torch.randn(1, 2, 1, d, dtype=torch.float16, device=triton_device)
    got = swa(q, k, v, window, backend="triton")
    expected = reference(q, k[:, :, lo:].contiguous(), v[:, :, lo:].contiguous(), window)
    assert_close(got, expected, tolerance(torch.float16))
