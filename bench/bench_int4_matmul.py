"""int4_matmul vs the dense fp32/bf16 torch matmul on the same (dequantized) weight; dsattn's compiled CPU
kernel on CPU. Goal (issue 7): CPU, M=1, 4096x4096, g128: >= 3x faster than torch fp32 matvec."""

import pytest
import torch

import dsattn
from dsattn._backend import unusable_reason

SHAPES = [(1, 4096, 4096), (16, 4096, 4096)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("provider", ["torch-fp32", "torch-bf16", "dsattn-cpp", "dsattn-torch"])
def test_int4_matmul(run_bench, bench_device, provider, m, n, k):
    if bench_device != "cpu" and provider.startswith("dsattn-"):
        pytest.skip("no GPU int4 kernel yet")
    if provider == "dsattn-cpp" and unusable_reason("cpp", torch.device("cpu"), "int4_matmul"):
        pytest.skip("compiled CPU kernel not built")
    q = dsattn.quantize_int4(torch.randn(n, k, device=bench_device), group_size=128)
    x = torch.randn(m, k, device=bench_device)
    if provider.startswith("torch-"):
        dtype = torch.float32 if provider == "torch-fp32" else torch.bfloat16
        w, xd = q.dequantize(dtype), x.to(dtype)
        fn = lambda: xd @ w.T  # noqa: E731
    else:
        backend = provider.split("-")[1]
        fn = lambda: dsattn.int4_matmul(x, q, backend=backend)  # noqa: E731
    run_bench(fn, op="int4_matmul", provider=provider, shape={"M": m, "N": n, "K": k, "g": 128}, device=bench_device,
              dtype=torch.float32, baseline=provider == "torch-fp32")
