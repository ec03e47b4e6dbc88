"""lightning_indexer_topk (DeepSeek-V3.2 indexer scores + top-k) against transformers' own indexer math.

Baseline: what transformers' DeepseekV32Indexer.forward computes (models/deepseek_v32/modeling_deepseek_v32.py):
fp32 scores [B, S, H, T] = relu(q @ k^T * softmax_scale), weighted sum over heads by a matmul -> [B, S, T],
the causal mask, then torch.topk. It holds O(S^2 x H) memory (S=16384 at H=64: 64 GiB of scores alone), so it
runs out of memory where dsattn's streaming kernel (no score tensor at all) keeps going; such cases skip with
the reason. Peak memory is recorded in extra_info (CUDA: max_memory_allocated; CPU: growth of the process's
peak RSS during the warm-up call, 0 when under an earlier peak).

V3.2 sizes on the GPU: 64 index heads, head dim 128, top_k 2048, bf16 q/k, fp32 weights.
"""

import resource

import pytest
import torch
import torch.nn.functional as F

from dsattn import capabilities
from dsattn._backend import unusable_reason
from dsattn.ops.lightning_indexer_topk import lightning_indexer_topk

OP = "lightning_indexer_topk"


def _inputs(b, s, heads, dim, dtype, device):
    q = torch.randn(b, s, heads, dim, dtype=dtype, device=device)
    k = torch.randn(b, s, dim, dtype=dtype, device=device)
    weights = torch.randn(b, s, heads, dtype=torch.float32, device=device) * heads**-0.5
    return q, k, weights


def transformers_indexer(q, k, weights, top_k, scale, visible):
    """DeepseekV32Indexer.forward after its projections and RoPE, line for line: [B,S,H,D] @ [B,1,D,T]."""
    scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * scale
    scores = F.relu(scores)
    index_scores = torch.matmul(weights.unsqueeze(-2), scores).squeeze(-2)
    index_scores = index_scores.masked_fill(~visible, float("-inf"))
    return index_scores.topk(min(top_k, index_scores.shape[-1]), dim=-1).indices.to(torch.int32)


def _run(run_bench, provider, q, k, weights, top_k, device, shape):
    scale = q.shape[-1] ** -0.5
    if provider == "transformers":
        s = k.shape[1]
        visible = torch.ones(s, s, dtype=torch.bool, device=device).tril()
        fn = lambda: transformers_indexer(q, k, weights, top_k, scale, visible)  # noqa: E731
    else:
        backend = provider.removeprefix("dsattn-")
        reason = unusable_reason(backend, torch.device(device), capabilities.of(OP)[backend].kernel)
        if reason:
            pytest.skip(reason)
        fn = lambda: lightning_indexer_topk(q, k, weights, top_k, scale=scale, backend=backend)  # noqa: E731
    extra = {}
    try:
        if device == "cpu":
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            fn()
            extra["peak_rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        else:
            torch.cuda.empty_cache()
            fn()
    except torch.cuda.OutOfMemoryError as exc:
        pytest.skip(f"{provider} out of memory at {shape}: {str(exc).splitlines()[0]}")
    run_bench(fn, op=OP, provider=provider, shape=shape, device=device, dtype=q.dtype,
              baseline=provider == "transformers", **extra)


# top_k 2048: the streaming Triton kernel; top_k 4096 (beyond its 2048): fp32 scores per query chunk + the
# CUDA radix-select top-k. The torch streaming reference takes seconds per call beyond S=8192 (suite budget).
PREFILL_GPU = [(s, top_k, provider)
               for top_k, fast, lengths in ((2048, "dsattn-triton", (4096, 8192, 16384, 32768)),
                                            (4096, "dsattn-cuda", (8192, 16384, 32768)))
               for s in lengths for provider in ("transformers", "dsattn-torch", fast)
               if not (provider == "dsattn-torch" and s > 8192)]
DECODE_GPU = [(context, top_k, provider)
              for top_k, fast, contexts in ((2048, "dsattn-triton", (8192, 131072)),
                                            (4096, "dsattn-cuda", (32768, 131072)))
              for context in contexts for provider in ("dsattn-torch", fast)]


@pytest.mark.gpu_only
@pytest.mark.parametrize("s,top_k,provider", PREFILL_GPU)
def test_prefill_gpu(run_bench, provider, s, top_k):
    heads, dim, dtype = 64, 128, torch.bfloat16
    q, k, weights = _inputs(1, s, heads, dim, dtype, "cuda")
    shape = {"B": 1, "S": s, "Hi": heads, "D": dim, "top_k": top_k}
    _run(run_bench, provider, q, k, weights, top_k, "cuda", shape)


@pytest.mark.gpu_only
@pytest.mark.parametrize("context,top_k,provider", DECODE_GPU)
def test_decode_gpu(run_bench, provider, context, top_k):
    """One new query over a long indexer key cache (Sq=1 < Sk): the per-token decode cost."""
    heads, dim, dtype = 64, 128, torch.bfloat16
    q, _, weights = _inputs(1, 1, heads, dim, dtype, "cuda")
    k = torch.randn(1, context, dim, dtype=dtype, device="cuda")
    shape = {"B": 1, "Sq": 1, "Sk": context, "Hi": heads, "D": dim, "top_k": top_k}
    _run(run_bench, provider, q, k, weights, top_k, "cuda", shape)


@pytest.mark.parametrize("provider", ["transformers", "dsattn-torch", "dsattn-cpp"])
def test_large_top_k_cpu(run_bench, provider):
    """top_k 4096 on CPU: the compiled radix-select top-k (cpp) against the torch streaming top-k."""
    s, heads, dim, top_k, dtype = 5120, 8, 32, 4096, torch.float32
    q, k, weights = _inputs(1, s, heads, dim, dtype, "cpu")
    shape = {"B": 1, "S": s, "Hi": heads, "D": dim, "top_k": top_k}
    _run(run_bench, provider, q, k, weights, top_k, "cpu", shape)


@pytest.mark.parametrize("s,top_k", [(1024, 64), (2048, 256)])
@pytest.mark.parametrize("provider", ["transformers", "dsattn-torch", "dsattn-cpp"])
def test_small_cpu(run_bench, provider, s, top_k):
    """CPU sizes: the streaming reference and the score rows + compiled radix select against transformers'
    materialized math."""
    heads, dim, dtype = 8, 32, torch.float32
    q, k, weights = _inputs(1, s, heads, dim, dtype, "cpu")
    shape = {"B": 1, "S": s, "Hi": heads, "D": dim, "top_k": top_k}
    _run(run_bench, provider, q, k, weights, top_k, "cpu", shape)
