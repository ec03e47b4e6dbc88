"""pytest-benchmark JSON -> Markdown table + PNG plots. The logic lives in dsattn.bench_report (so that
`python -m dsattn bench` can use it from an installed wheel); this is the script entry point."""

import sys

from dsattn.bench_report import main

if __name__ == "__main__":
    sys.exit(main())
