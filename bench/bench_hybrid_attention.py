"""hybrid_attention: causal torch SDPA (baseline) vs dsattn's fused Triton kernel on a GPU (B=1, H=32, D=128,
bf16, S 4096..65536, SPEC's default prefix=2048 with and without a 512-key window); CPU cases (prefix 256, window
128) time the torch backend and the C++ kernel (backend "cpp", forward only) against causal SDPA."""

import pytest
import torch
import torch.nn.functional as F

from dsattn import _backend
from dsattn.ops.hybrid_attention import hybrid_attention

GPU_LENGTHS = [4096, 8192, 16384, 32768, 65536]
CPU_LENGTHS = [512, 1024, 4096]
PREFIX = 2048


def _qkv(s, h, d, dtype, device):
    return [torch.randn(1, h, s, d, dtype=dtype, device=device) for _ in range(3)]


def _shape(s, h, d, window, prefix=PREFIX):
    return {"B": 1, "H": h, "S": s, "D": d, "prefix": prefix, "window": window}


@pytest.mark.gpu_only
@pytest.mark.parametrize("window", [0, 512])
@pytest.mark.parametrize("s", GPU_LENGTHS)
@pytest.mark.parametrize("provider", ["torch-sdpa", "dsattn-triton"])
def test_hybrid_attention_gpu(run_bench, provider, s, window):
    q, k, v = _qkv(s, 32, 128, torch.bfloat16, "cuda")
    if provider == "torch-sdpa":
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    else:
        fn = lambda: hybrid_attention(q, k, v, prefix=PREFIX, window=window, backend="triton")  # noqa: E731
    run_bench(fn, op="hybrid_attention", provider=provider, shape=_shape(s, 32, 128, window), device="cuda",
              dtype=torch.bfloat16, baseline=provider == "torch-sdpa")


@pytest.mark.parametrize("s", CPU_LENGTHS)
@pytest.mark.parametrize("provider", ["torch-sdpa", "dsattn-torch", "dsattn-cpp"])
def test_hybrid_attention_cpu(run_bench, provider, s):
    if provider == "dsattn-cpp" and _backend.unusable_reason("cpp", torch.device("cpu"), "hybrid_attention"):
        pytest.skip("dsattn._C has no hybrid_attention kernel in this build")
    q, k, v = _qkv(s, 4, 64, torch.float32, "cpu")
    if provider == "torch-sdpa":
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    else:
        backend = provider.removeprefix("dsattn-")
        fn = lambda: hybrid_attention(q, k, v, prefix=256, window=128, backend=backend)  # noqa: E731
    run_bench(fn, op="hybrid_attention", provider=provider, shape=_shape(s, 4, 64, 128, prefix=256), device="cpu",
              dtype=torch.float32, baseline=provider == "torch-sdpa")


def _training_forward(provider, q, k, v, prefix, window):
    if provider == "torch-sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    backend = provider.removeprefix("dsattn-")
    return lambda: hybrid_attention(q, k, v, prefix=prefix, window=window, backend=backend)


@pytest.mark.parametrize("s", [1024, 4096])
@pytest.mark.parametrize("provider", ["torch-sdpa", "dsattn-torch"])
def test_fwd_bwd_cpu(run_training_bench, provider, s):
    q, k, v = (t.requires_grad_(True) for t in _qkv(s, 4, 64, torch.float32, "cpu"))
    run_training_bench(_training_forward(provider, q, k, v, 256, 128), (q, k, v), op="hybrid_attention",
                       provider=provider, shape=_shape(s, 4, 64, 128, prefix=256), device="cpu", dtype=torch.float32,
                       baseline=provider == "torch-sdpa", memory=provider.startswith("dsattn"))


@pytest.mark.gpu_only
@pytest.mark.parametrize("provider", ["torch-sdpa", "dsattn-triton"])
def test_fwd_bwd_gpu(run_training_bench, provider):
    s = 16384
    q, k, v = (t.requires_grad_(True) for t in _qkv(s, 32, 128, torch.bfloat16, "cuda"))
    run_training_bench(_training_forward(provider, q, k, v, PREFIX, 512), (q, k, v), op="hybrid_attention",
                       provider=provider, shape=_shape(s, 32, 128, 512), device="cuda", dtype=torch.bfloat16,
                       baseline=provider == "torch-sdpa", memory=True)
