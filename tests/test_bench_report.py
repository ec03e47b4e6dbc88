"""The benchmark harness end to end on CPU: a real (tiny) pytest-benchmark run -> JSON -> report + plot."""

import json
import os
import subprocess
import sys

import pytest

from dsattn import bench_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_report_from_a_real_benchmark_run(tmp_path):
    pytest.importorskip("pytest_benchmark")
    out_json = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "bench", "bench_int4_unpack.py"),
         "-k", "1024", f"--benchmark-json={out_json}", "--benchmark-min-rounds=2", "--benchmark-max-time=0.05"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out_json.read_text())
    providers = {b["extra_info"]["provider"] for b in data["benchmarks"]}
    assert "torch" in providers and "dsattn-cpp" in providers, providers
    assert bench_report.main([str(out_json), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "report.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| int4_unpack")]
    assert len(rows) == 2, table
    cells = [[c.strip() for c in r.split("|")] for r in rows]  # ['', op, shape, device, dtype, provider, median, ratio, mem, '']
    assert cells[0][7] == "baseline" and cells[1][7].endswith("x"), table
    medians = [float(r.split("|")[6]) for r in rows]
    assert all(m > 0 for m in medians), table


def test_ratio_is_baseline_over_provider():
    rows = [
        {"op": "o", "provider": "torch", "shape": {"S": 1}, "shape_label": "S=1", "device": "cpu", "dtype": None,
         "baseline": True, "median_ms": 4.0, "peak_memory_mb": None, "extra": {}},
        {"op": "o", "provider": "fast", "shape": {"S": 1}, "shape_label": "S=1", "device": "cpu", "dtype": None,
         "baseline": False, "median_ms": 1.0, "peak_memory_mb": None, "extra": {}},
    ]
    bench_report.with_ratios(rows)
    assert rows[1]["ratio"] == pytest.approx(4.0)
    assert "4.00x" in bench_report.markdown(rows)
