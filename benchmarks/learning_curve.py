"""Learning curve: the tuned model alone, by training rows and epochs, on one fixed evaluation set.

    python benchmarks/learning_curve.py 500x1 1000x1 500x2 2000x1 --out-dir /tmp/curve    # rows x epochs, in order
    python benchmarks/learning_curve.py 16x1 --dataset small.csv --model DIR --max-steps 2 --max-new-tokens 4 --out-dir /tmp/c

Each point is `finetune.py --subset ROWS --epochs E --no-compare` at the README's other defaults; then the tuned model
alone (`infer.py --run RUN --no-guard`) answers the same set for every point: the 138 held-out prompts and a balanced
sample of the full test split (5% of the bundled rows, stratified by intent, seed 42, minus instructions that Bitext
also has in the training split with another answer). Every run's training rows come from the full training split, so
none of them is in that set. One intent classifier (MiniLM + logistic regression on all the training split's answers)
scores every point, so the points differ only in their model. Results go to OUT_DIR/results.jsonl, one line a point,
appended as each finishes; a point whose run or answers exist is not trained or answered again.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

import data  # noqa: E402
import infer  # noqa: E402  (its scoring functions; the answers come from running infer.py itself)
from common import PLACEHOLDER, UserError, load_company, read_jsonl, read_prompts, run_main, write_jsonl  # noqa: E402

TEST_ROWS = 81  # 3 per intent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("points", nargs="+", help="ROWSxEPOCHS, e.g. 500x1 1000x1 500x2")
    p.add_argument("--out-dir", type=Path, required=True, help="runs, answers and results.jsonl go here")
    p.add_argument("--dataset", default="bundled", help="as finetune.py --dataset")
    p.add_argument("--model", default="auto", help="as finetune.py --model")
    p.add_argument("--max-steps", type=int, help="cap every run (smoke tests)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="as infer.py --max-new-tokens")
    args = p.parse_args(argv)
    try:
        args.points = [(int(rows), float(epochs)) for rows, epochs in (point.split("x") for point in args.points)]
    except ValueError:
        p.exit(2, "error: points look like 500x1 (rows x epochs)\n")
    return args


def evaluation_set(splits, folder):
    """The held-out prompts and a balanced sample of the test split no run trains on, written to FOLDER/eval_set.jsonl."""
    items = [dict(item, set="heldout") for item in read_prompts()]
    test = splits["test"][~splits["test"]["instruction"].isin(splits["train"]["instruction"])]
    items += [{"prompt": r.instruction, "expected_intent": r.intent, "reference": r.response, "type": "test_split", "set": "test"}
              for r in data.balanced_sample(test, TEST_ROWS, 42).itertuples()]
    write_jsonl(folder / "eval_set.jsonl", items)
    return items


def run_script(command, log):
    with open(log, "a") as out:
        out.write(f"$ {' '.join(map(str, command))}\n")
        out.flush()
        result = subprocess.run([sys.executable, *map(str, command)], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if result.returncode != 0:
        raise UserError(f"{command[0]} failed (exit {result.returncode}): see {log}")


def rate(records, metric):
    """One of infer.METRICS over the records it counts."""
    counts, value = infer.METRICS[metric]
    chosen = [value(r) for r in records if counts(r)]
    return {"rate": round(float(np.mean(chosen)), 3) if chosen else None, "n": len(chosen)}


def point_result(records, items, metrics):
    heldout = [r for r, i in zip(records, items) if i["set"] == "heldout"]
    test = [r for r, i in zip(records, items) if i["set"] == "test"]
    return {
        "train_rows": metrics["train_rows"], "steps": metrics["steps"], "train_runtime_s": metrics["train_runtime_s"],
        "tuned_val_loss": round(metrics["tuned_val_loss"], 4),
        "in_scope_declined_heldout": rate(heldout, "false_fallback_rate (lower is better)"),
        "in_scope_declined_test": rate(test, "false_fallback_rate (lower is better)"),
        "out_of_scope_declined": rate(heldout, "out_of_scope_fallback_rate"),
        "intent_heldout": rate(heldout, "intent_accuracy"),
        "intent_test": rate(test, "intent_accuracy"),
        "critical_failures": sum(bool(r["critical_failures"]) for r in records),
        "placeholder_validity": rate(records, "placeholder_validity"),
    }


def main():
    args = parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows, _ = data.load_rows(args.dataset)
    splits = data.split_by_intent(rows.drop_duplicates(["instruction", "response"]).reset_index(drop=True), 0.05, 0.05, 42)
    items = evaluation_set(splits, args.out_dir)
    classifier = infer.IntentClassifier(
        [{"response": r.response, "intent": r.intent} for r in splits["train"].itertuples()],
        [{"response": i["reference"], "intent": i["expected_intent"]} for i in items if i.get("reference")])
    inventory = {name for text in splits["train"]["response"] for name in PLACEHOLDER.findall(text)}
    company = load_company()
    for rows_wanted, epochs in args.points:
        name = f"{rows_wanted}x{epochs:g}"
        run, log, started = args.out_dir / name, args.out_dir / f"{name}.log", time.time()
        if not run.is_dir():
            run_script(["finetune.py", "--dataset", args.dataset, "--model", args.model, "--subset", rows_wanted,
                        "--epochs", f"{epochs:g}", "--no-compare", "--output-dir", run]
                       + (["--max-steps", args.max_steps] if args.max_steps else []), log)
        answers = run / "curve_answers.jsonl"
        if not answers.is_file():
            run_script(["infer.py", "--run", run, "--no-guard", "--prompts", args.out_dir / "eval_set.jsonl", "--out", answers,
                        "--max-new-tokens", args.max_new_tokens], log)
        records = infer.score(read_jsonl(answers), items, classifier, inventory, company)
        result = dict(rows=rows_wanted, epochs=epochs, wall_s=round(time.time() - started),
                      **point_result(records, items, json.loads((run / "metrics.json").read_text())))
        print(json.dumps(result), flush=True)
        with open(args.out_dir / "results.jsonl", "a") as out:
            out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    run_main(main)
