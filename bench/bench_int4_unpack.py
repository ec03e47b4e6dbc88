"""int4 unpack: PyTorch reference (baseline) vs the compiled kernels (and Triton on a GPU)."""

import pytest
import torch

from dsattn.ops.int4_unpack import int4_unpack
from dsattn.reference.int4 import pack_int4
from dsattn._backend import unusable_reason

SHAPES = [(1024, 1024), (4096, 4096)]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("provider", ["torch", "cpp", "cuda", "triton"])
def test_int4_unpack(run_bench, bench_device, provider, n, k):
    if provider == "triton" and bench_device != "cuda":
        pytest.skip("Triton is timed on a GPU only (the interpreter is not a benchmark)")
    reason = unusable_reason(provider, torch.device(bench_device), "int4_unpack")
    if reason:
        pytest.skip(reason)
    packed = pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8)).to(bench_device)
    run_bench(
        lambda: int4_unpack(packed, backend=provider),
        op="int4_unpack",
        provider="torch" if provider == "torch" else f"dsattn-{provider}",
        shape={"N": n, "K": k},
        device=bench_device,
        dtype=torch.int32,
        baseline=provider == "torch",
    )
