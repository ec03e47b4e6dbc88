"""int8_matmul vs dense matmul on the same (dequantized) weight, per output channel (int8's default scales).

CPU: M=1, 8, 16 (decode) and 256 (prefill), 4096x4096. dsattn's backends vs torch fp32 (baseline) / bf16 on the
dequantized weight. "-bf16" providers take bf16 x and a weight quantized from bf16 (scales in bf16) and form
their own group (dtype bfloat16, baseline torch-bf16): there dsattn-torch runs torch's int8 weight-only GEMM
(torch._weight_int8pack_mm), in fp32 the row-chunked product. dsattn-cpp runs where the compiled extension has
an int8 kernel (skipped otherwise).
GPU (gpu_only): dsattn's Triton kernel vs torch fp16 matmul (baseline) and torchao int8 weight-only when
importable, M in {1, 16, 128, 4096}, N=K=8192, fp16 x. M=1 records the achieved weight-streaming bandwidth
(int8 weight + scales + x + out bytes / median) as gbps.
"""

import pytest
import torch

import dsattn
from dsattn import capabilities
from dsattn._backend import unusable_reason

CPU_SHAPES = [(1, 4096, 4096), (8, 4096, 4096), (16, 4096, 4096), (256, 4096, 4096)]
GPU_SHAPES = [(m, 8192, 8192) for m in (1, 16, 128, 4096)]
OP = "int8_matmul"


def _skip_unusable(backend: str, device: str) -> None:
    declared = capabilities.of(OP).get(backend)
    if declared is None:
        pytest.skip(f"int8_matmul has no {backend} backend in this version")
    reason = unusable_reason(backend, torch.device(device), declared.kernel)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("m,n,k", CPU_SHAPES)
@pytest.mark.parametrize("provider", ["torch-fp32", "torch-bf16", "dsattn-torch", "dsattn-torch-bf16", "dsattn-cpp",
                                      "dsattn-cpp-bf16"])
def test_int8_matmul(run_bench, bench_device, provider, m, n, k):
    if bench_device != "cpu" and provider.startswith("dsattn-"):
        pytest.skip("CPU providers; the GPU ones are in test_int8_matmul_gpu")
    bf16 = provider.endswith("-bf16")
    dtype = torch.bfloat16 if bf16 else torch.float32
    if provider.startswith("dsattn-"):
        _skip_unusable(provider.split("-")[1], bench_device)
    q = dsattn.quantize_int8(torch.randn(n, k, device=bench_device).to(dtype))
    x = torch.randn(m, k, device=bench_device, dtype=dtype)
    if provider.startswith("torch-"):
        w = q.dequantize(dtype)
        fn = lambda: x @ w.T  # noqa: E731
    else:
        backend = provider.split("-")[1]
        fn = lambda: dsattn.int8_matmul(x, q, backend=backend)  # noqa: E731
    run_bench(fn, op=OP, provider=provider, shape={"M": m, "N": n, "K": k, "g": "channel"}, device=bench_device,
              dtype=dtype, baseline=provider.startswith("torch-"))


def _torchao_fn(weight, x):
    """torchao's int8 weight-only linear, or a skip when torchao is absent or its API differs."""
    torchao = pytest.importorskip("torchao")
    try:
        from torchao.quantization import quantize_

        try:
            from torchao.quantization import Int8WeightOnlyConfig

            config = Int8WeightOnlyConfig()
        except ImportError:
            from torchao.quantization import int8_weight_only

            config = int8_weight_only()
        lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=x.dtype, device=x.device)
        lin.weight.data.copy_(weight.to(x.dtype))
        quantize_(lin, config)
        lin(x)
    except Exception as exc:  # noqa: BLE001 -- an anchor, not a dependency
        pytest.skip(f"torchao {getattr(torchao, '__version__', '?')} int8 weight-only unavailable: {exc}")
    return lambda: lin(x)


@pytest.mark.gpu_only
@pytest.mark.parametrize("m,n,k", GPU_SHAPES)
@pytest.mark.parametrize("provider", ["torch-fp16", "dsattn-triton", "torchao"])
def test_int8_matmul_gpu(run_bench, benchmark, provider, m, n, k):
    device = "cuda"
    if provider == "dsattn-triton":
        _skip_unusable("triton", device)
    weight = torch.randn(n, k, device=device, dtype=torch.float16)
    q = dsattn.quantize_int8(weight)
    x = torch.randn(m, k, device=device, dtype=torch.float16)
    if provider == "torch-fp16":
        w = q.dequantize(torch.float16)
        fn = lambda: x @ w.T  # noqa: E731
    elif provider == "torchao":
        fn = _torchao_fn(weight, x)
    else:
        fn = lambda: dsattn.int8_matmul(x, q, backend="triton")  # noqa: E731
    run_bench(fn, op=OP, provider=provider, shape={"M": m, "N": n, "K": k, "g": "channel"}, device=device,
              dtype=torch.float16, baseline=provider == "torch-fp16")
    if m == 1:
        weight_bytes = n * k * (2 if provider == "torch-fp16" else 1)
        moved = weight_bytes + q.scales.numel() * q.scales.element_size() + (m * k + m * n) * x.element_size()
        benchmark.extra_info["gbps"] = moved / benchmark.stats.stats.median / 1e9
