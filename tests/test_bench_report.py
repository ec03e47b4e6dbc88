"""The benchmark harness end to end on CPU: a real (tiny) pytest-benchmark run -> JSON -> report + plot."""

import json
import os
import subprocess
import sys

import pytest

from dsattn import bench_report, testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env():
    """The environment for a child pytest: no interpreter flag (it picks its own) and none of this run's
    PYTEST_* variables (under pytest-xdist, PYTEST_XDIST_WORKER makes pytest-benchmark switch itself off)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_")}


def test_report_from_a_real_benchmark_run(tmp_path):
    pytest.importorskip("pytest_benchmark")
    out_json = tmp_path / "results.json"
    env = child_env()
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


TRAINING_BENCHES = {"sliding_window_attention": "bench_sliding_window_attention.py",
                    "sparse_attention": "bench_sparse_attention.py", "linear_attention": "bench_linear_attention.py",
                    "hybrid_attention": "bench_hybrid_attention.py"}


def test_fwd_bwd_benchmarks_run_on_cpu_at_small_sizes(tmp_path):
    """Every attention op's forward+backward benchmark (the smallest CPU case) runs: dsattn's training step and
    SDPA's through autograd, timed in one run, with dsattn's peak memory against its inputs plus gradients."""
    pytest.importorskip("pytest_benchmark")
    out_json = tmp_path / "training.json"
    files = [os.path.join(ROOT, "bench", name) for name in TRAINING_BENCHES.values()]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k", "fwd_bwd_cpu and 1024",
         f"--benchmark-json={out_json}", "--benchmark-min-rounds=1", "--benchmark-max-time=0.01"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out_json.read_text())
    seen = {(b["extra_info"]["op"], b["extra_info"]["provider"]): b for b in data["benchmarks"]}
    for op in TRAINING_BENCHES:
        assert (f"{op} fwd+bwd", "torch-sdpa") in seen, sorted(seen)
        ours = seen[(f"{op} fwd+bwd", "dsattn-torch")]
        assert ours["stats"]["median"] > 0
        if testing.reset_rss_peak():
            assert ours["extra_info"]["peak_memory_mb"] is not None and ours["extra_info"]["inputs_and_grads_mb"] > 0
    rows, _ = bench_report.load_rows([str(out_json)])
    bench_report.with_ratios(rows)
    assert "fwd+bwd" in bench_report.markdown(rows)


def _load_bench_model():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_model", os.path.join(ROOT, "bench", "bench_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_benchmark_report_on_cpu(tmp_path):
    """bench/bench_model.py at tiny sizes -> JSON -> report with the model table, plots and the skipped list."""
    pytest.importorskip("pytest_benchmark")
    pytest.importorskip("transformers")
    out_json = tmp_path / "results_model.json"
    skipped = tmp_path / "skipped.jsonl"
    skipped.write_text(json.dumps({"bench": "prefill_deepseek_v3", "mode": "dense-sdpa", "S": 131072,
                                   "reason": "out of memory at S=131072"}) + "\n")
    env = child_env()
    env.update(DSATTN_BENCH_MODEL_CONTEXTS="128,256", DSATTN_BENCH_MODEL_DECODE="128", OMP_NUM_THREADS="1",
               DSATTN_BENCH_SKIPS=str(skipped), CUDA_VISIBLE_DEVICES="")  # the CPU sizes, fp32: exact checks hold
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "bench", "bench_model.py"),
         "-k", "dense or sliding or int4", f"--benchmark-json={out_json}"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows, _ = bench_report.load_rows([str(out_json)])
    bench_report.with_ratios(rows)
    prefill = [r for r in rows if r["op"] == "prefill_deepseek_v3"]
    assert {r["shape"]["S"] for r in prefill} == {128, 256}
    assert {r["provider"] for r in prefill} == {"dense-sdpa", "sliding_window w=512", "int4 g128"}
    for r in prefill:
        kl, top1 = r["extra"]["kl_vs_dense"], r["extra"]["top1_vs_dense"]
        if r["baseline"]:
            assert kl == 0.0 and top1 == 1.0
        elif r["provider"].startswith("sliding_window"):  # window 512 >= S: exactly dense attention
            assert kl < 1e-8 and top1 == 1.0, r
        else:  # int4 really changes the weights
            assert kl > 0 and r["extra"]["call_peak_mb"] is not None
        assert r["median_ms"] > 0 and r["peak_memory_mb"] is not None and r["peak_memory_mb"] >= 0
    assert {r["provider"] for r in rows if r["op"] == "decode_deepseek_v3"} >= {"dense-sdpa", "int4 g128"}

    report_dir = tmp_path / "report"
    assert bench_report.main([str(out_json), "--out", str(report_dir), "--skipped", str(skipped)]) == 0
    text = (report_dir / "report.md").read_text()
    assert "## Model benchmarks" in text and "## Skipped cases" in text and "out of memory at S=131072" in text
    model_lines = [line for line in text.splitlines() if line.startswith("| decode_deepseek_v3 | 128 |")]
    assert model_lines and all(float(line.split("|")[7]) > 0 for line in model_lines), text  # tokens/s
    for name in ("prefill_deepseek_v3_time_cpu.png", "prefill_deepseek_v3_memory_cpu.png",
                 "prefill_deepseek_v3_speedup_cpu.png"):
        assert (report_dir / name).stat().st_size > 1000, name


def test_skips_are_recorded(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    path = tmp_path / "skipped.jsonl"
    monkeypatch.setenv("DSATTN_BENCH_SKIPS", str(path))
    bench_model = _load_bench_model()
    with pytest.raises(pytest.skip.Exception, match="too big"):
        bench_model._record_skip({"bench": "prefill_deepseek_v3", "S": 7}, "too big")
    assert bench_report.load_skipped(str(path)) == [{"bench": "prefill_deepseek_v3", "S": 7, "reason": "too big",
                                                     "device": bench_model.DEVICE}]


def test_cpu_peak_memory_sees_a_torch_allocation():
    pytest.importorskip("transformers")
    bench_model = _load_bench_model()
    if bench_model.DEVICE != "cpu" or not testing.reset_rss_peak():
        pytest.skip("CPU with /proc/self/clear_refs only")
    import torch

    def allocate():
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        return float(x[-1])

    _, small = bench_model.measure_call(lambda: 1.0)
    _, big = bench_model.measure_call(allocate)
    assert small < 16 and 60 < big < 200, (small, big)


def _row(provider, median_ms, device="cuda NVIDIA H100", baseline=False):
    return {"op": "o", "provider": provider, "shape": {"S": 8}, "shape_label": "S=8", "device": device,
            "dtype": "bfloat16", "baseline": baseline, "median_ms": median_ms, "peak_memory_mb": None, "extra": {}}


def test_readme_block_gets_the_fastest_dsattn_provider_of_the_gpu_rows(tmp_path):
    rows = bench_report.with_ratios([
        _row("torch-sdpa", 6.0, baseline=True), _row("dsattn-triton", 2.0), _row("dsattn-torch", 9.0),
        _row("torch-sdpa", 1.0, device="cpu", baseline=True), _row("dsattn-torch", 0.5, device="cpu"),
    ])
    table = bench_report.summary_markdown(rows, source="bench/results/x")
    body = [line for line in table.splitlines() if line.startswith("| o ")]
    assert body == ["| o | S=8 | cuda NVIDIA H100 | bfloat16 | 6.000 (torch-sdpa) | dsattn-triton | 2.000 | 3.00x |"], table
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results-table -->\nold table\n<!-- /results-table -->\noutro\n")
    bench_report.update_readme(str(readme), table)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "dsattn-triton | 2.000 | 3.00x" in text
    bench_report.update_readme(str(readme), table)  # idempotent: the block is replaced, not appended
    assert readme.read_text() == text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="results-table"):
        bench_report.update_readme(str(readme), table)


def test_bench_names_the_extra_to_install_when_its_dependencies_are_missing(monkeypatch):
    import importlib.util

    from dsattn import benchmark

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytest_benchmark" else find_spec(name, *a))
    with pytest.raises(SystemExit, match=r'pytest-benchmark: pip install "dsattn\[bench\]"'):
        benchmark.main(["--out", "unused"])
    assert os.path.isfile(os.path.join(benchmark.bench_dir(), "conftest.py"))


# ------------------------------------------------------------------------------------------------- roofline
def test_roofline_sliding_window_by_hand():
    """B=1 H=2 S=8 D=4 window 3: rows see 1, 2, then 3 keys -> 1 + 2 + 6 * 3 = 21 (query, key) pairs;
    FLOPs 2 * 2 heads * 21 * (4 + 4) = 672; bytes q, k, v, o: 4 tensors * 2 heads * 8 rows * 4 * 2 B = 512."""
    from dsattn import roofline

    w = roofline.work("sliding_window_attention", dict(B=1, H=2, S=8, D=4, window=3))
    assert (w.flops, w.bytes) == (672, 512)
    assert w.seconds(roofline.H100_SXM) == pytest.approx(512 / 3.35e12) and w.bound(roofline.H100_SXM) == "memory"
    # the benchmark's prefill: 4096 * 4097 / 2 + (32768 - 4096) * 4096 = 125,831,168 pairs, 32 heads, D 128
    w = roofline.work("sliding_window_attention", dict(B=1, H=32, S=32768, D=128, window=4096))
    assert w.flops == 2 * 32 * 125_831_168 * 256 and w.bytes == 4 * 32 * 32768 * 128 * 2
    assert w.seconds(roofline.H100_SXM) == pytest.approx(2 * 32 * 125_831_168 * 256 / 989.4e12)
    # training: forward 2 matmuls + backward 5 (QK^T again, dV, dP, dQ, dK); bytes 4 + 8 tensors of [2, 8, 4]
    w = roofline.work("sliding_window_attention fwd+bwd", dict(B=1, H=2, S=8, D=4, window=3))
    assert (w.flops, w.bytes) == (2 * 2 * 21 * 7 * 4, 12 * 2 * 8 * 4 * 2)


def test_roofline_other_ops_by_hand():
    from dsattn import roofline

    # int4 GEMM M=2 N=4 K=256 g=128: x 2*256*2 + out 2*4*2 + weight 4*256/2 + 4*2 groups*(2 + 1) = 1024+16+512+24
    w = roofline.work("int4_matmul", {"M": 2, "N": 4, "K": 256, "g": 128})
    assert (w.flops, w.bytes) == (2 * 2 * 4 * 256, 1576)
    # sparse decode: 1 row, topk 3 of 10 keys; q, o 2 heads * (8 + 4) * 2 B, k/v 3 keys * (8 + 4) * 2, indices 12
    w = roofline.work("sparse_attention", {"B": 1, "Hq": 2, "Hkv": 1, "Sk": 10, "topk": 3, "Dqk": 8, "Dv": 4})
    assert (w.flops, w.bytes) == (2 * 2 * 3 * 12, 48 + 72 + 12)
    # indexer S=4 causal: 10 pairs, 2 heads, D 8; q 4*2*8*2, k 4*8*2, weights 4*2*4, indices 4*2*4
    w = roofline.work("lightning_indexer_topk", {"B": 1, "S": 4, "Hi": 2, "D": 8, "top_k": 2})
    assert (w.flops, w.bytes) == (2 * 2 * 8 * 10, 128 + 64 + 32 + 32)
    # banded pairs against brute force, Sq < Sk included
    for sq, sk, band in ((5, 5, 2), (3, 9, 4), (7, 7, 100), (1, 6, 3)):
        brute = sum(min(i + sk - sq + 1, band) for i in range(sq))
        assert roofline.banded_pairs(sq, sk, band) == brute


def _gpu_row(op, shape, provider, median_ms, device="NVIDIA H100 80GB HBM3"):
    return {"op": op, "provider": provider, "shape": shape, "shape_label": bench_report._label(shape),
            "device": device, "dtype": "bfloat16", "baseline": False, "median_ms": median_ms,
            "peak_memory_mb": None, "extra": {}}


def test_roofline_table_fraction_and_no_gpu_rows():
    from dsattn import roofline

    shape = dict(B=1, H=32, S=32768, D=128, window=4096)
    bound_ms = 2 * 32 * 125_831_168 * 256 / 989.4e12 * 1e3  # 2.084 ms, compute-bound on both
    table = bench_report.roofline_markdown([_gpu_row("sliding_window_attention", shape, "dsattn-triton", 2 * bound_ms),
                                            _gpu_row("sliding_window_attention", shape, "flex", bound_ms, "Tesla T4")])
    line = next(r for r in table.splitlines() if "dsattn-triton" in r)
    assert line.split("|")[-2].strip() == "0.50", line
    assert "n/a" in next(r for r in table.splitlines() if "| flex |" in r)
    # CPU rows only: the table still lists every GPU shape of every kernel, measured columns empty
    cpu = [dict(_gpu_row("int4_unpack", {"K": 1024}, "torch", 1.0), device="cpu")]
    report = bench_report.report_markdown(bench_report.with_ratios(cpu))
    assert "## Roofline" in report
    for op, shape in roofline.GPU_SHAPES:
        assert f"| {op} | {bench_report._label(shape)} |" in report, (op, shape)
    assert "H100 SXM" in report and "3.35 TB/s" in report


def test_roofline_lists_every_gpu_benchmark_op():
    """Each bench file with gpu_only benchmarks has its op(s) among roofline.GPU_SHAPES."""
    import re

    from dsattn import roofline

    ops = {op.removesuffix(roofline.FWD_BWD) for op, _ in roofline.GPU_SHAPES}
    for name in sorted(os.listdir(os.path.join(ROOT, "bench"))):
        if not name.startswith("bench_"):
            continue
        with open(os.path.join(ROOT, "bench", name)) as f:
            text = f.read()
        if "gpu_only" not in text:
            continue
        named = set(re.findall(r'^OP = "(\w+)"', text, re.M)) | set(re.findall(r'op="(\w+)"', text))
        assert named and named <= ops | {"int4_unpack"}, (name, named - ops)


def test_roofline_int8_matmul_by_hand():
    """M=1 N=K=8192 per channel: x and out in bf16 (2 x 8192 x 2 B), 8192^2 one-byte weights, 8192 bf16 scales;
    the time bound is the bytes over H100 SXM's 3.35 TB/s (memory bound: 2 x 8192^2 FLOPs are nothing)."""
    from dsattn import roofline

    work = roofline.int8_matmul({"M": 1, "N": 8192, "K": 8192, "g": "channel"})
    assert work.bytes == 2 * 8192 * 2 + 8192 * 8192 + 8192 * 2 == 67158016
    assert work.flops == 2 * 8192 * 8192
    grouped = roofline.int8_matmul({"M": 1, "N": 8192, "K": 8192, "g": 128})
    assert grouped.bytes - work.bytes == 8192 * (8192 // 128 - 1) * 2
