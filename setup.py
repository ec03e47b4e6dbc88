"""Build dsattn: always a CPU C++ extension (dsattn._C), plus a CUDA one (dsattn._C_cuda) when torch has CUDA
and a toolkit is found.

Environment:
  DSATTN_BUILD_CUDA      auto (default) | 0 | 1  -- 1 makes a missing toolkit an error
  DSATTN_BUILD_CPP       1 (default) | 0         -- 0 builds a pure-Python package (Triton/PyTorch paths only)
  TORCH_CUDA_ARCH_LIST   default "8.0;9.0"
  CUDA_HOME              default /usr/local/cuda when it holds nvcc

Build with `pip install --no-build-isolation .` so the extension links against the torch you run.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = [
    "dsattn",
    "dsattn.reference",
    "dsattn.torch_backend",
    "dsattn.ops",
    "dsattn.nn",
    "dsattn.quant",
    "dsattn.recover",
    "dsattn.patching",
    "dsattn.triton_kernels",
    "dsattn.bench",
]
# Triton sources live in triton_kernels/ but install as dsattn.triton_kernels: the top-level import name
# `triton_kernels` belongs to the Triton project (vLLM and others install it).
PACKAGE_DIR = {"dsattn.triton_kernels": "triton_kernels", "dsattn.bench": "bench"}


def _find_cuda_home():
    """A toolkit root holds bin/nvcc and include/cuda_runtime.h (a bare /usr/local/bin/nvcc wrapper is no root)."""

    def is_root(path):
        return bool(path) and all(os.path.exists(os.path.join(path, p)) for p in ("bin/nvcc", "include/cuda_runtime.h"))

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    return next((c for c in candidates if is_root(c)), None)


def _nvidia_wheel_includes():
    """CUDA wheels of torch ship cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h needs; a bare toolkit
    may lack them."""
    dirs = []
    try:
        import nvidia  # namespace package from the nvidia-* wheels

        for base in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
            dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    except ImportError:
        pass
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _write_build_info(info):
    path = os.path.join(ROOT, "dsattn", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time.\n")
        for key, value in info.items():
            f.write(f"{key} = {value!r}\n")


def _extensions():
    if os.environ.get("DSATTN_BUILD_CPP", "1") == "0":
        _write_build_info({"TORCH_VERSION": None, "CUDA_VERSION": None, "CUDA_ARCHS": [], "CPP": False})
        return [], {}
    want_cuda = os.environ.get("DSATTN_BUILD_CUDA", "auto").lower()
    cuda_home = _find_cuda_home()
    if cuda_home and "CUDA_HOME" not in os.environ:
        # torch guesses CUDA_HOME at import; without this it may guess /usr/local and fail to link -lcudart.
        os.environ["CUDA_HOME"] = cuda_home

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # No -std flag: torch.utils.cpp_extension picks the standard its headers need (C++20 from torch 2.14 on).
    cxx_flags = ["-O3", "-fopenmp", "-DNDEBUG"]
    cpu_sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    exts = [
        CppExtension(
            "dsattn._C",
            ["csrc/registration.cpp"] + cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]
    archs = []
    build_cuda = want_cuda in ("1", "true", "yes") or (
        want_cuda == "auto" and torch.version.cuda is not None and cuda_home is not None
    )
    if build_cuda:
        if torch.version.cuda is None or cuda_home is None:
            sys.exit(
                "DSATTN_BUILD_CUDA=1 but "
                + ("this torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit (nvcc) was found")
            )
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        archs = [a.strip() for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(",", ";").split(";") if a.strip()]
        cuda_sources = [
            os.path.relpath(p, ROOT)
            for pattern in ("*.cpp", "*.cu")
            for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", pattern)))
        ]
        if any(p.endswith(".cu") for p in cuda_sources):
            exts.append(
                CUDAExtension(
                    "dsattn._C_cuda",
                    cuda_sources,
                    include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_wheel_includes(),
                    extra_compile_args={
                        "cxx": ["-O3", "-DNDEBUG"],
                        "nvcc": ["-O3", "-DNDEBUG", "--use_fast_math", "-lineinfo"],
                    },
                )
            )
    _write_build_info(
        {
            "TORCH_VERSION": torch.__version__,
            "CUDA_VERSION": torch.version.cuda if build_cuda else None,
            "CUDA_ARCHS": archs,
            "CPP": True,
        }
    )
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
