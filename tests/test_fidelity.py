"""The trained-model fidelity check (dsattn.fidelity) end to end at its quick size: it trains, every mode is
reported, and the exact facts hold (unpatch restores dense bit for bit; a window covering the context is dense)."""

import json
import math

import pytest

pytest.importorskip("transformers")

from dsattn import fidelity  # noqa: E402


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity")
    # one thread: the model is tiny, and two OpenMP threads on a shared 2-core runner spin (3x slower, measured)
    result = fidelity.run(quick=True, out_dir=str(out), cache_root=str(out / "cache"), threads=1)
    return result, out


def test_writes_json_and_markdown_with_every_mode(quick_result):
    result, out = quick_result
    on_disk = json.loads((out / "fidelity.json").read_text())
    table = (out / "fidelity.md").read_text()
    context = result["eval"]["context"]
    expected = list(fidelity.modes(context))
    assert list(on_disk["eval"]["rows"]) == expected
    for label in expected:
        assert f"| {label}" in table, (label, table)
    for row in result["eval"]["rows"].values():
        assert set(row) >= {"perplexity", "kl_mean", "kl_max", "top1_agreement"}
        assert math.isfinite(row["perplexity"]) and 0 <= row["top1_agreement"] <= 1 and row["kl_mean"] >= 0


def test_the_model_learned_something(quick_result):
    result, _ = quick_result
    training = result["training"]
    assert training["steps_done"] == training["steps_planned"] and training["cache"] == "written"
    assert training["final_loss"] < training["first_loss"] - 1.0, training
    dense = result["eval"]["rows"]["dense"]["perplexity"]
    assert math.isfinite(dense) and dense < fidelity.VOCAB / 4, dense  # uniform over the vocab would be 257


def test_exact_facts(quick_result):
    result, _ = quick_result
    ev = result["eval"]
    rows, context = ev["rows"], ev["context"]
    assert ev["unpatch_restores_dense"] and ev["unpatch_max_abs_diff"] == 0.0
    dense = rows["dense"]
    assert dense["kl_mean"] == 0.0 and dense["top1_agreement"] == 1.0
    full_window = rows[f"sliding_window w={context} (w>=S)"]
    assert full_window["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-6)
    assert full_window["kl_max"] < 1e-8 and full_window["top1_agreement"] == 1.0


def test_approximate_modes_really_change_the_model(quick_result):
    result, _ = quick_result
    rows = result["eval"]["rows"]
    for label, row in rows.items():
        if label == "dense" or "w>=S" in label:
            continue
        # the patch took effect (int8 per channel is close to fp32: KL ~2e-7 at the quick size, so only > 0)
        floor = (0.0, 0.0) if label.startswith("int8") else (1e-7, 1e-5)
        assert row["kl_mean"] > floor[0] and row["max_abs_dlogits"] > floor[1], (label, row)
    for label in ("int4 g128 asym", "int4 g128 sym"):
        assert rows[label]["quantized_fraction"] == 1.0
        assert rows[label]["kl_mean"] < 0.05 and rows[label]["top1_agreement"] > 0.9, rows[label]
    int8 = rows["int8 per-channel"]
    # every decoder linear but not the fused MoE experts (int8 has no experts module); 8 bits: closer than int4
    assert 0.2 < int8["quantized_fraction"] < 1.0, int8
    assert int8["kl_mean"] < min(rows["int4 g128 asym"]["kl_mean"], rows["int4 g128 sym"]["kl_mean"]), int8
    assert int8["top1_agreement"] > 0.97, int8


def test_cached_model_is_reused(quick_result, tmp_path):
    result, out = quick_result
    again = fidelity.run(quick=True, out_dir=str(tmp_path), cache_root=str(out / "cache"), threads=1)
    assert again["training"]["cache"] == "reused"
    assert again["eval"]["rows"]["dense"]["perplexity"] == result["eval"]["rows"]["dense"]["perplexity"]


# ------------------------------------------------------------------------------------ recovery (issue 15 item 3)

APPROXIMATE = ("sliding_window ", "topk ", "linear ", "hybrid ", "indexer ", "int4 ")
TINY_BUDGET = dict(batch=2, distill=2, transfer=2, finetune=2, warmup=2, sparse=2, qat=2)


@pytest.fixture(scope="module")
def recovered(quick_result, tmp_path_factory):
    _, trained = quick_result  # the same cached model
    out = tmp_path_factory.mktemp("recovered")
    result = fidelity.run(quick=True, out_dir=str(out), cache_root=str(trained / "cache"), threads=1, recover=True,
                          recover_budget=TINY_BUDGET)
    return result, out


def test_recovery_writes_both_columns_for_every_approximate_row(recovered):
    result, out = recovered
    on_disk = json.loads((out / "fidelity.json").read_text())
    table = (out / "fidelity.md").read_text()
    rows = on_disk["eval"]["rows"]
    assert result["training"]["cache"] == "reused"
    labels = [label for label in rows if label.startswith(APPROXIMATE)]
    assert {prefix for prefix in APPROXIMATE if any(label.startswith(prefix) for label in labels)} == \
        set(APPROXIMATE), list(rows)
    assert "recovered perplexity" in table.splitlines()[2]
    for label in labels:
        row = rows[label]
        assert math.isfinite(row["perplexity"]) and math.isfinite(row["recovered_perplexity"]), (label, row)
        assert row["recovery_seconds"] >= 0 and row["recovery_cpu_seconds"] >= 0, (label, row)
        if "w>=S" in label:  # exact: nothing to recover
            assert row["recovery_steps"] == 0 and row["recovered_perplexity"] == row["perplexity"]
            continue
        # each recipe ran its whole budget (two stages for linearize and DSA-from-dense)
        stages = 2 if label.startswith(("linear ", "hybrid ", "indexer ")) else 1
        assert row["recovery_steps"] == 2 * stages, (label, row)
        line = next(line for line in table.splitlines() if line.startswith(f"| {label}"))
        assert f"{row['recovered_perplexity']:.3f}" in line and row["recovery"]["recipe"] in line, line
    # learned feature maps + LoRA: even 2 + 2 steps recover much of what the fixed elu map costs
    for label in labels:
        if label.startswith(("linear ", "hybrid ")):
            assert rows[label]["recovered_perplexity"] < rows[label]["perplexity"], (label, rows[label])


def test_recovery_goals_table(recovered):
    result, out = recovered
    table = (out / "fidelity.md").read_text()
    goals = result["recovery"]["goals"]
    assert sorted(g["goal"] for g in goals) == [1.005, 1.005, 1.01, 1.01, 1.05, 1.15], goals
    dense = result["eval"]["rows"]["dense"]["perplexity"]
    assert "| goal (issue 15) | before | after recovery | goal | met | after vs dense + same training |" in table
    # the fair baseline: the dense model given as many extra steps on the same batches (LM loss)
    trained = result["eval"]["dense_same_training"]
    assert trained["steps"] == fidelity.recovery_steps(TINY_BUDGET) == 4 and math.isfinite(trained["perplexity"])
    assert trained["perplexity"] != dense  # it trained
    assert any(line.startswith("| dense + same training ") and f"{trained['perplexity']:.3f}" in line
               for line in table.splitlines()), table
    for g in goals:
        row = result["eval"]["rows"][g["label"]]
        assert g["ratio_after"] == pytest.approx(row["recovered_perplexity"] / dense)
        assert g["ratio_after_vs_trained_dense"] == pytest.approx(row["recovered_perplexity"] / trained["perplexity"])
        assert g["met"] == (g["ratio_after"] <= g["goal"])
        assert g["met_vs_trained_dense"] == (g["ratio_after_vs_trained_dense"] <= g["goal"])
        fair = "| met |" if g["met_vs_trained_dense"] else "| not met |"
        assert any(line.startswith(f"| {g['label']} |") and line.endswith(fair) and
                   ("| met |" if g["met"] else "| not met |") in line for line in table.splitlines()), (g, table)


def test_recovered_rows_are_held_out_evaluations(quick_result, tmp_path):
    """With a zero budget every recipe whose start is the plain patch gives back exactly the perplexity column:
    the recovered column is scored on the same held-out windows (not on the recovery batches, which come from
    the train split)."""
    _, trained = quick_result
    budget = dict(TINY_BUDGET, distill=0, transfer=0, finetune=0, warmup=0, sparse=0, qat=0)
    result = fidelity.run(quick=True, cache_root=str(trained / "cache"), threads=1, recover=True,
                          recover_budget=budget)
    assert result["recovery"]["data"] == "random windows of the train split"
    for label, row in result["eval"]["rows"].items():
        # linear/hybrid recover with learned feature maps: a different map than the row's fixed one even untrained
        if label.startswith(APPROXIMATE) and not label.startswith(("linear ", "hybrid ")):
            assert row["recovery_steps"] == 0, (label, row)
            assert row["recovered_perplexity"] == pytest.approx(row["perplexity"], rel=1e-6), (label, row)
    # and the recovery batches never hold a held-out window
    train_ids, held_out, _ = fidelity.corpus()
    context = result["eval"]["context"]
    held = {tuple(w.tolist()) for w in fidelity.eval_windows(held_out, context, 8)}
    batches = fidelity.recovery_batches(train_ids, context=context, batch=2, count=4)
    assert not held & {tuple(w.tolist()) for b in batches for w in b}
