"""pytest-benchmark fixtures shared by every bench/bench_*.py.

Each benchmark names its op, provider (a dsattn backend such as "dsattn-triton", or an anchor such as
"torch-sdpa", "flex", "flash-attn", "fla", "torchao", "transformers"), shape and device in extra_info, and
marks the plain-PyTorch provider it is measured against with baseline=True; bench/report.py turns the JSON
into a table (median, ratio vs that baseline) and plots.

Run: python -m pytest bench -q --benchmark-json=bench/out/results.json   (add -k to pick ops)
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

ON_GPU = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_only: benchmark needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="GPU benchmark; no CUDA device here")
    for item in items:
        if "gpu_only" in item.keywords and not ON_GPU:
            item.add_marker(skip)


@pytest.fixture
def bench_device() -> str:
    return "cuda" if ON_GPU else "cpu"


def _shape_label(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


@pytest.fixture
def run_bench(benchmark):
    """run_bench(fn, op=..., provider=..., shape={...}, device=..., dtype=..., baseline=False, **extra)
    times fn() (synchronizing CUDA), records the metadata and returns fn's last result."""

    def run(fn, *, op: str, provider: str, shape: dict, device: str, dtype=None, baseline: bool = False, **extra):
        benchmark.group = f"{op} {_shape_label(shape)}"
        benchmark.extra_info.update(
            op=op,
            provider=provider,
            shape=shape,
            shape_label=_shape_label(shape),
            device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
            dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
            baseline=baseline,
            **extra,
        )
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

            def timed():
                out = fn()
                torch.cuda.synchronize()
                return out

            fn()  # warm-up: compile/autotune outside the timed rounds
            torch.cuda.synchronize()
            result = benchmark(timed)
            benchmark.extra_info["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
            return result
        return benchmark(fn)

    return run


@pytest.fixture
def run_training_bench(run_bench):
    """run_training_bench(forward, inputs, op=..., provider=..., shape=..., device=..., dtype=..., baseline=False,
    memory=False) times one training step of an attention call, forward() then the gradients of `inputs` for a
    fixed random cotangent, as op "<op> fwd+bwd". memory=True also measures one step's peak memory above what was
    in use before it (dsattn.testing.call_peak_mb) against the inputs plus their gradients, in extra_info
    (peak_memory_mb, inputs_and_grads_mb, peak_over_inputs_and_grads)."""
    from dsattn import testing

    def run(forward, inputs, *, op: str, memory: bool = False, **kw):
        cotangent = []

        def step():
            out = forward()
            if not cotangent:
                cotangent.append(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out))
            return torch.autograd.grad(out, inputs, cotangent[0])

        extra = {}
        if memory:
            step()  # the cotangent and any one-time allocations (compiled kernels) outside the measured call
            _, peak = testing.call_peak_mb(step, kw["device"])
            held = 2 * sum(t.numel() * t.element_size() for t in inputs) / 2**20
            extra = dict(peak_memory_mb=peak, inputs_and_grads_mb=held,
                         peak_over_inputs_and_grads=None if peak is None else peak / held)
        result = run_bench(step, op=f"{op} fwd+bwd", **kw, **extra)
        return result, extra

    return run
