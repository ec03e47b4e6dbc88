"""Turn pytest-benchmark JSON into a Markdown report (median, ratio vs the PyTorch baseline) and PNG plots.

    python bench/report.py results.json [more.json ...] --out DIR [--skipped skipped.jsonl]
        [--fidelity fidelity.json] [--env env.json] [--readme README.md]   (or python -m dsattn.bench_report)

Each benchmark carries extra_info from bench/conftest.py: op, provider, shape, device, dtype, baseline.
Rows are grouped by (op, shape); ratio = baseline median / provider median (> 1 means faster than PyTorch).
Model benchmarks (bench/bench_model.py) also carry KL / top-1 agreement vs the dense model; their rows get a
second table (tokens/s for decode). Plots per op and device: time and memory vs the shape key that varies, and
speedup vs the baseline over it (e.g. int4_matmul vs M). Everything is computed from the JSON given.
"""

import argparse
import json
import math
import os
from collections import defaultdict

MEMORY_NOTE = ("peak mem: on GPU torch.cuda.max_memory_allocated over the timed rounds (weights included); on CPU "
               "kernel rows have none, model rows give the resident-set high-water mark of one call above the RSS "
               "before it (VmHWM reset through /proc/self/clear_refs, malloc_trim first).")


def load_rows(paths):
    rows, machine = [], {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = data.get("machine_info", machine)
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if "op" not in info:
                continue
            rows.append(
                {
                    "op": info["op"],
                    "provider": info["provider"],
                    "shape": info.get("shape", {}),
                    "shape_label": info.get("shape_label", ""),
                    "device": info.get("device", "?"),
                    "dtype": info.get("dtype"),
                    "baseline": bool(info.get("baseline")),
                    "median_ms": bench["stats"]["median"] * 1e3,
                    "peak_memory_mb": info.get("peak_memory_mb"),
                    "extra": {k: v for k, v in info.items() if k not in ("op", "provider", "shape", "shape_label",
                                                                          "device", "dtype", "baseline",
                                                                          "peak_memory_mb")},
                }
            )
    return rows, machine


def with_ratios(rows):
    groups = defaultdict(list)
    for row in rows:
        groups[(row["op"], row["shape_label"], row["device"], row["dtype"])].append(row)
    for group in groups.values():
        base = next((r for r in group if r["baseline"]), None)
        for r in group:
            r["ratio"] = base["median_ms"] / r["median_ms"] if base and r["median_ms"] > 0 else None
            r["baseline_provider"] = base["provider"] if base else None
    return rows


def markdown(rows, machine=None) -> str:
    lines = []
    if machine:
        cpu = machine.get("cpu", {}).get("brand_raw", "")
        lines.append(f"Machine: {machine.get('node', '?')} {cpu}".rstrip())
        lines.append("")
    lines.append("| op | shape | device | dtype | provider | median (ms) | vs PyTorch baseline | peak mem (MB) |")
    lines.append("|---|---|---|---|---|---:|---:|---:|")
    def order(r):
        shape = tuple((k, v) if isinstance(v, (int, float)) else (k, 0) for k, v in r["shape"].items())
        return (r["op"], r["device"], shape, r["shape_label"], not r["baseline"], r["provider"])

    for r in sorted(rows, key=order):
        ratio = "baseline" if r["baseline"] else (f"{r['ratio']:.2f}x" if r["ratio"] else "n/a")
        mem = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else ""
        lines.append(
            f"| {r['op']} | {r['shape_label']} | {r['device']} | {r['dtype'] or ''} | {r['provider']} | "
            f"{r['median_ms']:.3f} | {ratio} | {mem} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value, spec):
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def model_markdown(rows) -> str:
    """Rows from bench/bench_model.py (they report kl_vs_dense) and bench/bench_continuous_batching.py
    (tokens_per_s): one line per op, length and mode."""
    # bench_continuous_batching.py's generate_batch rows carry their own tokens/s (all requests' new tokens).
    model_rows = [r for r in rows if "kl_vs_dense" in r["extra"] or r["op"].startswith("decode_")
                  or "tokens_per_s" in r["extra"]]
    if not model_rows:
        return ""
    lines = ["| bench | length | device | mode | median (ms) | vs dense | tokens/s | peak mem (MB) | "
             "KL(dense‖mode) | top-1 vs dense |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(model_rows, key=lambda r: (r["op"], r["device"], _length(r), not r["baseline"], r["provider"])):
        ratio = "baseline" if r["baseline"] else (f"{r['ratio']:.2f}x" if r.get("ratio") else "n/a")
        tokens_s = 1e3 / r["median_ms"] if r["op"].startswith("decode_") and r["median_ms"] > 0 else \
            r["extra"].get("tokens_per_s")
        lines.append(f"| {r['op']} | {_length(r)} | {r['device']} | {r['provider']} | {r['median_ms']:.2f} | {ratio} | "
                     f"{_fmt(tokens_s, '.1f')} | {_fmt(r['peak_memory_mb'], '.0f')} | "
                     f"{_fmt(r['extra'].get('kl_vs_dense'), '.2e')} | {_fmt(r['extra'].get('top1_vs_dense'), '.3f')} |")
    return "\n".join(lines) + "\n"


def _length(r):
    return next((v for k, v in r["shape"].items() if k in ("S", "L", "prompt")), "")


def load_skipped(path):
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def skipped_markdown(skipped) -> str:
    if not skipped:
        return ""
    lines = ["| bench | case | reason |", "|---|---|---|"]
    for s in skipped:
        case = " ".join(f"{k}={v}" for k, v in s.items() if k not in ("bench", "reason", "device"))
        lines.append(f"| {s.get('bench', '?')} | {case} | {s['reason']} |")
    return "\n".join(lines) + "\n"


def env_line(path) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path) as f:
        env = json.load(f)
    keys = ("date", "dsattn", "python", "torch", "triton", "transformers", "devices")
    return "Versions: " + ", ".join(f"{k} {env[k]}" for k in keys if env.get(k) is not None) + "\n"


def _label(shape: dict) -> str:
    """bench/conftest.py's shape label of a shape dict (how rows of one shape are matched)."""
    return " ".join(f"{k}={v}" for k, v in shape.items())


def roofline_markdown(rows) -> str:
    """Per GPU shape of each kernel (dsattn.roofline.GPU_SHAPES, plus any other GPU row a model covers): bytes
    moved, FLOPs, the time bound at H100 SXM / H200 peaks, and for each measured GPU row its fraction of the
    roofline of its own device (bound / median). Present before any GPU run, with the measured columns empty."""
    from dsattn import roofline

    gpu_rows = [r for r in rows if r["device"] != "cpu"]
    shapes = {(op, _label(shape)): shape for op, shape in roofline.GPU_SHAPES}
    for r in gpu_rows:
        if roofline.work(r["op"], r["shape"]) is not None:
            shapes.setdefault((r["op"], r["shape_label"]), r["shape"])
    lines = ["| op | shape | GFLOP | MB moved | " + " | ".join(f"{g.name} bound (ms)" for g in roofline.GPUS)
             + " | device | provider | median (ms) | fraction of roofline |",
             "|---|---|---:|---:|" + "---:|" * len(roofline.GPUS) + "---|---|---:|---:|"]
    for (op, label), shape in sorted(shapes.items(), key=lambda kv: kv[0][0]):
        w = roofline.work(op, shape)
        bounds = " | ".join(f"{w.seconds(g) * 1e3:.3f} ({w.bound(g)})" for g in roofline.GPUS)
        head = f"| {op} | {label} | {w.flops / 1e9:.1f} | {w.bytes / 1e6:.1f} | {bounds} |"
        measured = [r for r in gpu_rows if r["op"] == op and r["shape_label"] == label]
        if not measured:
            lines.append(head + " | | | |")
        for r in sorted(measured, key=lambda r: (r["device"], r["provider"])):
            gpu = roofline.gpu_of(r["device"])
            fraction = (f"{w.seconds(gpu) / (r['median_ms'] / 1e3):.2f}" if gpu and r["median_ms"] > 0
                        else "n/a (no peaks for this device)")
            lines.append(head + f" {r['device']} | {r['provider']} | {r['median_ms']:.3f} | {fraction} |")
    peaks = "; ".join(f"{g.name}: {g.hbm_bytes_per_s / 1e12:.2f} TB/s, {g.bf16_flops_per_s / 1e12:.1f} TFLOP/s "
                      f"dense bf16 ({g.source})" for g in roofline.GPUS)
    note = ("Bound = max(bytes / peak bandwidth, FLOPs / peak dense bf16 rate); fraction = bound / median (1 = at "
            f"the limit). Peaks: {peaks}. Models: dsattn/roofline.py.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def report_markdown(rows, machine=None, *, skipped=(), fidelity=None, env_path=None) -> str:
    parts = []
    env = env_line(env_path)
    if env:
        parts.append(env)
    parts.append(markdown(rows, machine))
    if any(r["peak_memory_mb"] is not None for r in rows):
        parts.append(MEMORY_NOTE + "\n")
    model = model_markdown(rows)
    if model:
        parts.append("## Model benchmarks (bench/bench_model.py; random-init models: KL and top-1 say how much a "
                     "mode changes the output, see the fidelity section for quality)\n\n" + model)
    parts.append("## Roofline of the GPU shapes (dsattn.roofline)\n\n" + roofline_markdown(rows))
    if skipped:
        parts.append("## Skipped cases\n\n" + skipped_markdown(skipped))
    if fidelity:
        from dsattn import fidelity as fidelity_module

        parts.append("## Fidelity on a trained model (dsattn.fidelity)\n\n" + fidelity_module.markdown(fidelity))
    return "\n".join(parts)


README_BLOCK = "results-table"  # README.md carries the latest results between <!-- results-table --> markers


def summary_markdown(rows, *, source: str, env_path=None) -> str:
    """The README's table: per (op, shape, device, dtype) the baseline and the fastest dsattn provider, from
    the GPU rows when there are any (the claims that matter), else all rows."""
    gpu = [r for r in rows if r["device"] != "cpu"]
    rows = gpu or rows
    groups = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["shape_label"], r["device"], r["dtype"])].append(r)
    lines = [f"Source: `{source}`. " + env_line(env_path).strip(), "",
             "| op | shape | device | dtype | baseline (ms) | fastest dsattn | ms | speedup |",
             "|---|---|---|---|---:|---|---:|---:|"]
    for (op, label, device, dtype), group in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        base = next((r for r in group if r["baseline"]), None)
        ours = [r for r in group if r["provider"].startswith("dsattn")]
        if base is None or not ours:
            continue
        best = min(ours, key=lambda r: r["median_ms"])
        lines.append(f"| {op} | {label} | {device} | {dtype or ''} | {base['median_ms']:.3f} ({base['provider']}) | "
                     f"{best['provider']} | {best['median_ms']:.3f} | {base['median_ms'] / best['median_ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def update_readme(path: str, table: str) -> None:
    """Replace the text between <!-- results-table --> and <!-- /results-table --> in `path`."""
    with open(path) as f:
        text = f.read()
    start, end = f"<!-- {README_BLOCK} -->", f"<!-- /{README_BLOCK} -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{start}\n{table}{end}{tail}")


def _x_key(rows):
    """The numeric shape key that varies within an op (sequence length, M, ...), if any."""
    keys = [k for k, v in rows[0]["shape"].items() if isinstance(v, (int, float))]
    for key in keys:
        if len({r["shape"].get(key) for r in rows}) > 1:
            return key
    return None


def plots(rows, out_dir) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping plots")
        return []
    written = []
    # one plot per op, device and shape schema: a case with other shape keys (its own parameter set) is not a
    # point on another case's curve
    by_op = defaultdict(list)
    for r in rows:
        by_op[(r["op"], r["device"], tuple(sorted(r["shape"])))].append(r)
    schemas = defaultdict(list)
    for op, device, schema in by_op:
        schemas[(op, device)].append(schema)
    for (op, device, schema), op_rows in sorted(by_op.items()):
        key = _x_key(op_rows)
        suffix = "" if len(schemas[(op, device)]) == 1 else "_" + "-".join(schema)
        if key is None:
            continue
        for metric, label in (("median_ms", "median time (ms)"), ("peak_memory_mb", "peak memory (MB)")):
            series = defaultdict(list)
            for r in op_rows:
                if r[metric] is not None:
                    series[r["provider"]].append((r["shape"][key], r[metric]))
            if not series:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for provider, points in sorted(series.items()):
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(key)
            ax.set_ylabel(label)
            ax.set_title(f"{op} on {device}")
            ax.legend()
            fig.tight_layout()
            name = f"{op}{suffix}_{'time' if metric == 'median_ms' else 'memory'}_{device.replace(' ', '_')}.png"
            path = os.path.join(out_dir, name)
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
        speedup = defaultdict(list)  # provider -> (x, baseline median / provider median), same shape only
        for r in with_ratios(list(op_rows)):
            if not r["baseline"] and r.get("ratio"):
                speedup[r["provider"]].append((r["shape"][key], r["ratio"]))
        if speedup:
            base = next((r["provider"] for r in op_rows if r["baseline"]), "baseline")
            fig, ax = plt.subplots(figsize=(6, 4))
            for provider, points in sorted(speedup.items()):
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
            ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(key)
            ax.set_ylabel(f"speedup vs {base} (x)")
            ax.set_title(f"{op} on {device}")
            ax.legend()
            fig.tight_layout()
            path = os.path.join(out_dir, f"{op}{suffix}_speedup_{device.replace(' ', '_')}.png")
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--out", default="bench/out", help="directory for report.md and the PNG plots")
    parser.add_argument("--skipped", default=None, help="JSON lines of skipped cases (DSATTN_BENCH_SKIPS)")
    parser.add_argument("--fidelity", default=None, help="fidelity.json from dsattn.fidelity")
    parser.add_argument("--env", default=None, help="env.json (versions) to head the report")
    parser.add_argument("--readme", default=None,
                        help="also write the summary table (baseline vs fastest dsattn provider) into this README's "
                             f"<!-- {README_BLOCK} --> block")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows, machine = load_rows([p for p in args.json if os.path.exists(p)])
    if not rows:
        print("no dsattn benchmarks found in", args.json)
        return 1
    fidelity = None
    if args.fidelity and os.path.exists(args.fidelity):
        with open(args.fidelity) as f:
            fidelity = json.load(f)
    table = report_markdown(with_ratios(rows), machine, skipped=load_skipped(args.skipped), fidelity=fidelity,
                            env_path=args.env)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(table)
    print(table)
    if args.readme:
        update_readme(args.readme, summary_markdown(with_ratios(rows), source=args.out, env_path=args.env))
        print("updated", args.readme)
    for path in plots(rows, args.out):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
