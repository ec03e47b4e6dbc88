"""The README's demo runs end to end, and its exact rows really are exact."""

import pytest

pytest.importorskip("transformers")

from dsattn import demo  # noqa: E402


def test_demo_table(capsys):
    assert demo.main(["--context", "48", "--new-tokens", "2"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("deepseek"):
            rows[(cells[0], cells[1])] = cells
    assert len(rows) == 15, rows.keys()
    assert float(rows[("deepseek_v3", "sliding_window (w>=S)")][2]) < 1e-4
    assert float(rows[("deepseek_v32", "sparse")][2]) < 1e-4  # V3.2 sparse vs its eager DSA path
    assert 0 < float(rows[("deepseek_v3", "int4 (g32)")][2]) < 5
    assert all(float(r[4]) > 0 for r in rows.values())
