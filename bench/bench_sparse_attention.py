"""sparse_attention (DSA: every query attends to its topk listed keys) against dense causal SDPA on the same
q/k/v (the baseline: what transformers runs after building its mask), prefill and decode.

CPU goals (issue 16), test_prefill_cpu_issue16: MQA (8 query heads on one KV head, D=64), top_k 256, fp32:
dsattn-cpp >= 3x dense causal SDPA at S=4096 and under 1 s at S=16384. CPU rows record the CPU model and the
kernels' ISA path (dsattn._ext.cpu_info).

GPU goals (issue 5): at S=32768, topk=2048 the sparse forward >= 6x faster than dense causal SDPA; decode at
128k context within 2x of decode at 8k (the sparse cost depends on topk, not on the context).
"""

import pytest
import torch
import torch.nn.functional as F

from dsattn._backend import unusable_reason
from dsattn._ext import cpu_info
from dsattn.ops.sparse_attention import sparse_attention

OP = "sparse_attention"


def _causal_indices(b, sq, sk, topk, device):
    """Random keys each query may see (position i + sk - sq and before): cheap to build at S=32k, duplicates
    possible in the first rows (timing only)."""
    position = torch.arange(sq, device=device) + (sk - sq)
    draw = torch.rand(b, sq, topk, device=device) * (position[None, :, None] + 1).float()
    return draw.long().clamp_max(sk - 1).to(torch.int32)


def _inputs(b, hq, hkv, sq, sk, dqk, dv, dtype, device):
    q = torch.randn(b, hq, sq, dqk, dtype=dtype, device=device)
    k = torch.randn(b, hkv, sk, dqk, dtype=dtype, device=device)
    v = torch.randn(b, hkv, sk, dv, dtype=dtype, device=device)
    return q, k, v


def _dense_sdpa(q, k, v, causal):
    """Dense attention on the same q/k/v; k/v heads repeated for GQA/MQA (enable_gqa would fall back to the
    O(S^2)-memory math kernel). Causal with Sq < Sk needs the bottom-right mask, so decode runs non-causal
    (its one query sees every key)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal and q.shape[2] == k.shape[2])


def _run(run_bench, provider, q, k, v, indices, causal, device, shape, dtype):
    if provider == "torch-sdpa":
        fn = _dense_sdpa(q, k, v, causal)
    else:
        backend = provider.removeprefix("dsattn-")
        reason = unusable_reason(backend, torch.device(device), "sparse_attention" if backend == "cpp" else None)
        if reason:
            pytest.skip(reason)
        fn = lambda: sparse_attention(q, k, v, indices, causal=causal, backend=backend)  # noqa: E731
    extra = cpu_info() if device == "cpu" else {}
    run_bench(fn, op=OP, provider=provider, shape=shape, device=device, dtype=dtype, baseline=provider == "torch-sdpa",
              **extra)


# DeepSeek-V3.2 in its MQA/latent form: 128 heads over one 576/512 latent KV head, indices shared.
DSA = dict(hq=128, hkv=1, dqk=576, dv=512)
GQA = dict(hq=32, hkv=4, dqk=128, dv=128)


@pytest.mark.gpu_only
@pytest.mark.parametrize("heads", ["dsa", "gqa"])
@pytest.mark.parametrize("provider", ["torch-sdpa", "dsattn-triton"])
def test_prefill_gpu(run_bench, provider, heads):
    h = DSA if heads == "dsa" else GQA
    s, topk, dtype = 32768, 2048, torch.bfloat16
    q, k, v = _inputs(1, h["hq"], h["hkv"], s, s, h["dqk"], h["dv"], dtype, "cuda")
    indices = _causal_indices(1, s, s, topk, "cuda")
    shape = {"B": 1, "Hq": h["hq"], "Hkv": h["hkv"], "S": s, "topk": topk, "Dqk": h["dqk"], "Dv": h["dv"]}
    _run(run_bench, provider, q, k, v, indices, True, "cuda", shape, dtype)


@pytest.mark.gpu_only
@pytest.mark.parametrize("context", [8192, 131072])
@pytest.mark.parametrize("provider", ["torch-sdpa", "dsattn-triton"])
def test_decode_gpu(run_bench, provider, context):
    b, topk, dtype = 1, 2048, torch.bfloat16
    q, k, v = _inputs(b, DSA["hq"], DSA["hkv"], 1, context, DSA["dqk"], DSA["dv"], dtype, "cuda")
    indices = _causal_indices(b, 1, context, topk, "cuda")
    shape = {"B": b, "Hq": DSA["hq"], "Hkv": DSA["hkv"], "Sk": context, "topk": topk,
             "Dqk": DSA["dqk"], "Dv": DSA["dv"]}
    _run(run_bench, provider, q, k, v, indices, True, "cuda", shape, dtype)


@pytest.mark.parametrize("sq,sk", [(512, 512), (1, 8192)])
@pytest.mark.parametrize("provider", ["torch-sdpa", "dsattn-torch", "dsattn-cpp"])
def test_small_cpu(run_bench, provider, sq, sk):
    """CPU-size cases: the PyTorch reference (the CPU backend) against dense SDPA."""
    hq, hkv, d, topk, dtype = 8, 1, 64, 64, torch.float32
    q, k, v = _inputs(1, hq, hkv, sq, sk, d, d, dtype, "cpu")
    indices = _causal_indices(1, sq, sk, topk, "cpu")
    shape = {"B": 1, "Hq": hq, "Hkv": hkv, "Sq": sq, "Sk": sk, "topk": topk, "D": d}
    _run(run_bench, provider, q, k, v, indices, True, "cpu", shape, dtype)


@pytest.mark.parametrize("s", [4096, 16384])
@pytest.mark.parametrize("provider", ["torch-sdpa", "dsattn-torch", "dsattn-cpp"])
def test_prefill_cpu_issue16(run_bench, provider, s):
    """Issue 16's CPU shapes: MQA prefill, causal random lists of 256 keys, against dense causal SDPA."""
    if provider == "dsattn-torch" and s > 4096:
        pytest.skip("the chunked torch backend takes over a minute at S=16384")
    hq, hkv, d, topk, dtype = 8, 1, 64, 256, torch.float32
    q, k, v = _inputs(1, hq, hkv, s, s, d, d, dtype, "cpu")
    indices = _causal_indices(1, s, s, topk, "cpu")
    shape = {"B": 1, "Hq": hq, "Hkv": hkv, "S": s, "topk": topk, "D": d}
    _run(run_bench, provider, q, k, v, indices, True, "cpu", shape, dtype)


@pytest.mark.parametrize("s", [8192])
@pytest.mark.parametrize("provider", ["torch-sdpa", "dsattn-cpp"])
def test_prefill_cpu_mla(run_bench, provider, s):
    """DeepSeek-V3.2's attention as transformers runs it (MLA after kv_b_proj: 8 heads, each its own K/V, q/k
    96 and v 64, as `python -m dsattn demo`), index_topk 2048 listed keys per query, against dense causal SDPA."""
    hq, hkv, dqk, dv, topk, dtype = 8, 8, 96, 64, 2048, torch.float32
    q, k, v = _inputs(1, hq, hkv, s, s, dqk, dv, dtype, "cpu")
    indices = _causal_indices(1, s, s, topk, "cpu")
    shape = {"B": 1, "Hq": hq, "Hkv": hkv, "S": s, "topk": topk, "Dqk": dqk, "Dv": dv}
    _run(run_bench, provider, q, k, v, indices, True, "cpu", shape, dtype)


def _training_forward(provider, q, k, v, indices):
    if provider == "torch-sdpa":
        return _dense_sdpa(q, k, v, True)
    if provider == "flash-attn":
        flash_attn = pytest.importorskip("flash_attn")
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return lambda: flash_attn.flash_attn_func(qt, kt, vt, causal=True)
    backend = provider.removeprefix("dsattn-")
    return lambda: sparse_attention(q, k, v, indices, causal=True, backend=backend)


# S=16384, top_k 256 measures backward memory (issue 14: below 3x the inputs plus their gradients); dense SDPA
# with GQA-repeated K/V runs only at the smaller sizes there.
CPU_TRAINING = [dict(B=1, Hq=8, Hkv=1, S=1024, topk=64, D=64), dict(B=1, Hq=8, Hkv=1, S=4096, topk=256, D=64),
                dict(B=1, Hq=8, Hkv=1, S=16384, topk=256, D=64)]


@pytest.mark.parametrize("shape", CPU_TRAINING, ids=lambda s: f"S{s['S']}-k{s['topk']}")
@pytest.mark.parametrize("provider", ["torch-sdpa", "dsattn-torch"])
def test_fwd_bwd_cpu(run_training_bench, provider, shape):
    """Forward + backward (the torch backend's per-chunk recompute) against dense causal SDPA's, prefill on CPU."""
    if provider == "torch-sdpa" and shape["S"] > 4096:
        pytest.skip("dense SDPA's O(S^2) probabilities: not run at S=16384")
    s, d = shape["S"], shape["D"]
    q, k, v = (t.requires_grad_(True) for t in _inputs(1, shape["Hq"], shape["Hkv"], s, s, d, d, torch.float32, "cpu"))
    indices = _causal_indices(1, s, s, shape["topk"], "cpu")
    _, extra = run_training_bench(_training_forward(provider, q, k, v, indices), (q, k, v), op=OP,
                                  provider=provider, shape=shape, device="cpu",
                                  dtype=torch.float32, baseline=provider == "torch-sdpa",
                                  memory=provider.startswith("dsattn"))
    if extra.get("peak_over_inputs_and_grads") is not None and s >= 16384:
        assert extra["peak_over_inputs_and_grads"] < 3, extra


@pytest.mark.gpu_only
@pytest.mark.parametrize("provider", ["torch-sdpa", "flash-attn", "dsattn-triton"])
def test_fwd_bwd_gpu(run_training_bench, provider):
    """Goal (issue 14): fwd+bwd at top_k = S/16 at least 4x faster than dense causal FlashAttention."""
    s, topk, dtype = 16384, 1024, torch.bfloat16
    q, k, v = (t.requires_grad_(True) for t in _inputs(1, GQA["hq"], GQA["hkv"], s, s, GQA["dqk"], GQA["dv"], dtype,
                                                       "cuda"))
    indices = _causal_indices(1, s, s, topk, "cuda")
    shape = {"B": 1, "Hq": GQA["hq"], "Hkv": GQA["hkv"], "S": s, "topk": topk, "Dqk": GQA["dqk"], "Dv": GQA["dv"]}
    run_training_bench(_training_forward(provider, q, k, v, indices), (q, k, v), op=OP,
                       provider=provider, shape=shape, device="cuda", dtype=dtype, baseline=provider == "torch-sdpa", memory=True)
