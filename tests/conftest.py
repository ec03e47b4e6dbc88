"""Test ladder fixtures. Without a GPU the Triton kernels run in the interpreter on CPU tensors, so
TRITON_INTERPRET must be set before triton is first imported (triton.jit reads it at decoration)."""

import os

import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's default-change warning
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from dsattn import _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    # Also declared in pyproject.toml; repeated here for runs outside the source tree (the installed wheel in CI).
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running (deselect with -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device() -> str:
    """Where kernels under test run: the GPU when present, else CPU (Triton through its interpreter)."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def triton_device(device) -> str:
    """Device for backend="triton" tests; skips when Triton cannot run here."""
    reason = _backend.unusable_reason("triton", torch.device(device))
    if reason is not None:
        pytest.skip(reason)
    return device


@pytest.fixture
def compiled_backend(device) -> str:
    """The compiled backend for this device: "cuda" on a GPU, "cpp" on CPU."""
    return "cuda" if device == "cuda" else "cpp"


def requires_backend(backend: str, device: str, kernel: str | None = None) -> None:
    reason = _backend.unusable_reason(backend, torch.device(device), kernel)
    if reason is not None:
        pytest.skip(reason)
