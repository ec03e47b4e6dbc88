"""Packaging behaviour: the package works without its compiled extension, and `python -m dsattn info` reports
what is usable."""

import os
import subprocess
import sys

import torch

from dsattn import _ext

WITHOUT_EXTENSION = """
import sys
sys.modules["dsattn._C"] = None        # as if the extension were not built (or built for another torch)
sys.modules["dsattn._C_cuda"] = None
import torch, dsattn
from dsattn import _backend, _ext
from dsattn.ops.int4_unpack import int4_unpack
from dsattn.reference.int4 import pack_int4
assert not _ext.cpp_loaded()
q = torch.randint(0, 16, (3, 16), dtype=torch.uint8)
assert torch.equal(int4_unpack(pack_int4(q)), q)          # auto falls back to the reference
try:
    int4_unpack(pack_int4(q), backend="cpp")
except ValueError as e:
    assert "not built or failed to load" in str(e), e
else:
    raise AssertionError("backend='cpp' without the extension must be an error")
print("ok")
"""


def _run(code_or_args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-c", code_or_args] if isinstance(code_or_args, str) else [sys.executable, *code_or_args]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def test_package_runs_without_compiled_extension():
    proc = _run(WITHOUT_EXTENSION)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_info_command_reports_backends():
    proc = _run(["-m", "dsattn", "info"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert f"torch: {torch.__version__}" in out
    assert "backends:" in out and "cpp:" in out and "compiled CUDA archs:" in out


def test_compiled_extension_matches_this_torch():
    info = _ext.build_info()
    if _ext.cpp_loaded():
        assert info.get("TORCH_VERSION") == torch.__version__, info
        assert _ext.has_kernel("int4_unpack", "CPU")
    else:  # built for another torch or not built: the error is kept for `info`, never raised at import
        assert "dsattn._C" in _ext.load_errors()


def test_triton_kernels_is_installed_as_a_subpackage_only():
    """dsattn's Triton sources install as dsattn.triton_kernels; the top-level name belongs to Triton. (The
    wheel's file list is checked in .ci/run; here: what the installed distribution declares.)"""
    from importlib import metadata

    import dsattn.triton_kernels

    assert dsattn.triton_kernels.__name__ == "dsattn.triton_kernels"
    files = [str(f) for f in (metadata.distribution("dsattn").files or [])]
    assert not any(f.startswith("triton_kernels/") for f in files), [f for f in files if "triton_kernels" in f]


# --- the README's set-up commands (CI runs the test-command block verbatim: .ci/run) ---------------------------

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _readme_block(text: str, name: str) -> str:
    """The shell lines between <!-- name --> and <!-- /name -->, fences dropped (as .ci/run reads them)."""
    start, end = text.index(f"<!-- {name} -->"), text.index(f"<!-- /{name} -->")
    return "\n".join(line for line in text[start:end].splitlines()[1:] if not line.startswith("```")).strip()


def _pip_installs(command: str) -> list[list[str]]:
    """The arguments of every `pip install` in a `&&`-chained command line."""
    import shlex

    return [words[2:] for part in command.split("&&") for words in [shlex.split(part)]
            if words[:2] == ["pip", "install"]]


def test_readme_has_exactly_two_setup_commands():
    text = open(README).read()
    setup = text[text.index("## Set up"):text.index("\n## ", text.index("## Set up") + 1)]
    assert setup.count("```bash") == 2, "the set-up section must hold exactly two commands"
    for name in ("demo-command", "test-command"):
        assert text.count(f"<!-- {name} -->") == 1 and text.count(f"<!-- /{name} -->") == 1, name
        block = _readme_block(text, name)
        assert len(block.splitlines()) == 1 and block.startswith("python3 -m venv .venv"), block
        assert ["--no-build-isolation", "-e", "."] in _pip_installs(block), block  # built against that torch
    assert _readme_block(text, "demo-command").endswith("python -m dsattn demo")
    assert _readme_block(text, "test-command").endswith("python -m pytest -q tests")


def test_readme_demo_command_installs_no_cuda_wheels():
    """The demo's torch comes from PyTorch's CPU index, and nothing else in it pulls GPU packages; the test
    command keeps PyPI's torch (CUDA on Linux), which CI's stage 1 needs to compile the CUDA kernels."""
    text = open(README).read()
    demo_installs = _pip_installs(_readme_block(text, "demo-command"))
    torch_installs = [args for args in demo_installs if any(a.split("=")[0].split(">")[0] == "torch" for a in args)]
    assert len(torch_installs) == 1, demo_installs
    args = torch_installs[0]
    assert "--index-url" in args and args[args.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert [a for a in args if not a.startswith("-") and "download.pytorch.org" not in a] == ["torch==2.13.0"], args
    gpu_only = ("triton", "nvidia", "cuda", "cupy", "flash-attn", "flash_attn")
    for args in demo_installs:
        assert not any(a.lower().startswith(gpu_only) for a in args), args
    test_installs = _pip_installs(_readme_block(text, "test-command"))
    assert any('torch>=2.6' in args for args in test_installs) and not any(
        "--index-url" in args or "--extra-index-url" in args for args in test_installs), test_installs
