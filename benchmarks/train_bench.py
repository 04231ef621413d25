"""Training speed and memory of finetune.py's QLoRA path against a plain transformers + peft baseline.

    # CPU (SmolLM2-135M, real Bitext rows); pin it and give it the free cores:
    python benchmarks/train_bench.py --out benchmarks/results/train_cpu.json
    # GPU (Llama-3.2-3B shape, random weights, real tokenizer and Bitext lengths); --t4-memory caps it at 15 GB:
    python benchmarks/train_bench.py --gpu --out benchmarks/results/train_gpu.json
    python benchmarks/train_bench.py --gpu --t4-memory --out benchmarks/results/train_gpu_t4mem.json
    # smoke test on any small model directory:
    python benchmarks/train_bench.py --model DIR --steps 1 --warmup-steps 1 --rows 8 --length-rows 50 --matmul-size 256 --out /tmp/t.json

Every variant runs in its own subprocess of this script (`--variant NAME`), because Unsloth patches transformers
when it is imported and the baseline must run unpatched, and because peak RSS is per process. Variants:

    unsloth               finetune.py's own path: Unsloth 4-bit QLoRA, Unsloth gradient checkpointing, and on a GPU
                          padding-free micro-batches (TRL's collator flattens each into one row; Unsloth keeps the
                          examples apart); Unsloth's CPU fallback pads them
    unsloth-padded        the same with padded micro-batches
    baseline              AutoModelForCausalLM + BitsAndBytesConfig(nf4) + peft get_peft_model, HF gradient checkpointing,
                          padded micro-batches
    unsloth-packing       TRL packing=True (best-fit-decreasing packs examples into max-length rows)
    unsloth-no-gc         no gradient checkpointing

All share the data, LoRA settings, optimizer, batch size, sequence length and seed (data.py and training.py).
Step time is the median over the steps after --warmup-steps; tokens/s is the measured steps' tokens over their time.
Model FLOP utilisation (MFU) = 6 * N * tokens/s / matmul peak, with N the base model's parameter count (4-bit
weights counted unpacked) and tokens the non-pad tokens; the peak is measured here with large square matmuls.
"""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402  (needs the repo on sys.path; none of these imports an ML library at module level)
import training  # noqa: E402
from common import UserError, building, read_system_prompt, run_main, write_json  # noqa: E402
from models import CACHE_DIR, compute_dtype, has_cuda, load_model, load_tokenizer, resolve_model  # noqa: E402

VARIANTS = {  # padding_free None: finetune.py's choice (on with a GPU)
    "unsloth": {"loader": "unsloth", "checkpointing": "unsloth", "padding_free": None},
    "unsloth-padded": {"loader": "unsloth", "checkpointing": "unsloth", "padding_free": False},
    "baseline": {"loader": "peft", "checkpointing": True, "padding_free": False},
    "unsloth-packing": {"loader": "unsloth", "checkpointing": "unsloth", "padding_free": False,
                        # packing happens in TRL's dataset preparation, which finetune.py skips
                        "config": {"packing": True, "dataset_kwargs": {"skip_prepare_dataset": False}}},
    "unsloth-no-gc": {"loader": "unsloth", "checkpointing": False, "padding_free": None},
}
BASELINE = "baseline"
BITEXT_ROWS = 26_872  # the full hub dataset; the bundled copy holds 5,398 of them
SHAPE_CONFIG = REPO.parent / "shared" / "models" / "llama-3.2-3b-instruct-shape" / "config.json"
SHAPE_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "llama-3.2-instruct"
T4_MEMORY_GB = 15
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}  # big enough to reach the peak; --matmul-size overrides
MATMUL_REPEATS = 5
MATMUL_SLOW_S = 5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: smollm2 on CPU, the --shape-config model with random weights on GPU")
    p.add_argument("--gpu", action="store_true", help="GPU mode (automatic when CUDA is available)")
    p.add_argument("--shape-config", type=Path, default=SHAPE_CONFIG, help="architecture for the GPU model")
    p.add_argument("--shape-tokenizer", type=Path, default=SHAPE_TOKENIZER)
    p.add_argument("--t4-memory", action="store_true", help=f"cap GPU memory at {T4_MEMORY_GB} GB, like a T4")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    p.add_argument("--steps", type=int, default=5, help="measured optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=1, help="optimizer steps run before measuring")
    p.add_argument("--batch-size", default="auto", help="rows per micro-batch (auto: finetune.py's choice for this device)")
    p.add_argument("--grad-accum", type=int, help=f"default: finetune.py's ({training.ROWS_PER_STEP} rows per step)")
    p.add_argument("--max-seq-length", type=int, default=1024)
    p.add_argument("--rows", type=int, default=512, help="Bitext rows to train on (the trainer cycles through them)")
    p.add_argument("--length-rows", type=int, help="rows for the mean example length (default: all bundled rows)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--matmul-size", type=int,
                   help=f"roofline matmul size (default {MATMUL_SIZE['cpu']} on CPU, {MATMUL_SIZE['cuda']} on GPU)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/train.json"))
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # internal: run one variant
    p.add_argument("--variant-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        p.exit(2, f"error: unknown variant {unknown[0] if unknown else '(none)'}: choose from {', '.join(VARIANTS)}\n")
    if args.batch_size != "auto" and not (args.batch_size.isdigit() and int(args.batch_size) >= 1):
        p.exit(2, f"error: --batch-size takes auto or a number >= 1 (got {args.batch_size!r})\n")
    if min(args.steps, args.grad_accum or 1, args.rows) < 1 or args.warmup_steps < 0:
        p.exit(2, "error: --steps, --grad-accum and --rows must be >= 1, --warmup-steps >= 0\n")
    return args


# ----------------------------------------------------------------------------------------------------
# Data: real Bitext rows, encoded exactly as finetune.py encodes them


def bundled_rows():
    rows, _ = data.load_rows("bundled")
    return rows.drop_duplicates(["instruction", "response"]).reset_index(drop=True)  # as finetune.py does


def bench_dataset(tokenizer, args):
    rows = data.stratified_sample(bundled_rows(), args.rows, args.seed)
    dataset, _ = data.encode_split(tokenizer, read_system_prompt(), rows, args.max_seq_length)
    return dataset


def mean_row_tokens(model, args):
    """Mean tokens of a rendered example (system + user + answer) over the bundled rows, with the model's tokenizer."""
    tokenizer = load_tokenizer(model)
    rows = bundled_rows()
    if args.length_rows:
        rows = data.stratified_sample(rows, args.length_rows, args.seed)
    system_prompt = read_system_prompt()
    lengths = [len(data.encode_example(tokenizer, system_prompt, r.instruction, r.response)["input_ids"])
               for r in rows.itertuples()]
    return sum(lengths) / len(lengths), len(lengths)


# ----------------------------------------------------------------------------------------------------
# One variant (runs in its own process)


def run_settings(args, cuda):
    """finetune.py's own defaults (learning rate, optimizer, LoRA, logging) with the benchmark's sizes."""
    settings = training.RunSettings(model=args.model, batch_size=args.batch_size, grad_accum=args.grad_accum,
                                    max_seq_length=args.max_seq_length, max_steps=args.warmup_steps + args.steps, seed=args.seed)
    return training.resolve_auto(settings, cuda, gpu_memory_bytes=T4_MEMORY_GB * 2**30 if args.t4_memory else None)


def load_peft_baseline(settings, cuda):
    """The textbook QLoRA recipe: bitsandbytes NF4 via transformers, peft LoRA, HF gradient checkpointing."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype()  # the dtype the Unsloth variants load in, so both sides compute alike
    tokenizer = load_tokenizer(settings.model)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(settings.model), quantization_config=quantization, dtype=dtype,
                                                 device_map={"": 0} if cuda else None)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input with grad
    model = get_peft_model(model, LoraConfig(**training.lora_settings(settings), task_type="CAUSAL_LM"))
    return model, tokenizer, dtype == torch.bfloat16 and cuda


def eager_log_prob():
    """TRL's fused LM-head loss runs a Triton kernel that has no CPU driver; this is the same maths in eager PyTorch.

    It materialises the full logits, as transformers' own causal-LM loss does. Unsloth swaps in its own kernel instead.
    """
    import torch

    class EagerLogProb:
        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, _chunk_size, softcapping=None, logit_scale=1.0, outputs=()):
            logits = torch.nn.functional.linear(hidden, weight, bias).float() * logit_scale
            if softcapping:
                logits = softcapping * torch.tanh(logits / softcapping)
            log_probs = (logits / temperature).log_softmax(-1)
            target = log_probs.gather(-1, targets[:, None]).squeeze(-1)
            with torch.no_grad():  # logged metrics only
                entropy = -(log_probs.exp() * log_probs).sum(-1) if "entropy" in outputs else None
                is_top1 = logits.argmax(-1) == targets if "is_top1" in outputs else None
            return target, entropy, None, None, is_top1

    return EagerLogProb


def base_parameter_count(model):
    """Parameters of the base model, LoRA excluded; bitsandbytes packs two 4-bit weights a byte, so use their shape."""
    total = 0
    for name, param in model.named_parameters():
        if "lora_" not in name:
            shape = getattr(getattr(param, "quant_state", None), "shape", None)
            total += math.prod(shape) if shape is not None else param.numel()
    return total


class TokenCounter:
    """Wraps the trainer's collator and records what each micro-batch holds."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, examples):
        batch = self.collate(examples)
        ids = batch["input_ids"]
        # Padded batches carry an attention mask; TRL's padding-free batches are one row without padding.
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else ids.numel()
        self.batches.append({"tokens": real, "padded_tokens": ids.numel(), "loss_tokens": int((batch["labels"] != -100).sum())})
        return batch


def step_timer(cuda):
    """A callback that stamps the start of training and the end of every optimizer step."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks = []

        def stamp(self):
            if cuda:
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

        def on_train_begin(self, *_, **__):
            self.marks.clear()
            self.stamp()

        def on_step_end(self, *_, **__):
            self.stamp()

    return StepTimer()


def run_variant(args):
    import torch

    spec, cuda = VARIANTS[args.variant], has_cuda()
    if cuda and args.t4_memory:
        torch.cuda.set_per_process_memory_fraction(T4_MEMORY_GB * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    settings = run_settings(args, cuda)
    if spec["loader"] == "unsloth":
        model, tokenizer, _ = load_model(args.model, args.max_seq_length)  # imports Unsloth first, as finetune.py does
        model = training.add_lora(model, settings, gradient_checkpointing=spec["checkpointing"])
        native_bf16 = compute_dtype() == torch.bfloat16
    else:
        model, tokenizer, native_bf16 = load_peft_baseline(settings, cuda)
        if not cuda:
            import trl.trainer.utils

            trl.trainer.utils._ChunkedLogProbFunction = eager_log_prob()
    dataset = bench_dataset(tokenizer, args)
    timer = step_timer(cuda)
    with tempfile.TemporaryDirectory() as scratch:
        padding_free = cuda if spec["padding_free"] is None else spec["padding_free"]
        config = dict(spec.get("config", {}))
        if config.get("packing"):
            config["max_length"] = settings.max_seq_length  # the length packed rows are filled to
        trainer = training.build_trainer(settings, model, tokenizer, dataset, None, scratch, native_bf16, padding_free,
                                         callbacks=[timer], save_strategy="no", **config)
        # Unsloth may switch padding_free / packing off (its CPU fallback always does): record what ran.
        requested = {"padding_free": padding_free, "packing": config.get("packing", False)}
        effective = {key: getattr(trainer.args, key) for key in requested}
        counter = TokenCounter(trainer.data_collator)
        trainer.data_collator = counter
        trainer.train()
    durations = [b - a for a, b in zip(timer.marks, timer.marks[1:])][args.warmup_steps:]
    accum = settings.grad_accum
    per_step = [counter.batches[i * accum:(i + 1) * accum] for i in range(args.warmup_steps, args.warmup_steps + len(durations))]
    seconds = sum(durations)
    totals = {key: sum(b[key] for step in per_step for b in step) for key in ("tokens", "padded_tokens", "loss_tokens")}
    return {
        "variant": args.variant, "status": "ok", "model": resolve_model(args.model),
        "batch_size": settings.batch_size, "grad_accum": settings.grad_accum, "requested": requested, "effective": effective,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "threads": torch.get_num_threads(),
        "compute_dtype": str(next(p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad
                                  and getattr(p, "quant_state", None) is None)).replace("torch.", ""),
        "base_parameters": base_parameter_count(model),
        "measured_steps": len(durations),
        "step_time_s_median": sorted(durations)[len(durations) // 2] if durations else None,
        "step_times_s": [round(d, 4) for d in durations],
        "tokens_per_step": totals["tokens"] / max(1, len(durations)),
        "tokens_per_s": totals["tokens"] / seconds if seconds else None,
        "padded_tokens_per_s": totals["padded_tokens"] / seconds if seconds else None,
        "loss_tokens_per_s": totals["loss_tokens"] / seconds if seconds else None,
        "peak_memory_gb": training.peak_memory_gb(cuda),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (getrusage)",
    }


def run_in_subprocess(name, model, out_dir):
    out = out_dir / f"{name}.json"
    command = [sys.executable, __file__, *sys.argv[1:], "--model", str(model), "--variant", name, "--variant-out", str(out)]
    started = time.time()
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    (out_dir / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not out.is_file():
        lines = [l for l in done.stderr.splitlines() if l.strip()] or ["(no output)"]
        errors = [l for l in lines if re.match(r"[\w.]+(Error|Exception)\b", l)]  # not the progress bars
        return {"variant": name, "status": "failed", "error": (errors or lines)[-1][:300], "log": str(out_dir / f"{name}.log")}
    return dict(json.loads(out.read_text()), wall_s=round(time.time() - started, 1))


# ----------------------------------------------------------------------------------------------------
# Matmul roofline and the random-weight GPU model


def matmul_gflops(dtype, device, n):
    """Best achieved GFLOP/s of an n x n matmul (2 n^3 FLOPs)."""
    import torch

    def timed():
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    first = timed()  # warm-up; a dtype without a fast kernel (bf16 on some CPUs) takes minutes, so time it only once more
    best = min(timed() for _ in range(MATMUL_REPEATS if first < MATMUL_SLOW_S else 1))
    return 2 * n**3 / best / 1e9


def roofline(gpu, size):
    import torch

    # The CPU path trains in fp32 (no native bf16 there), so its fp32 peak is the relevant one.
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16} if gpu else {"bf16": torch.bfloat16, "fp32": torch.float32}
    device = "cuda" if gpu else "cpu"
    return {name: round(matmul_gflops(dtype, device, size or MATMUL_SIZE[device]), 1) for name, dtype in dtypes.items()}


def shape_model_dir(config_path, tokenizer_dir):
    """The architecture in config_path with random weights and the real tokenizer, saved once (same FLOPs per token)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    target = CACHE_DIR / "bench" / f"{config_path.parent.name}-random"
    if (target / "config.json").is_file():
        return target
    print(f"building {target} with random weights (once)", flush=True)
    torch.manual_seed(0)
    with torch.device("cuda" if has_cuda() else "cpu"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_path.parent), dtype=torch.bfloat16)
    with building(target) as partial:
        model.save_pretrained(partial)
        shutil.copytree(tokenizer_dir, partial, dirs_exist_ok=True)
    return target


# ----------------------------------------------------------------------------------------------------
# Report


def add_derived(results, peaks, mean_tokens):
    baseline = next((r for r in results if r["variant"] == BASELINE and r["status"] == "ok"), None)
    for r in results:
        if r["status"] != "ok" or not r["tokens_per_s"]:
            continue
        flops_per_s = 6 * r["base_parameters"] * r["tokens_per_s"]
        r["mfu"] = {dtype: flops_per_s / (gflops * 1e9) for dtype, gflops in peaks.items()}
        r["epoch_minutes"] = BITEXT_ROWS * mean_tokens / r["tokens_per_s"] / 60
        if baseline:
            r["vs_baseline"] = {"tokens_per_s": r["tokens_per_s"] / baseline["tokens_per_s"],
                                "step_time": r["step_time_s_median"] / baseline["step_time_s_median"],
                                "peak_memory": r["peak_memory_gb"] / baseline["peak_memory_gb"]}


def markdown(report):
    peaks = report["roofline_gflops"]
    head = ["variant", "step s (median)", "tok/s", "tok/s incl. pad", "× baseline tok/s", "peak mem GB",
            "× baseline mem", *(f"MFU vs {d}" for d in peaks), "epoch min"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    notes = []
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | failed: {r['error'].replace('|', '/')} |" + " |" * (len(head) - 2))
            continue
        ratio = r.get("vs_baseline", {})
        ignored = [key for key, value in r["requested"].items() if r["effective"][key] != value]
        if ignored:
            asked = ", ".join(f"{k}={r['requested'][k]}" for k in ignored)
            ran = ", ".join(f"{k}={r['effective'][k]}" for k in ignored)
            notes.append(f"{r['variant']}: asked for {asked}, the trainer ran with {ran} (Unsloth turned it off: its "
                         "CPU fallback always does; on a GPU its log in the variant's log file says why).")
        mode = " (padding-free)" if r["effective"]["padding_free"] else ""
        cells = [r["variant"] + mode + (" (ignored: see note)" if ignored else ""), f"{r['step_time_s_median']:.2f}",
                 f"{r['tokens_per_s']:.1f}", f"{r['padded_tokens_per_s']:.1f}",
                 f"{ratio['tokens_per_s']:.2f}" if ratio else "n/a", f"{r['peak_memory_gb']:.2f}",
                 f"{ratio['peak_memory']:.2f}" if ratio else "n/a",
                 *(f"{100 * r['mfu'][d]:.2f}%" for d in peaks), f"{r['epoch_minutes']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    s = report["settings"]
    return "\n".join([
        f"Model `{report['model']}` on {report['device']}, batch {s['batch_size']} × accumulation {s['grad_accum']} "
        f"(finetune.py's defaults unless given), "
        f"max length {s['max_seq_length']}, {s['steps']} measured steps after {s['warmup_steps']} warm-up steps.",
        f"Matmul peak (GFLOP/s): {', '.join(f'{d} {g}' for d, g in peaks.items())}. Mean example length "
        f"{report['mean_tokens_per_row']:.1f} tokens over {report['length_rows']} bundled rows; "
        f"epoch = {BITEXT_ROWS:,} rows. MFU = 6 × N ({report['base_parameters']:,}) × tok/s / peak.",
        "", *lines, *(["", *(f"- {n}" for n in notes)] if notes else [])])


def main():
    args = parse_args()
    if args.variant:
        write_json(args.variant_out, run_variant(args))
        return
    gpu = has_cuda()
    if args.gpu and not gpu:
        raise UserError("--gpu needs CUDA, and torch sees no GPU here: drop --gpu to benchmark the CPU path")
    model = args.model or (shape_model_dir(args.shape_config, args.shape_tokenizer) if gpu else "smollm2")
    peaks = roofline(gpu, args.matmul_size)
    print(f"matmul peak GFLOP/s: {peaks}", flush=True)
    mean_tokens, length_rows = mean_row_tokens(model, args)
    print(f"mean example length: {mean_tokens:.1f} tokens over {length_rows} rows", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_dir = args.out.with_suffix(".logs")
    log_dir.mkdir(exist_ok=True)
    results = []
    for name in args.variants:
        print(f"running {name} ...", flush=True)
        results.append(run_in_subprocess(name, model, log_dir))
        print(f"  {json.dumps({k: results[-1].get(k) for k in ('status', 'tokens_per_s', 'step_time_s_median', 'peak_memory_gb', 'error')})}", flush=True)
    add_derived(results, peaks, mean_tokens)
    ok = [r for r in results if r["status"] == "ok"]
    report = {
        "model": str(model), "device": ok[0]["device"] if ok else ("cuda" if gpu else "cpu"),
        "settings": dict({k: getattr(args, k) for k in ("steps", "warmup_steps", "max_seq_length", "rows", "seed", "t4_memory")},
                         batch_size=ok[0]["batch_size"] if ok else args.batch_size,
                         grad_accum=ok[0]["grad_accum"] if ok else args.grad_accum),
        "roofline_gflops": peaks, "mean_tokens_per_row": mean_tokens, "length_rows": length_rows,
        "base_parameters": ok[0]["base_parameters"] if ok else None,
        "mfu_formula": "6 * base_parameters * non-pad tokens/s / matmul peak FLOP/s",
        "results": results,
    }
    report["markdown"] = markdown(report)
    write_json(args.out, report)
    print(report["markdown"])
    print(f"\nwrote {args.out} (per-variant logs in {log_dir})")


if __name__ == "__main__":
    run_main(main)
