"""Generation speed: batch 1 against batched, LoRA adapter (unmerged PeftModel) against merged weights.

    python benchmarks/generate_bench.py --run runs/smollm2 --out benchmarks/results/generate_cpu.json
    python benchmarks/generate_bench.py --run runs/smollm2 --batch-sizes 1,8,16 --limit 16 --max-new-tokens 128
    # smoke test without a trained run: any base model plus a fresh (untrained) LoRA of finetune.py's shape
    python benchmarks/generate_bench.py --model DIR --limit 2 --batch-sizes 1,2 --max-new-tokens 4 --out /tmp/g.json

The model is loaded as infer.py loads it (fp32 base on a CPU, 4-bit NF4 on a GPU, adapter on top) and answers the
held-out prompts with models.generate (greedy, fixed --max-new-tokens, batched by prompt length). New tokens count up
to and including each row's end-of-turn token, so a batch that keeps generating for its longest row gets no credit for
the padding rows. Then the base is loaded again in 16/32 bits (never 4-bit: models.merge_adapter), the adapter is
merged into it, as finetune.py --export merged does, and the same prompts run again.
"""
import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import training  # noqa: E402
from common import HELDOUT_FILE, read_prompts, read_system_prompt, run_main, write_json  # noqa: E402
from models import generate, load_for_inference, merge_adapter  # noqa: E402

WARMUP_TOKENS = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--run", type=Path, help="a finetune.py output dir (base model + adapter)")
    model.add_argument("--model", help="a base model with a fresh untrained LoRA (for smoke tests)")
    p.add_argument("--prompts", type=Path, default=HELDOUT_FILE)
    p.add_argument("--limit", type=int, default=16, help="first N prompts (every batch size answers the same ones)")
    p.add_argument("--batch-sizes", default="1,8,16")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/generate.json"))
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        p.exit(2, "error: --batch-sizes takes a comma list of numbers, like 1,8,16\n")
    if min(args.batch_sizes) < 1 or args.limit < 1 or args.max_new_tokens < 1:
        p.exit(2, "error: --batch-sizes, --limit and --max-new-tokens must be >= 1\n")
    return args


def load_adapter_model(args, base_in_4bit=None):
    """The PeftModel with an unmerged adapter, as `infer.py --run` serves it, or a base model with a fresh LoRA."""
    if args.run:
        model, tokenizer, _ = load_for_inference(run=args.run, base_in_4bit=base_in_4bit)
        return model, tokenizer
    from peft import LoraConfig, get_peft_model

    model, tokenizer, _ = load_for_inference(base_only=True, model=args.model, base_in_4bit=base_in_4bit)
    lora = training.lora_settings(training.RunSettings(model=args.model))
    return get_peft_model(model, LoraConfig(**lora, task_type="CAUSAL_LM")), tokenizer


def measure(model, tokenizer, prompts, system_prompt, args, mode):
    generate(model, tokenizer, prompts[:1], system_prompt, WARMUP_TOKENS, 1)  # first-call overheads
    rows = []
    for batch_size in args.batch_sizes:
        started = time.perf_counter()
        records = generate(model, tokenizer, prompts, system_prompt, args.max_new_tokens, batch_size)
        seconds = time.perf_counter() - started
        new_tokens = sum(r["new_tokens"] for r in records)
        rows.append({"mode": mode, "batch_size": batch_size, "prompts": len(records), "seconds": round(seconds, 2),
                     "new_tokens": new_tokens, "new_tokens_per_s": new_tokens / seconds,
                     "stopped_at_eos": sum(r["stopped_at_eos"] for r in records)})
        print(f"{mode} batch {batch_size}: {new_tokens / seconds:.1f} new tokens/s", flush=True)
    batch_one = next((r for r in rows if r["batch_size"] == 1), None)
    for r in rows:
        r["vs_batch_1"] = r["new_tokens_per_s"] / batch_one["new_tokens_per_s"] if batch_one else None
    return rows


def markdown(report):
    lines = ["| weights | batch | new tok/s | × batch 1 | × adapter | rows ended at EOS | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    adapter = {r["batch_size"]: r["new_tokens_per_s"] for r in report["results"] if r["mode"] == "adapter"}
    for r in report["results"]:
        ratio = f"{r['vs_batch_1']:.2f}" if r["vs_batch_1"] else "n/a"
        lines.append(f"| {r['mode']} | {r['batch_size']} | {r['new_tokens_per_s']:.1f} | {ratio} | "
                     f"{r['new_tokens_per_s'] / adapter[r['batch_size']]:.2f} | {r['stopped_at_eos']}/{r['prompts']} | {r['seconds']} |")
    return "\n".join([f"Model `{report['model']}` on {report['device']} ({report['threads']} threads), "
                      f"{report['prompts']} held-out prompts, greedy, max {report['max_new_tokens']} new tokens.", "", *lines])


def main():
    args = parse_args()
    import torch

    prompts = [item["prompt"] for item in read_prompts(args.prompts, args.limit)]
    system_prompt = read_system_prompt()
    report = {"model": str(args.run or args.model), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "threads": torch.get_num_threads(), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "results": []}
    model, tokenizer = load_adapter_model(args)
    for mode in ("adapter", "merged"):
        if mode == "merged":
            del model
            model = merge_adapter(load_adapter_model(args, base_in_4bit=False)[0])  # plain 16/32-bit linear layers again
        report["results"] += measure(model, tokenizer, prompts, system_prompt, args, mode)
        report["markdown"] = markdown(report)
        write_json(args.out, report)  # after each leg: a benchmark stopped at its time limit keeps what it measured
    print(report["markdown"])
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    run_main(main)
