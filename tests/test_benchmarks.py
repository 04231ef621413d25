"""benchmarks/: every script end to end on the tiny random Llama, at the smallest sizes that still measure a step."""
import json

import data
import scope
from common import read_jsonl
from conftest import REPO, run_script

TRAIN_VARIANTS = ["unsloth", "unsloth-padded", "baseline", "unsloth-packing", "unsloth-no-gc"]


def test_train_bench_measures_every_variant(tiny_llama, tmp_path):
    out = tmp_path / "train.json"
    result = run_script("benchmarks/train_bench.py", "--model", tiny_llama, "--steps", 1, "--warmup-steps", 1,
                        "--rows", 8, "--grad-accum", 1, "--length-rows", 30, "--matmul-size", 128, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == TRAIN_VARIANTS
    for r in report["results"]:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0 and r["measured_steps"] == 1
        assert r["vs_baseline"]["tokens_per_s"] > 0 and 0 < r["mfu"]["fp32"]
    assert all(g > 0 for g in report["roofline_gflops"].values()) and report["mean_tokens_per_row"] > 50
    assert "× baseline tok/s" in report["markdown"] and "| baseline | " in result.stdout


def test_generate_bench_adapter_and_merged(tiny_llama, tmp_path):
    out = tmp_path / "generate.json"
    result = run_script("benchmarks/generate_bench.py", "--model", tiny_llama, "--limit", 2, "--batch-sizes", "1,2",
                        "--max-new-tokens", 3, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [(r["mode"], r["batch_size"]) for r in report["results"]] == [("adapter", 1), ("adapter", 2), ("merged", 1), ("merged", 2)]
    assert all(r["new_tokens_per_s"] > 0 and r["vs_batch_1"] > 0 for r in report["results"])
    assert "× batch 1" in report["markdown"]


def test_learning_curve_scores_each_point_on_one_fixed_set(tiny_llama, small_csv, tmp_path):
    result = run_script("benchmarks/learning_curve.py", "16x1", "8x2", "--dataset", small_csv, "--model", tiny_llama,
                        "--max-steps", 2, "--max-new-tokens", 4, "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    points = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(p["rows"], p["epochs"], p["steps"]) for p in points] == [(16, 1.0, 2), (8, 2.0, 2)]
    for point in points:  # 138 held-out prompts (108 in scope, 30 out) and the 8 test rows of the 8 intents
        assert point["in_scope_declined_heldout"]["n"] == point["intent_heldout"]["n"] == 108
        assert point["out_of_scope_declined"]["n"] == 30 and point["intent_test"]["n"] == 8
        assert 0 <= point["intent_heldout"]["rate"] <= 1 and point["placeholder_validity"]["n"] == 146


def test_scope_probe_scores_the_guards_own_messages(tiny_run, tmp_path):
    out = tmp_path / "probe.json"
    result = run_script("benchmarks/scope_probe.py", "--run", tiny_run, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["signal"]: r for r in report["results"]}
    assert list(rows) == ["guard", "likelihood", "probe", "average"]
    # the same messages and decisions as finetune.py's own evaluation of the guard
    evaluation = json.loads((tiny_run / "guard.json").read_text())["evaluation"]
    assert {k: v for k, v in rows["guard"]["test"].items() if k != "auc"} == evaluation["test"]
    # at most 3% of in-scope val messages declined: the guard's threshold was chosen by cross-validation over train and
    # val, the others' on val
    for row in rows.values():
        assert row["val"]["in_scope_declined"] <= 0.03 and 0 <= row["test"]["auc"] <= 1
    assert "| the run's guard (MiniLM) |" in result.stdout


def test_guard_seeds_rebuilds_the_run_s_own_guard(tiny_run, tmp_path):
    out = tmp_path / "seeds.json"
    bad = run_script("benchmarks/guard_seeds.py", "--run", tmp_path, "prompts/blind20.jsonl", "--out", out)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "config.json" in bad.stderr and not out.exists()
    result = run_script("benchmarks/guard_seeds.py", "--run", tiny_run, "--seeds", "42", "prompts/blind20.jsonl", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())["files"]["prompts/blind20.jsonl"]
    # the run's seed (42) builds the run's guard again: the same decisions as its guard.json on every message
    guard = scope.ScopeGuard.load(tiny_run / "guard.json")
    items = read_jsonl(REPO / "prompts/blind20.jsonl")
    customers = [i["prompt"] for i in items if i["type"] not in data.DECLINED_TYPES]
    others = [i["prompt"] for i in items if i["type"] in data.DECLINED_TYPES]
    declined = [m for m, out_of_scope in zip(customers, guard.out_of_scope(customers)) if out_of_scope]
    assert figures["customers"]["n"] == len(customers) and figures["others"]["n"] == len(others)
    assert sorted(m for m, _ in figures["customers_declined"]) == sorted(declined)
    assert figures["others"]["declined"] == sum(guard.out_of_scope(others))
    assert "customers declined" in result.stdout
