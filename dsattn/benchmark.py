"""`python -m dsattn bench`: run the benchmarks that fit this machine and write the report.

    python -m dsattn bench --out bench/out [--quick] [-k EXPR] [--fidelity-minutes 3]

Writes into --out: results.json (pytest-benchmark), report.md (median, ratio vs the PyTorch baseline),
PNG plots, env.json (versions, devices) and, unless --no-fidelity, the trained-model fidelity report.
Kernel benchmarks live in the checkout's bench/ folder (GPU-size cases run only on a GPU).
"""

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

from dsattn import bench_report, info


def bench_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "bench")
    if not os.path.isfile(os.path.join(path, "conftest.py")):
        raise SystemExit(
            f"dsattn bench: no bench/ folder next to the package ({path}); run it from a source checkout "
            "installed with `pip install --no-build-isolation -e .`"
        )
    return path


def run_kernel_benchmarks(out_dir: str, *, quick: bool, select: str | None, timeout_s: int) -> str:
    results = os.path.join(out_dir, "results.json")
    args = [sys.executable, "-m", "pytest", bench_dir(), "-q", "-p", "no:cacheprovider", f"--benchmark-json={results}"]
    if quick:
        args += ["--benchmark-min-rounds=3", "--benchmark-max-time=0.1", "--benchmark-warmup=off"]
    if select:
        args += ["-k", select]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter is not a benchmark
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(args, env=env, timeout=timeout_s)
    if proc.returncode not in (0, 5) or not os.path.exists(results):
        raise SystemExit(f"dsattn bench: the benchmark run failed (exit {proc.returncode})")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsattn bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out", help="output directory")
    parser.add_argument("--quick", action="store_true", help="few rounds per benchmark (CI)")
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression to pick benchmarks")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds for the kernel benchmark run")
    parser.add_argument("--no-fidelity", action="store_true", help="skip the trained-model fidelity check")
    parser.add_argument("--fidelity-minutes", type=float, default=3.0, help="training budget for the fidelity model")
    args = parser.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    env = info.collect()
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(os.path.join(args.out, "env.json"), "w") as f:
        json.dump(env, f, indent=2, default=str)

    results = run_kernel_benchmarks(args.out, quick=args.quick, select=args.select, timeout_s=args.timeout)
    report = bench_report.main([results, "--out", args.out])

    if not args.no_fidelity:
        from dsattn import fidelity

        fidelity.run(minutes=args.fidelity_minutes, out_dir=args.out, quick=args.quick)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"dsattn bench: wrote {args.out} ({device}, torch {torch.__version__})")
    return report


if __name__ == "__main__":
    sys.exit(main())
