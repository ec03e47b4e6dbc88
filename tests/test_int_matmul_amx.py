"""int4_matmul / int8_matmul's compiled CPU path for bf16 x on AMX CPUs (csrc/cpu/int4_matmul_amx.cpp) at the
shapes the tests of test_int4_matmul.py / test_int8_matmul.py leave out: K in several blocks with a shorter last
one (for 16-32 rows of x and for more), N in many tasks taken by the threads from a shared counter, int4 groups
of 128 and 256 (the interleaved K order of the packed codes and of x) and of 64 (K order). Against the float64
oracle, and on AMX the same bits at 1 and 2 threads (the tiling does not depend on the thread count). CPUs
without AMX run the same calls on their panel / decode paths (checked against the oracle)."""

import os
import subprocess
import sys

import pytest
import torch

from dsattn.testing import assert_close, tolerance
from test_int4_matmul import _cpu_has_amx, expected
from test_int4_matmul import quantized as quantized_int4
from test_int8_matmul import quantized as quantized_int8

from conftest import requires_backend

# (M, N, K): K blocks of 512 (256 up to 32 rows of x) with a 128-value tail (group 256: K + 128, a 256-value
# tail), N over 2..8 tasks with a partial one.
CASES = [(16, 300, 640), (17, 1000, 1152), (32, 64, 896), (33, 515, 640), (257, 200, 1152)]


def _int4(x, w, bias):
    return torch.ops.dsattn_C.int4_matmul(x, w.qweight, w.scales.float(), w.zeros, w.group_size, bias)


def _int8(x, w, bias):
    return torch.ops.dsattn_C.int8_matmul(x, w.qweight, w.scales.float(), w.group_size, bias, -1)


@pytest.mark.parametrize("kind,group_size", [("int4", 128), ("int4", 256), ("int4", 64), ("int8", None),
                                             ("int8", 64)])
def test_amx_k_blocks_tasks_and_threads(monkeypatch, kind, group_size):
    requires_backend("cpp", "cpu", f"{kind}_matmul")
    for var in ("DSATTN_CPU_ISA", "DSATTN_INT4_AMX", "DSATTN_INT8_AMX"):
        monkeypatch.delenv(var, raising=False)
    op, quantize = (_int4, quantized_int4) if kind == "int4" else (_int8, quantized_int8)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    try:
        for m, n, k in CASES:
            k += 128 if group_size == 256 else 0
            w = quantize(n, k, group_size)
            bias = torch.randn(n)
            x = torch.randn(m, k).to(torch.bfloat16)
            outs = []
            for t in (1, 2):
                torch.set_num_threads(t)
                outs.append(op(x, w, bias))
            name = f"{kind} g={group_size} M={m} N={n} K={k}"
            assert outs[0].dtype == torch.bfloat16 and outs[0].shape == (m, n)
            assert_close(outs[0], expected(x, w, bias), tolerance(torch.bfloat16), name=name)
            assert_close(outs[1], expected(x, w, bias), tolerance(torch.bfloat16), name=name + " 2 threads")
            if _cpu_has_amx():
                assert torch.equal(outs[0], outs[1]), name
    finally:
        torch.set_num_threads(threads)


def test_brgemm_paths_off_with_mkldnn_disabled(monkeypatch):
    """torch.backends.mkldnn switched off after the fused path ran (torch's brgemm then raises): bf16 x takes
    the other paths, still against the float64 oracle."""
    requires_backend("cpp", "cpu", "int4_matmul")
    for var in ("DSATTN_CPU_ISA", "DSATTN_INT4_AMX", "DSATTN_INT8_AMX"):
        monkeypatch.delenv(var, raising=False)
    w4, w8 = quantized_int4(64, 256, 128), quantized_int8(64, 256)
    x = torch.randn(32, 256).to(torch.bfloat16)
    _int4(x, w4, None), _int8(x, w8, None)
    with torch.backends.mkldnn.flags(enabled=False):
        assert_close(_int4(x, w4, None), expected(x, w4), tolerance(torch.bfloat16), name="int4")
        assert_close(_int8(x, w8, None), expected(x, w8), tolerance(torch.bfloat16), name="int8")


_ZEN4_SCRIPT = """
import torch, dsattn._ext
from dsattn.testing import assert_close, tolerance
from test_int4_matmul import expected, quantized as q4
from test_int8_matmul import quantized as q8
from test_int_matmul_amx import _int4, _int8
torch.manual_seed(0)
for kind, g, m, n, k in (("int4", 128, 16, 300, 640), ("int4", 64, 33, 515, 640), ("int8", None, 64, 200, 1152)):
    w = q4(n, k, g) if kind == "int4" else q8(n, k, g)
    op = _int4 if kind == "int4" else _int8
    x, bias = torch.randn(m, k).to(torch.bfloat16), torch.randn(n)
    outs = []
    for t in (1, 2):
        torch.set_num_threads(t)
        outs.append(op(x, w, bias))
    assert_close(outs[0], expected(x, w, bias), tolerance(torch.bfloat16), name=kind)
    assert torch.equal(outs[0], outs[1]), kind
    import os
    os.environ["DSATTN_INT4_AMX"] = os.environ["DSATTN_INT8_AMX"] = "0"
    other = op(x, w, bias)  # the panel path: bf16 GEMM output, then the bias in bf16 (two roundings)
    del os.environ["DSATTN_INT4_AMX"], os.environ["DSATTN_INT8_AMX"]
    assert not torch.equal(outs[0], other), kind + " did not take the fused path"
print("ok")
"""


def test_avx512_bf16_brgemm_without_amx():
    """CPUs with AVX512-BF16 but no AMX (Zen 4) run the fused path on oneDNN's avx512_core_bf16 brgemm:
    emulated by capping oneDNN's ISA (ONEDNN_MAX_CPU_ISA, read when torch loads oneDNN, so in a subprocess).
    Against the float64 oracle, the same bits at 1 and 2 threads, and not the panel path's result."""
    requires_backend("cpp", "cpu", "int4_matmul")
    try:
        with open("/proc/cpuinfo") as f:
            if "avx512_bf16" not in f.read():
                pytest.skip("no AVX512-BF16 on this CPU")
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSATTN_")}
    env["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE_BF16"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _ZEN4_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
