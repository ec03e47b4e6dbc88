"""Turn pytest-benchmark JSON into a Markdown table (median, ratio vs the PyTorch baseline) and PNG plots.

    python bench/report.py results.json [more.json ...] --out DIR   (or python -m dsattn.bench_report)

Each benchmark carries extra_info from bench/conftest.py: op, provider, shape, device, dtype, baseline.
Rows are grouped by (op, shape); ratio = baseline median / provider median (> 1 means faster than PyTorch).
"""

import argparse
import json
import os
from collections import defaultdict


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
    by_op = defaultdict(list)
    for r in rows:
        by_op[(r["op"], r["device"])].append(r)
    for (op, device), op_rows in sorted(by_op.items()):
        key = _x_key(op_rows)
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
            name = f"{op}_{'time' if metric == 'median_ms' else 'memory'}_{device.replace(' ', '_')}.png"
            path = os.path.join(out_dir, name)
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--out", default="bench/out", help="directory for report.md and the PNG plots")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows, machine = load_rows(args.json)
    if not rows:
        print("no dsattn benchmarks found in", args.json)
        return 1
    table = markdown(with_ratios(rows), machine)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(table)
    print(table)
    for path in plots(rows, args.out):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
