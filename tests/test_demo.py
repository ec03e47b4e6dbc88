"""`python -m dsattn demo` (README's demo command) at its quick size: both tables come out with each mode's
parameters, the backend that really ran and measured memory; the README shows the demo's real output."""

import os
import re

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from dsattn import _backend, _ext, demo  # noqa: E402

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def tables(text: str) -> list[dict]:
    """Every Markdown table in `text` as {"header": [...], "rows": [[...], ...]}."""
    found, current = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if current is None:
            current = {"header": cells, "rows": []}
            found.append(current)
        elif not set("".join(cells)) <= {"-", ":"}:
            current["rows"].append(dict(zip(current["header"], cells)))
    return found


@pytest.fixture(scope="module")
def quick_output():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        # one thread: on a shared 2-core runner two spinning OpenMP threads are several times slower
        assert demo.main(["--quick", "--threads", "1"]) == 0
    return out.getvalue()


def test_tables_have_parameters_backend_and_memory(quick_output):
    prefill, decode = tables(quick_output)
    assert prefill["header"] == demo.PREFILL_COLUMNS and decode["header"] == demo.DECODE_COLUMNS
    modes = {r["mode"]: r for r in prefill["rows"]}
    assert list(modes) == [label for _, label, _ in demo.PREFILL_PLAN]
    setup = demo.QUICK
    assert modes["sliding_window"]["parameters"] == f"window={setup['window']}"
    assert modes["sparse"]["parameters"].startswith(f"top_k={setup['long']['index_topk']}")
    assert modes["DSA (transformers)"]["parameters"] == f"index_topk={setup['long']['index_topk']}"
    # the attention that ran: transformers' own for the unpatched stacks, dsattn's ops (some backend) otherwise
    assert modes["dense (transformers)"]["backend that ran"] == "transformers sdpa"
    assert re.fullmatch(r"sliding_window_attention: (cpp|torch)", modes["sliding_window"]["backend that ran"])
    assert re.fullmatch(r"lightning_indexer_topk: (cpp|torch), sparse_attention: (cpp|torch)",
                        modes["sparse"]["backend that ran"]), modes["sparse"]["backend that ran"]
    quant = {r["mode"]: r for r in decode["rows"]}
    assert list(quant) == [label for label, _ in demo.DECODE_PLAN]
    assert quant["int4"]["parameters"].startswith("group_size=128 symmetric=False keep_first_last=False;")
    assert quant["int8"]["parameters"].startswith("group_size=None keep_first_last=False;")
    assert quant["fp32 (unpatched)"]["backend that ran"] == "torch (dense fp32 matmul)"
    # int4 names the compiled kernel whenever it is built (the old demo said "torch" while the C++ kernel ran)
    cpp = _backend.unusable_reason("cpp", torch.device("cpu"), "int4_matmul") is None
    assert quant["int4"]["backend that ran"] == ("int4_grouped_matmul: cpp, int4_matmul: cpp" if cpp else
                                        "int4_grouped_matmul: torch, int4_matmul: torch"), (quant, _ext.load_errors())
    assert re.fullmatch(r"int8_matmul: (cpp|torch)", quant["int8"]["backend that ran"])


def test_numbers_are_measured(quick_output):
    prefill, decode = tables(quick_output)
    seconds = [float(r["prefill s"]) for r in prefill["rows"]]
    assert all(s > 0 for s in seconds) and len(set(seconds)) > 1
    peaks = [r["peak MB"] for r in prefill["rows"]]
    if "n/a" not in peaks:  # /proc/self/clear_refs available: each mode's own peak, not one process-wide number
        assert len(set(peaks)) > 1, peaks
    dlogits = {r["mode"]: float(r["max abs dlogit"]) for r in prefill["rows"]}
    assert dlogits["dense (transformers)"] == 0 and dlogits["DSA (transformers)"] == 0
    assert dlogits["sliding_window"] > 1e-3  # the quick window (128) drops keys of the 512-token prompt
    weights = {r["mode"]: float(r["weights MB"]) for r in decode["rows"]}
    assert weights["int4"] < weights["int8"] < weights["fp32 (unpatched)"], weights
    assert all(float(r["decode tok/s"]) > 0 for r in decode["rows"])


def test_backend_column_follows_the_selection(monkeypatch):
    """The column is what dsattn's selection chose during the call: forcing the torch backend shows torch."""
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    setup = dict(demo.QUICK, prompt=4, new_tokens=1,
                 wide=dict(demo.QUICK["wide"], hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                           q_lora_rank=64, kv_lora_rank=32))
    rows = {r["mode"]: r for r in demo.decode_rows(setup, progress=lambda _: None)}
    assert rows["int4"]["backend"] == "int4_grouped_matmul: torch, int4_matmul: torch"
    assert rows["int8"]["backend"] == "int8_matmul: torch"


def test_readme_shows_the_demo_output():
    """The README's demo output block is the demo's own output format (both tables and the legend)."""
    text = open(README).read()
    match = re.search(r"<!-- demo-output -->\n```text\n(.*?)```\n<!-- /demo-output -->", text, re.S)
    assert match, "README.md has no demo-output block"
    block = match.group(1)
    prefill, decode = tables(block)
    assert prefill["header"] == demo.PREFILL_COLUMNS and decode["header"] == demo.DECODE_COLUMNS
    assert [r["mode"] for r in prefill["rows"]] == [label for _, label, _ in demo.PREFILL_PLAN]
    assert [r["mode"] for r in decode["rows"]] == [label for label, _ in demo.DECODE_PLAN]
    assert f"Prefill, {demo.FULL['context']} tokens" in block
    assert demo.LEGEND.strip().splitlines()[0] in block
