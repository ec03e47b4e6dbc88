"""dsattn's command line: `python -m dsattn {info,demo,bench}`."""

import importlib
import sys

COMMANDS = {
    "info": ("dsattn.info", "versions, devices, usable backends, compiled archs"),
    "demo": ("dsattn.demo", "patch tiny DeepSeek models built from configs and compare against the originals"),
    "bench": ("dsattn.benchmark", "run the benchmarks that fit this machine and write the report"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m dsattn {" + ",".join(COMMANDS) + "} [options]")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:6s} {text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
