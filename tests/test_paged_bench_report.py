"""bench/bench_continuous_batching.py's rows in the bench report: the main table (ratio vs the unpatched
transformers-sdpa baseline, peak memory) and the model table with their tokens/s."""

import json

from dsattn import bench_report


def _bench(provider, median_s, baseline):
    shape = dict(requests=8, prompt="32..256", new=8, W=64, layers=4, hidden=256)
    return {"stats": {"median": median_s}, "extra_info": dict(
        op="generate_batch", provider=provider, shape=shape, shape_label=" ".join(f"{k}={v}" for k, v in shape.items()),
        device="cpu", dtype="float32", baseline=baseline, model="llama", peak_memory_mb=12.0,
        tokens_per_s=64 / median_s, prompt_tokens=1152)}


def test_generate_batch_rows_reach_the_report(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"benchmarks": [_bench("transformers-sdpa", 4.0, True),
                                               _bench("dsattn sliding_window w=64", 2.0, False)]}))
    rows, _ = bench_report.load_rows([str(path)])
    text = bench_report.report_markdown(bench_report.with_ratios(rows))
    main = [line for line in text.splitlines() if line.startswith("| generate_batch | requests=8")]
    assert len(main) == 2 and any("2.00x" in line for line in main), text
    model = [line for line in text.splitlines() if line.startswith("| generate_batch | 32..256")]
    assert sorted(line.split("|")[7].strip() for line in model) == ["16.0", "32.0"], text  # tokens/s
