"""`python -m dsattn bench`: run the benchmarks that fit this machine and write the report.

    python -m dsattn bench --out bench/out [--quick] [-k EXPR] [--fidelity-minutes 3] [--no-model]

Writes into --out: results.json (kernel benchmarks, pytest-benchmark), results_model.json (bench_model.py:
whole DeepSeek models, dense vs each patch mode), skipped.jsonl (cases skipped with a reason, e.g. out of
memory), report.md (median, ratio vs the PyTorch baseline, model table, skipped cases, fidelity), PNG plots,
env.json (versions, devices) and, unless --no-fidelity, fidelity.json / fidelity.md (dsattn.fidelity: a
trained tiny DeepSeek-V3, perplexity / KL / top-1 per mode). The kernel and model runs are separate pytest
sessions with their own timeouts, so one running out of time does not lose the other's JSON.
Benchmarks live in the checkout's bench/ folder, installed with the wheel as dsattn/bench (GPU-size cases run
only on a GPU); their dependencies are the extra dsattn[bench].
"""

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys

import torch

from dsattn import bench_report, info


BENCH_EXTRA = 'pip install "dsattn[bench]"'


def bench_dir() -> str:
    """The benchmark files: the checkout's bench/ (editable install) or the installed dsattn/bench (wheel)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (os.path.join(os.path.dirname(here), "bench"), os.path.join(here, "bench")):
        if os.path.isfile(os.path.join(path, "conftest.py")):
            return path
    raise SystemExit(f"dsattn bench: the benchmark files are missing from this installation ({here}); reinstall "
                     "dsattn (`pip install --no-build-isolation dsattn`, or `-e .` in a checkout)")


def check_dependencies() -> None:
    """The benchmarks run under pytest-benchmark and the report draws with matplotlib: name the extra to install
    when they are missing, instead of failing inside a child process."""
    import importlib.util

    missing = [name for name, module in (("pytest", "pytest"), ("pytest-benchmark", "pytest_benchmark"),
                                         ("matplotlib", "matplotlib"), ("transformers", "transformers"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"dsattn bench needs {', '.join(missing)}: {BENCH_EXTRA}")


MODEL_BENCH = "bench_model.py"


def run_benchmarks(out_dir: str, *, quick: bool, select: str | None, timeout_s: int, model: bool) -> str | None:
    """One pytest-benchmark session: the kernel files (model=False) or bench_model.py (model=True).
    Returns the JSON path, or None when the session failed or ran out of time (reported, not fatal)."""
    results = os.path.join(out_dir, "results_model.json" if model else "results.json")
    if os.path.exists(results):
        os.remove(results)
    target = os.path.join(bench_dir(), MODEL_BENCH) if model else bench_dir()
    args = [sys.executable, "-m", "pytest", target, "-q", "-p", "no:cacheprovider", f"--benchmark-json={results}"]
    if not model:
        args += [f"--ignore={os.path.join(bench_dir(), MODEL_BENCH)}"]
    if quick:
        args += ["--benchmark-min-rounds=3", "--benchmark-max-time=0.1", "--benchmark-warmup=off"]
    if select:
        args += ["-k", select]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter is not a benchmark
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["DSATTN_BENCH_SKIPS"] = os.path.abspath(os.path.join(out_dir, "skipped.jsonl"))
    if model:  # stop starting new cases well before the outer timeout, so that pytest still writes its JSON
        env.setdefault("DSATTN_BENCH_MODEL_BUDGET_S", str(max(10, int(timeout_s * 0.6))))
    what = "model" if model else "kernel"
    returncode = run_with_timeout(args, env, timeout_s, what)
    if returncode not in (0, 5) or not os.path.exists(results):
        print(f"dsattn bench: the {what} benchmark run failed (exit {returncode})")
        return results if os.path.exists(results) else None
    return results


def run_with_timeout(args, env, timeout_s: int, what: str) -> int:
    """Run pytest; past timeout_s interrupt it like Ctrl-C (pytest then ends the session and pytest-benchmark
    still writes the JSON of the cases that finished), and kill it only if that does not end it in 30 s."""
    proc = subprocess.Popen(args, env=env)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"dsattn bench: the {what} benchmarks ran past {timeout_s}s: interrupting (finished cases are kept)")
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsattn bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out", help="output directory")
    parser.add_argument("--quick", action="store_true", help="few rounds per benchmark (CI)")
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression to pick benchmarks")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds for the kernel benchmark run")
    parser.add_argument("--model-timeout", type=int, default=1800, help="seconds for the model benchmark run")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model benchmarks (bench_model.py)")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel benchmarks")
    parser.add_argument("--no-fidelity", action="store_true", help="skip the trained-model fidelity check")
    parser.add_argument("--fidelity-minutes", type=float, default=None,
                        help="training budget of the fidelity model (default 3; --quick without this option: "
                             "the seconds-long quick model)")
    parser.add_argument("--fidelity-threads", type=int, default=None, help="torch threads for the fidelity run")
    args = parser.parse_args(argv)
    check_dependencies()
    bench_dir()

    os.makedirs(args.out, exist_ok=True)
    env = info.collect()
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env_path = os.path.join(args.out, "env.json")
    with open(env_path, "w") as f:
        json.dump(env, f, indent=2, default=str)
    skipped = os.path.join(args.out, "skipped.jsonl")
    if os.path.exists(skipped):
        os.remove(skipped)

    results = []
    if not args.no_kernels:
        results.append(run_benchmarks(args.out, quick=args.quick, select=args.select, timeout_s=args.timeout,
                                      model=False))
    if not args.no_model:
        results.append(run_benchmarks(args.out, quick=args.quick, select=args.select, timeout_s=args.model_timeout,
                                      model=True))
    results = [r for r in results if r]

    if not results:
        print("dsattn bench: no benchmark results to report")
        return 1
    report_args = results + ["--out", args.out, "--skipped", skipped, "--env", env_path]
    report = bench_report.main(report_args)  # written now, so that a fidelity run cut short loses nothing

    if not args.no_fidelity:
        from dsattn import fidelity

        quick = args.quick and args.fidelity_minutes is None
        fidelity.run(minutes=args.fidelity_minutes or 3.0, out_dir=args.out, quick=quick, threads=args.fidelity_threads,
                     device="cuda" if torch.cuda.is_available() else "cpu")
        report = bench_report.main(report_args + ["--fidelity", os.path.join(args.out, "fidelity.json")])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"dsattn bench: wrote {args.out} ({device}, torch {torch.__version__})")
    return report


if __name__ == "__main__":
    sys.exit(main())
