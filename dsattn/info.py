"""`python -m dsattn info`: versions, devices, usable backends, compiled archs."""

import importlib
import platform

import torch

from dsattn import _backend, _ext


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception:
        return "not installed"


def collect() -> dict:
    import dsattn

    devices = ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    cpu = torch.device("cpu")
    backends = {
        "torch": "yes",
        "cpp": _backend.unusable_reason("cpp", cpu) or "yes",
        "triton": (
            "yes (GPU)" if torch.cuda.is_available() and _backend.triton_installed()
            else ("interpreter only (TRITON_INTERPRET=1)" if _backend.triton_installed() else "triton not installed")
        ),
        "cuda": (
            "yes" if torch.cuda.is_available() and _ext.cuda_loaded()
            else ("built, no GPU here" if _ext.cuda_loaded() else "not built")
        ),
    }
    build = _ext.build_info()
    return {
        "dsattn": dsattn.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "devices": devices,
        "backends": backends,
        "built against torch": build.get("TORCH_VERSION"),
        "compiled CUDA archs": build.get("CUDA_ARCHS") or [],
        "extension load errors": _ext.load_errors(),
    }


def main(argv=None) -> int:
    for key, value in collect().items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    return 0
