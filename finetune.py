"""Fine-tune a chat LLM into a customer-support assistant on the Bitext dataset with Unsloth QLoRA.

    python finetune.py --subset 500                   # CPU: SmolLM2-135M-Instruct; GPU: Llama-3.2-3B-Instruct
    python finetune.py --inspect                      # data report (Markdown + plots), no training
    python finetune.py --subset 500 --dry-run         # check data and config, train nothing
    python finetune.py --subset 500 --resume          # continue an interrupted run from its last checkpoint
    python finetune.py --subset 500 --export merged,gguf         # then merged 16-bit weights, GGUF, Ollama Modelfile
    python finetune.py --from-run runs/smollm2 --export gguf     # export a finished run without training again
    python finetune.py --dataset my.csv --instruction-column question --response-column answer --intent-column label

Data: the Bitext hub dataset (default), a local CSV / Parquet / JSONL file, or `bundled` (5,398 verbatim rows
shipped in data/, used automatically when the hub can't be reached). Each row becomes system / user / assistant
messages rendered with the model's own chat template; the loss is on the assistant answer and its end token only.
"""
import argparse
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import export
import scope
from common import (
    PLACEHOLDER,
    PROMPTS_DIR,
    REPO,
    SYSTEM_PROMPT_FILE,
    CPU_DEFAULT_MODEL,
    UserError,
    chat_messages,
    compute_dtype,
    dtype_name,
    load_placeholder_table,
    concrete_model,
    has_cuda,
    load_model,
    load_tokenizer,
    read_system_prompt,
    render_chat,
    run_main,
    sha256_file,
    write_json,
)

HUB_DATASET = "bitext/Bitext-customer-support-llm-chatbot-training-dataset"
BUNDLED_DATA = REPO / "data" / "bitext_v11_bundled.csv.gz"
BUNDLED_LICENSE = REPO / "data" / "LICENSE_CDLA-Sharing-1.0.txt"
FALLBACK_FILE = PROMPTS_DIR / "fallback.jsonl"
IN_SCOPE_FILE = PROMPTS_DIR / "in_scope.jsonl"
# Unsloth's notebook rate for 1B-8B models; at 2e-4 the 65 steps of `--subset 500` left SmolLM2-135M undertrained
# (held-out intent accuracy +0.02 over base; 1e-3 gives +0.19 with --fallback-ratio 0.1, see README).
GPU_LEARNING_RATE, SMOLLM2_LEARNING_RATE = 2e-4, 1e-3
MAX_CELL_CHARS = 100_000  # ~25k tokens: no training example that long fits any sensible --max-seq-length
FALLBACK_INTENT, FALLBACK_CATEGORY = "out_of_scope", "FALLBACK"
FLAG_MEANINGS = {
    "B": "basic", "I": "interrogative", "C": "coordinated", "N": "negation", "M": "morphological variation",
    "L": "lexical variation", "P": "polite", "Q": "colloquial", "W": "offensive", "K": "keyword",
    "E": "abbreviation", "Z": "typo / error",
}
DEFAULT_TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

log = logging.getLogger("finetune")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default=HUB_DATASET, help="hub id, local .csv/.parquet/.jsonl file, or 'bundled'")
    data.add_argument("--instruction-column", default="instruction")
    data.add_argument("--response-column", default="response")
    data.add_argument("--intent-column", default="intent")
    data.add_argument("--category-column", default="category", help="optional; missing -> 'UNKNOWN'")
    data.add_argument("--subset", type=int, help="train on a sample of N rows (val/test shrink in proportion)")
    data.add_argument("--subset-sampling", default="balanced", choices=["balanced", "proportional"],
                      help="how --subset shares its rows among intents: as evenly as the rows allow (default), or in the "
                           "data's own proportions (the bundled copy gives its 22 small intents 1-3 rows each of 500)")
    data.add_argument("--val-ratio", type=float, default=0.05)
    data.add_argument("--test-ratio", type=float, default=0.05)
    data.add_argument("--placeholders", default="keep", choices=["keep", "generic", "strip"],
                      help="keep {{Order Number}} slots, replace them with generic phrases, or strip them")
    data.add_argument("--fallback-ratio", type=float, default=0.0,
                      help="share of out-of-scope examples (with their refusals) in the model's train split; 0: none, the "
                           "scope guard declines for it (0.1 taught SmolLM2 to decline 89%% of in-scope requests: docs/quality.md)")
    data.add_argument("--fallback-file", type=Path, default=FALLBACK_FILE)
    data.add_argument("--fallback-answers", default="written", choices=["written", "fixed"],
                      help="train the out-of-scope examples with their written refusals, or all with the scope guard's "
                           "fixed reply (prompts/fallback_reply.txt)")
    data.add_argument("--in-scope-examples", action=argparse.BooleanOptionalAction, default=True,
                      help="add the written in-scope messages of --in-scope-file to train (70%%; answers borrowed from "
                           "training rows of the same intent) and to the guard's val/test (15%% each)")
    data.add_argument("--in-scope-file", type=Path, default=IN_SCOPE_FILE)
    data.add_argument("--system-prompt-file", type=Path, default=SYSTEM_PROMPT_FILE)
    model = p.add_argument_group("model and LoRA")
    model.add_argument("--model", default="auto", help="auto | smollm2 | hub id | local dir | .gguf file")
    model.add_argument("--max-seq-length", type=int, default=1024, help="longer examples are left out (and counted)")
    model.add_argument("--lora-r", type=int, default=16)
    model.add_argument("--lora-alpha", type=int, default=16)
    model.add_argument("--lora-dropout", type=float, default=0.0)
    model.add_argument("--target-modules", default=DEFAULT_TARGET_MODULES)
    train = p.add_argument_group("training")
    train.add_argument("--learning-rate", type=float,
                       help=f"default: {GPU_LEARNING_RATE:g}, or {SMOLLM2_LEARNING_RATE:g} for the CPU default SmolLM2")
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--batch-size", type=int, default=2)
    train.add_argument("--grad-accum", type=int, default=4)
    train.add_argument("--warmup-steps", type=int, default=5)
    train.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps (-1: run the epochs)")
    train.add_argument("--logging-steps", type=int, default=5)
    train.add_argument("--save-steps", type=int, default=50, help="checkpoint every N optimizer steps")
    train.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                       help="Unsloth's gradient checkpointing (default: on with a GPU, where memory is short; off on a "
                            "CPU, where it cost 1.5x the step time: BENCHMARKS.md)")
    train.add_argument("--seed", type=int, default=42)
    out = p.add_argument_group("output")
    out.add_argument("--output-dir", type=Path, help="default: runs/<model name>")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    out.add_argument("--resume", action="store_true", help="continue the interrupted run in OUTPUT_DIR.partial")
    out.add_argument("--dry-run", action="store_true", help="check data and config, then stop")
    out.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                     help="after training, answer the held-out prompts with base and tuned and write OUTPUT_DIR/eval/")
    out.add_argument("--guard", action=argparse.BooleanOptionalAction, default=True,
                     help="train the scope guard (RUN/guard.json) that answers out-of-scope messages with "
                          "prompts/fallback_reply.txt, on the out-of-scope examples of --fallback-file")
    out.add_argument("--eval-limit", type=int, help="use only the first N held-out prompts")
    out.add_argument("--eval-max-new-tokens", type=int, default=256)
    out.add_argument("--export", help="after training: 'merged', 'gguf' or 'merged,gguf' into OUTPUT_DIR/export/ (gguf builds merged too)")
    out.add_argument("--from-run", type=Path, help="export this finished run instead of training (needs --export)")
    out.add_argument("--export-check-limit", type=int, help="check the export on the first N held-out prompts only")
    out.add_argument("--export-min-agreement", type=float, default=export.MIN_AGREEMENT,
                     help="fail the export when the merged model gives the adapter's greedy answer on fewer of the "
                          "checked prompts than this share")
    out.add_argument("--inspect", action="store_true", help="write a data report to --report-dir and stop")
    out.add_argument("--report-dir", type=Path, default=Path("reports/data"))
    args = p.parse_args(argv)
    if args.learning_rate is None:
        args.learning_rate = SMOLLM2_LEARNING_RATE if concrete_model(args.model) == CPU_DEFAULT_MODEL else GPU_LEARNING_RATE
    check_flags(p, args)
    return args


def check_flags(parser, args):
    problems = [
        (args.subset is not None and args.subset <= 0, "--subset must be a positive number of rows"),
        (args.learning_rate <= 0, "--learning-rate must be > 0 (try 2e-4)"),
        (args.max_seq_length < 32, "--max-seq-length must be at least 32 (try 1024)"),
        (args.epochs <= 0, "--epochs must be > 0"),
        (min(args.batch_size, args.grad_accum, args.lora_r, args.lora_alpha, args.logging_steps, args.save_steps) < 1,
         "--batch-size, --grad-accum, --lora-r, --lora-alpha, --logging-steps and --save-steps must be >= 1"),
        (not 0 <= args.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
        (not (0 < args.val_ratio < 0.5 and 0 < args.test_ratio < 0.5), "--val-ratio and --test-ratio must be in (0, 0.5)"),
        (not 0 <= args.fallback_ratio < 0.5, "--fallback-ratio must be in [0, 0.5)"),
        (args.resume and args.overwrite, "--resume and --overwrite exclude each other"),
        (args.eval_limit is not None and args.eval_limit < 1, "--eval-limit must be >= 1"),
        (args.export is not None and export.parse_formats(args.export) is None,
         f"--export takes {', '.join(export.FORMATS)} or both, comma-separated (got {args.export!r})"),
        (args.from_run and not args.export, "--from-run exports a finished run: add --export merged,gguf"),
        (args.export_check_limit is not None and args.export_check_limit < 1, "--export-check-limit must be >= 1"),
        (not 0 <= args.export_min_agreement <= 1, "--export-min-agreement must be in [0, 1] (try 0.9)"),
    ]
    for bad, message in problems:
        if bad:
            parser.exit(2, f"error: {message}\n")


# ----------------------------------------------------------------------------------------------------
# Data in


def load_rows(args):
    """Read the dataset, map its columns to instruction/response/intent/category/flags and validate it."""
    source = args.dataset
    if source == HUB_DATASET and not hub_reachable():
        log.warning("the Hugging Face hub can't be reached: using the bundled copy (%s)", BUNDLED_DATA.name)
        source = "bundled"
    if source == "bundled":
        frame, label = read_table(BUNDLED_DATA), f"bundled:{BUNDLED_DATA.name}"
    elif Path(source).suffix.lower() in {".csv", ".gz", ".parquet", ".jsonl", ".json"} or Path(source).exists():
        frame, label = read_table(Path(source)), str(source)
    else:
        frame, label = read_hub(source), f"hub:{source}"
    return validate_rows(frame, args), label


def hub_reachable():
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def read_hub(dataset_id):
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split="train").to_pandas()
    except Exception as error:  # datasets raises many types; all mean "could not get it"
        raise UserError(f"cannot load hub dataset {dataset_id!r} ({type(error).__name__}): "
                        "check the id, or pass a local file or 'bundled' to --dataset") from None


def read_table(path):
    if not path.is_file():
        raise UserError(f"dataset file {path} not found: pass --dataset an existing .csv/.parquet/.jsonl file or 'bundled'")
    suffixes = "".join(path.suffixes[-2:]).lower()
    try:
        if suffixes.endswith((".csv", ".csv.gz")):
            raw = gzip.decompress(path.read_bytes()) if suffixes.endswith(".gz") else path.read_bytes()
            text = raw.decode("utf-8-sig")  # a BOM from Excel is fine
            if not text.strip():
                raise UserError(f"dataset file {path} is empty: it needs a header row and data rows")
            frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
            duplicated = [c for c in frame.columns if re.search(r"\.\d+$", c) and c.rsplit(".", 1)[0] in frame.columns]
            if duplicated:
                raise UserError(f"dataset file {path} repeats the column {duplicated[0].rsplit('.', 1)[0]!r} in its header: rename or drop one")
        elif suffixes.endswith(".parquet"):
            frame = pd.read_parquet(path)
        elif suffixes.endswith((".jsonl", ".json")):
            frame = pd.read_json(path, lines=suffixes.endswith(".jsonl"), dtype=False)
        else:
            raise UserError(f"dataset file {path} has an unknown type: use .csv, .csv.gz, .parquet or .jsonl")
    except UserError:
        raise
    except UnicodeDecodeError as error:
        raise UserError(f"dataset file {path} is not UTF-8 (byte {error.start}): re-save it as UTF-8") from None
    except Exception as error:  # pandas/pyarrow parse errors have many types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot parse dataset file {path}: {first_line}") from None
    if frame.empty:
        raise UserError(f"dataset file {path} has no data rows")
    return frame


def validate_rows(frame, args):
    columns = {"instruction": args.instruction_column, "response": args.response_column, "intent": args.intent_column}
    for role, name in columns.items():
        if name not in frame.columns:
            raise UserError(f"column {name!r} not found (have: {', '.join(map(str, frame.columns))}): "
                            f"pass --{role}-column with the column that holds the {role}")
    optional = {"category": args.category_column, "flags": "flags"}
    rows = pd.DataFrame({role: frame[name] for role, name in columns.items()})
    for role, name in optional.items():
        rows[role] = frame[name] if name in frame.columns else ("UNKNOWN" if role == "category" else "")
    for role in rows.columns:
        non_text = rows[role].map(lambda v: not isinstance(v, str) and not (role in optional and v is None))
        if non_text.any():
            index = int(np.flatnonzero(non_text.to_numpy())[0])
            value = rows[role].iloc[index]
            raise UserError(f"column {columns.get(role, optional.get(role))!r} must hold text, but row {index + 1} "
                            f"holds {type(value).__name__} {str(value)[:30]!r}: fix that row")
    rows = rows.fillna("")
    for role in ("instruction", "response", "intent"):
        empty = rows[role].str.strip() == ""
        if empty.any():
            raise UserError(f"{int(empty.sum())} rows have an empty {role} (first: row {int(np.flatnonzero(empty)[0]) + 1}): "
                            "fill or delete them")
        too_long = rows[role].str.len() > MAX_CELL_CHARS
        if too_long.any():
            index = int(np.flatnonzero(too_long)[0])
            raise UserError(f"row {index + 1} has a {role} of {len(rows[role].iloc[index]):,} characters, over the "
                            f"{MAX_CELL_CHARS:,} limit: shorten or delete it")
    return rows.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------
# Placeholders and out-of-scope examples


def apply_placeholders(text, mode, table):
    if mode == "keep":
        return text
    if mode == "generic":
        return PLACEHOLDER.sub(lambda m: table.get(m.group(1), m.group(1).lower()), text)
    return strip_placeholders(text)


def strip_placeholders(text):
    """Remove {{slots}} and tidy what they leave behind: empty quotes, list items, brackets, double spaces."""
    text = PLACEHOLDER.sub("", text)
    text = re.sub(r"(['\"‘“])\s*(['\"’”])", "", text)  # '' or "" left where a quoted slot was
    text = re.sub(r"\(\s*\)|\[\s*\]", "", text)
    text = re.sub(r"^\s*(?:[-*•]|\d+[.)])\s*[:.,;]?\s*$\n?", "", text, flags=re.M)  # list items left empty
    text = re.sub(r"[ \t]+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])\s*([,.;:])", r"\2", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)
    return text.strip()


def load_fallback(path, fixed_reply=None):
    """Out-of-scope examples written for this project: a customer message and a polite refusal that names the topic,
    or fixed_reply (the scope guard's reply) for every one of them."""
    frame = read_written_examples(path, "fallback", ("instruction", "response"), "--fallback-file, or --fallback-ratio 0")
    frame["intent"], frame["category"], frame["flags"] = FALLBACK_INTENT, FALLBACK_CATEGORY, ""
    if fixed_reply is not None:
        frame["response"] = fixed_reply
    return frame


def load_in_scope(path):
    """In-scope customer messages written for this project in the same plain, casual, misspelt styles as the fallback
    file: without them, the only natural-sounding prompts in training were the refused ones (see README, Quality)."""
    frame = read_written_examples(path, "in-scope", ("instruction", "intent"), "--in-scope-file, or --no-in-scope-examples")
    frame["flags"] = ""
    return frame


def read_written_examples(path, what, fields, fix):
    if not Path(path).is_file():
        raise UserError(f"{what} file {path} not found: pass {fix}")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{what} file {path} is not UTF-8: re-save it as UTF-8 JSONL") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            rows.append({field: item[field].strip() for field in fields})
        except (AttributeError, ValueError, KeyError, TypeError, RecursionError):
            raise UserError(f"{path} line {number} is not a JSON object with {' and '.join(map(repr, fields))}") from None
    if not rows:
        raise UserError(f"{what} file {path} has no examples: add some, or pass {fix}")
    return pd.DataFrame(rows)


def borrow_responses(messages, train, seed):
    """Give each written in-scope message the answer of a random training row of its intent (Bitext answers are written
    per intent, not per wording); messages whose intent the training data lacks are left out."""
    rng = np.random.default_rng(seed)
    by_intent = {intent: group for intent, group in train.groupby("intent")}
    kept = messages[messages["intent"].isin(by_intent)].reset_index(drop=True)
    donors = [by_intent[intent].iloc[rng.integers(len(by_intent[intent]))] for intent in kept["intent"]]
    kept["response"] = [donor["response"] for donor in donors]
    kept["category"] = [donor["category"] for donor in donors]
    return kept


# ----------------------------------------------------------------------------------------------------
# Split


def split_by_intent(rows, val_ratio, test_ratio, seed):
    """Stratified train/val/test: every intent with >= 3 rows gets at least one row in each split."""
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for _, group in rows.groupby("intent", sort=True):
        order = rng.permutation(group.index.to_numpy())
        n_val = max(1, round(len(order) * val_ratio)) if len(order) >= 3 else 0
        n_test = max(1, round(len(order) * test_ratio)) if len(order) >= 3 else 0
        parts["val"].extend(order[:n_val])
        parts["test"].extend(order[n_val:n_val + n_test])
        parts["train"].extend(order[n_val + n_test:])
    return {name: rows.loc[index].reset_index(drop=True) for name, index in parts.items()}


def stratified_sample(rows, n, seed):
    """n rows in intent proportions (largest remainder), at least one per intent when n allows."""
    if n >= len(rows):
        return rows
    counts = rows["intent"].value_counts().sort_index()
    exact = counts * n / len(rows)
    quota = np.minimum(counts, np.maximum(np.floor(exact), 1 if n >= len(counts) else 0)).astype(int)
    for intent in (exact - np.floor(exact)).sort_values(ascending=False).index:  # hand out what is left
        if quota.sum() >= n:
            break
        if quota[intent] < counts[intent]:
            quota[intent] += 1
    while quota.sum() > n:  # the at-least-one rule overshot: trim the biggest intents
        quota[quota.idxmax()] -= 1
    return take_quotas(rows, quota, seed)


def balanced_sample(rows, n, seed):
    """n rows shared among intents as evenly as their sizes allow: an intent smaller than its share gives all its rows,
    and what it leaves over goes to the others ("water-filling"). On balanced data this is a stratified sample."""
    if n >= len(rows):
        return rows
    counts = rows["intent"].value_counts().sort_values()
    quota, left = {}, n
    for position, (intent, count) in enumerate(counts.items()):
        quota[intent] = min(count, left // (len(counts) - position))
        left -= quota[intent]
    for intent in counts.index[::-1]:  # the remainder of the integer division, one row each to the largest intents
        if left == 0:
            break
        if quota[intent] < counts[intent]:
            quota[intent] += 1
            left -= 1
    return take_quotas(rows, quota, seed)


def take_quotas(rows, quota, seed):
    """quota[intent] random rows of each intent, shuffled together."""
    picked = [group.sample(quota[intent], random_state=seed) for intent, group in rows.groupby("intent", sort=True)]
    return pd.concat(picked).sample(frac=1, random_state=seed).reset_index(drop=True)


def make_splits(rows, fallback, args, in_scope=None):
    splits = split_by_intent(rows, args.val_ratio, args.test_ratio, args.seed)
    if args.subset is not None:
        if args.subset > len(splits["train"]):
            raise UserError(f"--subset {args.subset} is larger than the {len(splits['train'])} training rows: use a smaller number")
        train_share = 1 - args.val_ratio - args.test_ratio
        sample = balanced_sample if args.subset_sampling == "balanced" else stratified_sample
        splits["train"] = sample(splits["train"], args.subset, args.seed)
        for name, ratio in (("val", args.val_ratio), ("test", args.test_ratio)):
            splits[name] = sample(splits[name], math.ceil(args.subset * ratio / train_share), args.seed)
    if in_scope is not None:  # the train pool only: the val and test pools are the guard's, with no answers to score
        written = borrow_responses(example_pools(in_scope, args.seed)["train"], splits["train"], args.seed)
        splits["train"] = pd.concat([splits["train"], written]).sample(frac=1, random_state=args.seed).reset_index(drop=True)
    if fallback is not None and args.fallback_ratio > 0:
        pools = example_pools(fallback, args.seed)
        for name, split in splits.items():
            wanted = max(1, round(len(split) * args.fallback_ratio / (1 - args.fallback_ratio)))
            extra = pools[name].head(wanted)
            splits[name] = pd.concat([split, extra]).sample(frac=1, random_state=args.seed).reset_index(drop=True)
    return splits


def example_pools(examples, seed):
    """Written examples cut into disjoint train / val / test pools: the val and test ones are never trained on."""
    pool = examples.sample(frac=1, random_state=seed).reset_index(drop=True)
    n_eval = max(1, round(len(pool) * 0.15))
    return {"val": pool[:n_eval], "test": pool[n_eval:2 * n_eval], "train": pool[2 * n_eval:]}


def build_guard(splits, fallback, in_scope, seed):
    """The scope guard for this run: the run's in-scope instructions (with the written in-scope pool of each split)
    against the whole out-of-scope pool of each split; the guard is not limited by --fallback-ratio, which sets the
    model's mixture. Its regularisation and threshold are chosen on val."""
    inside = {name: split.loc[split["intent"] != FALLBACK_INTENT, "instruction"].tolist() for name, split in splits.items()}
    if in_scope is not None:
        for name, pool in example_pools(in_scope, seed).items():
            if name != "train":  # the train pool is in the train split already
                inside[name] += pool["instruction"].tolist()
    outside = {name: pool["instruction"].tolist() for name, pool in example_pools(fallback, seed).items()}
    guard = scope.train_guard(inside["train"], outside["train"], inside["val"], outside["val"], scope.read_fallback_reply(),
                              inside["test"], outside["test"])
    log.info("scope guard: threshold %.3f; val %s; test %s", guard.threshold, guard.evaluation["val"], guard.evaluation.get("test"))
    return guard


def split_manifest(splits, files, source_label, rows):
    return {
        "source": source_label,
        "source_rows_sha256": hashlib.sha256(rows.to_json(orient="records", lines=True).encode()).hexdigest(),
        "splits": {
            name: {"rows": len(split), "sha256": sha256_file(files[name]),
                   "per_intent": split["intent"].value_counts().sort_index().to_dict()}
            for name, split in splits.items()
        },
    }


# ----------------------------------------------------------------------------------------------------
# Tokenize: the loss covers the assistant answer and its end token, nothing else


def encode_example(tokenizer, system_prompt, instruction, response):
    messages = chat_messages(system_prompt, instruction, response)
    prompt = render_chat(tokenizer, messages[:-1], add_generation_prompt=True)
    full = render_chat(tokenizer, messages)
    if not full.startswith(prompt):
        raise UserError("the chat template renders the prompt differently with and without the answer: "
                        "this model's template is not supported for answer-only loss")
    completion = full[len(prompt):]
    # Stop right after the end token: ChatML adds a newline that belongs to no turn.
    completion = completion[: completion.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)]
    # The templates write the BOS token themselves, so no tokenizer-added specials (no double BOS).
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return {
        "input_ids": prompt_ids + completion_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(completion_ids)),
        "labels": [-100] * len(prompt_ids) + completion_ids,
    }


def encode_split(tokenizer, system_prompt, split, max_seq_length):
    """Encode a split; examples over max_seq_length are left out, since truncation would cut the end token."""
    from datasets import Dataset

    encoded = [encode_example(tokenizer, system_prompt, r.instruction, r.response) for r in split.itertuples()]
    kept = [e for e in encoded if len(e["input_ids"]) <= max_seq_length]
    if not kept:
        raise UserError(f"every example is longer than --max-seq-length {max_seq_length}: raise it")
    return Dataset.from_list(kept), len(encoded) - len(kept)


# ----------------------------------------------------------------------------------------------------
# --inspect


def inspect_data(rows, source_label, args):
    """Write reports/data/report.md and plots: counts, lengths, placeholders, flags, duplicates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokenizer = load_tokenizer(args.model)
    system_prompt = read_system_prompt(args.system_prompt_file)
    lengths = pd.DataFrame({
        "instruction_chars": rows["instruction"].str.len(),
        "response_chars": rows["response"].str.len(),
        "instruction_tokens": [len(ids) for ids in tokenizer(rows["instruction"].tolist(), add_special_tokens=False)["input_ids"]],
        "response_tokens": [len(ids) for ids in tokenizer(rows["response"].tolist(), add_special_tokens=False)["input_ids"]],
    })
    rendered = [len(encode_example(tokenizer, system_prompt, r.instruction, r.response)["input_ids"]) for r in rows.itertuples()]
    too_long = sum(n > args.max_seq_length for n in rendered)
    placeholders = pd.Series([m for text in pd.concat([rows["instruction"], rows["response"]])
                              for m in PLACEHOLDER.findall(text)]).value_counts()
    flag_counts = pd.Series([c for flags in rows["flags"] for c in flags]).value_counts()
    duplicates = int(rows.duplicated(["instruction", "response"]).sum())
    duplicate_instructions = int(rows.duplicated(["instruction"]).sum())

    partial = args.report_dir.with_name(args.report_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    intent_counts = rows["intent"].value_counts()
    fig, ax = plt.subplots(figsize=(8, 7))
    intent_counts.sort_values().plot.barh(ax=ax, color="#4C72B0")
    ax.set(title="Rows per intent", xlabel="rows")
    fig.tight_layout()
    fig.savefig(partial / "intents.png", dpi=100)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, column in zip(axes, ["instruction_tokens", "response_tokens"]):
        lengths[column].plot.hist(ax=ax, bins=40, color="#55A868")
        ax.set(title=column.replace("_", " "), xlabel="tokens")
    fig.tight_layout()
    fig.savefig(partial / "lengths.png", dpi=100)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(rendered, bins=40, color="#C44E52")
    ax.axvline(args.max_seq_length, color="black", linestyle="--", label=f"--max-seq-length {args.max_seq_length}")
    ax.set(title="Rendered example length (system + user + assistant)", xlabel="tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(partial / "rendered_lengths.png", dpi=100)
    plt.close("all")

    def table(series, key, value):
        return "\n".join([f"| {key} | {value} |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in series.items()])

    stats = lengths.describe(percentiles=[0.5, 0.95]).T[["mean", "min", "50%", "95%", "max"]].round(1)
    describe = "\n".join(["| | mean | min | median | p95 | max |", "|---|---:|---:|---:|---:|---:|"]
                         + [f"| {name} | " + " | ".join(f"{v:g}" for v in values) + " |" for name, values in stats.iterrows()])
    report = f"""# Data report

- Source: `{source_label}`
- Rows: **{len(rows)}**; intents: **{rows['intent'].nunique()}**; categories: **{rows['category'].nunique()}**
- Tokenizer: `{args.model}` ({type(tokenizer).__name__}); rendered with `{args.system_prompt_file}` as system prompt
- Rendered examples longer than `--max-seq-length {args.max_seq_length}`: **{too_long}** (left out of training)
- Exact duplicates (instruction and response): **{duplicates}**; repeated instructions: **{duplicate_instructions}**
- Distinct placeholders: **{len(placeholders)}** ({int(placeholders.sum())} occurrences)

## Lengths (characters and tokens)

{describe}

Rendered example tokens: mean {np.mean(rendered):.0f}, 95th percentile {np.percentile(rendered, 95):.0f}, max {max(rendered)}.

![lengths](lengths.png)
![rendered lengths](rendered_lengths.png)

## Rows per intent

{table(intent_counts, "intent", "rows")}

![intents](intents.png)

## Rows per category

{table(rows['category'].value_counts(), "category", "rows")}

## Placeholders

{table(placeholders.rename(lambda name: f"`{{{{{name}}}}}`"), "placeholder", "occurrences")}

## Language-variation flags

Bitext tags each instruction with letters; a row can carry several. Rows without flags: {int((rows['flags'] == '').sum())}.

{table(flag_counts.rename(lambda c: f"{c} ({FLAG_MEANINGS.get(c, 'unknown')})"), "flag", "rows")}
"""
    (partial / "report.md").write_text(report, encoding="utf-8")
    shutil.rmtree(args.report_dir, ignore_errors=True)
    partial.rename(args.report_dir)
    log.info("wrote %s: %d rows, %d intents, %d categories, %d placeholders, %d duplicates, %d over max length",
             args.report_dir / "report.md", len(rows), rows["intent"].nunique(), rows["category"].nunique(),
             len(placeholders), duplicates, too_long)


# ----------------------------------------------------------------------------------------------------
# Train


def train(args, splits, work_dir, system_prompt):
    import torch

    model, tokenizer, model_name = load_model(args.model, args.max_seq_length)
    from transformers import TrainerCallback

    datasets, dropped = {}, {}
    for name in ("train", "val"):
        datasets[name], dropped[name] = encode_split(tokenizer, system_prompt, splits[name], args.max_seq_length)
        if dropped[name]:
            log.warning("%s: left out %d examples longer than %d tokens", name, dropped[name], args.max_seq_length)
    cuda = has_cuda()
    checkpointing = cuda if args.gradient_checkpointing is None else args.gradient_checkpointing
    model = add_lora(model, args, gradient_checkpointing="unsloth" if checkpointing else False)

    class LossToLog(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **_):
            log.info("step %d: %s", state.global_step, json.dumps(logs))

    trainer = build_trainer(args, model, tokenizer, datasets["train"], datasets["val"], work_dir / "checkpoints",
                            native_bf16=compute_dtype() == torch.bfloat16, callbacks=[LossToLog()])
    # LoRA's B matrices start at zero, so before training the model is exactly the base model:
    # the same code on the same val rows gives the base loss.
    base_val_loss = trainer.evaluate()["eval_loss"]
    log.info("base val loss %.4f on %d rows", base_val_loss, len(datasets["val"]))
    checkpoint = last_checkpoint(work_dir) if args.resume else None
    if args.resume:
        log.info("resuming from %s", checkpoint)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    runtime = time.time() - started
    tuned_val_loss = trainer.evaluate()["eval_loss"]
    log.info("tuned val loss %.4f (base %.4f)", tuned_val_loss, base_val_loss)

    model.save_pretrained(work_dir / "adapter")
    tokenizer.save_pretrained(work_dir / "adapter")
    shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)  # the adapter supersedes them
    steps_done = trainer.state.global_step - (int(checkpoint.name.split("-")[1]) if checkpoint else 0)
    tokens_per_step = sum(len(ids) for ids in datasets["train"]["input_ids"]) / max(1, len(datasets["train"]))
    trained_tokens = tokens_per_step * steps_done * args.batch_size * args.grad_accum
    return {
        "model": model_name,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "compute_dtype": dtype_name(compute_dtype()),
        "base_val_loss": base_val_loss,
        "tuned_val_loss": tuned_val_loss,
        "val_rows": len(datasets["val"]),
        "train_rows": len(datasets["train"]),
        "left_out_over_max_length": dropped,
        "steps": trainer.state.global_step,
        "train_runtime_s": round(runtime, 1),
        "train_loss": result.training_loss,
        "train_tokens_per_s": round(trained_tokens / runtime, 1),
        "peak_memory_gb": round(peak_memory_gb(cuda), 2),
        "loss_per_step": [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e],
    }


def lora_settings(args):
    """The LoRA hyperparameters, as both Unsloth's get_peft_model and peft's LoraConfig take them."""
    return {"r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
            "target_modules": args.target_modules.split(","), "bias": "none"}


def add_lora(model, args, gradient_checkpointing):
    from unsloth import FastLanguageModel

    return FastLanguageModel.get_peft_model(model, **lora_settings(args), use_gradient_checkpointing=gradient_checkpointing,
                                            random_state=args.seed)


def build_trainer(args, model, tokenizer, train_dataset, eval_dataset, output_dir, native_bf16, callbacks=(),
                  trl_collator=False, **config_overrides):
    """TRL's SFTTrainer on the pre-tokenized answer-only examples; benchmarks/train_bench.py reuses it.

    trl_collator: let TRL collate (its padding_free / packing refuse a custom collator); the default pads each batch
    and keeps our labels. config_overrides replace SFTConfig fields.
    """
    from transformers import DataCollatorForSeq2Seq
    from trl import SFTConfig, SFTTrainer

    cuda = has_cuda()
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="linear",
        gradient_checkpointing=False,  # get_peft_model already set up Unsloth's own; TRL's would recompute twice
        weight_decay=0.01,
        optim="adamw_8bit" if cuda else "adamw_torch",
        fp16=cuda and not native_bf16,  # a T4 has no bf16
        bf16=native_bf16,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=2,
        eval_strategy="no",
        seed=args.seed,
        data_seed=args.seed,
        report_to="none",
        max_length=args.max_seq_length,
        dataset_kwargs={"skip_prepare_dataset": True},  # already tokenized, with answer-only labels
        remove_unused_columns=False,
    )
    config = SFTConfig(**dict(settings, **config_overrides))
    collator = None if trl_collator else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = SFTTrainer(model=model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, data_collator=collator, callbacks=list(callbacks))
    if not native_bf16:
        # TRL casts QLoRA adapters to bf16; without native bf16 (CPU, T4) that made steps ~3x slower
        # here, and fp16 mixed precision needs fp32 master weights anyway.
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    return trainer


def last_checkpoint(work_dir):
    """The newest complete checkpoint: the Trainer writes trainer_state.json last, so a kill can leave one half-written."""
    def complete(checkpoint):
        try:
            return bool(json.loads((checkpoint / "trainer_state.json").read_text()))
        except (OSError, ValueError):
            return False

    checkpoints = sorted(filter(complete, (work_dir / "checkpoints").glob("checkpoint-*")), key=lambda c: int(c.name.split("-")[1]))
    if not checkpoints:
        raise UserError(f"no checkpoint in {work_dir / 'checkpoints'} to resume from: run again without --resume")
    return checkpoints[-1]


def peak_memory_gb(cuda):
    import resource

    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def default_output_dir(model_spec):
    return REPO / "runs" / Path(concrete_model(model_spec)).stem.lower()


def write_model_card(path, args, metrics, manifest):
    hyper = {k: getattr(args, k) for k in ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate",
                                          "epochs", "batch_size", "grad_accum", "max_seq_length", "seed", "placeholders")}
    path.write_text(f"""# Customer-support LoRA adapter

A QLoRA adapter (4-bit NF4 base, trained with Unsloth + TRL) for `{metrics['model']}`, fine-tuned on Bitext
customer-support data to answer customer questions. Load it with infer.py `--run` or PEFT.

## Data
- Source: `{manifest['source']}`; train / val / test rows: {manifest['splits']['train']['rows']} /
  {manifest['splits']['val']['rows']} / {manifest['splits']['test']['rows']} (stratified by intent; see manifest.json),
  including out-of-scope examples from `prompts/fallback.jsonl` and in-scope customer messages from
  `prompts/in_scope.jsonl` (answered with Bitext answers of their intent), both written for this project.
- `guard.json` beside this card is the run's scope guard (MiniLM embeddings + logistic regression; see scope.py):
  demo.py and infer.py answer the messages it finds out of scope with its fixed reply.
- Bitext data © Bitext Innovations International, licensed under CDLA-Sharing-1.0 (text in LICENSE_CDLA-Sharing-1.0.txt
  beside this card). Data derived from it that you publish must stay under CDLA-Sharing-1.0 and keep this notice.
- The base model's own license applies to the base weights and to this adapter's use with them.

## Hyperparameters
{chr(10).join(f"- {k}: {v}" for k, v in hyper.items())}

## Metrics (same {metrics['val_rows']} validation rows)
- Base val loss: {metrics['base_val_loss']:.4f}
- Tuned val loss: {metrics['tuned_val_loss']:.4f}
- Training: {metrics['steps']} steps in {metrics['train_runtime_s']} s on {metrics['device']},
  {metrics['train_tokens_per_s']} tokens/s, peak memory {metrics['peak_memory_gb']} GB
""", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    if args.export and "gguf" in export.parse_formats(args.export):
        export.converter()  # a missing converter stops the run now, not after training
    if args.from_run:
        if not args.from_run.is_dir():
            raise UserError(f"--from-run {args.from_run} is not a directory: pass a finished finetune.py output dir")
        export_run(args, args.from_run)
        return
    rows, source_label = load_rows(args)
    before = len(rows)
    rows = rows.drop_duplicates(["instruction", "response"]).reset_index(drop=True)
    log.info("loaded %d rows from %s (%d exact duplicates dropped)", len(rows), source_label, before - len(rows))
    table = load_placeholder_table()
    for column in ("instruction", "response"):
        rows[column] = rows[column].map(lambda text: apply_placeholders(text, args.placeholders, table))
    if args.inspect:
        inspect_data(rows, source_label, args)
        return
    system_prompt = read_system_prompt(args.system_prompt_file)
    fixed_reply = scope.read_fallback_reply() if args.fallback_answers == "fixed" else None
    # the guard learns from the out-of-scope examples even when the model sees none (--fallback-ratio 0)
    fallback = load_fallback(args.fallback_file, fixed_reply) if args.fallback_ratio > 0 or args.guard else None
    in_scope = load_in_scope(args.in_scope_file) if args.in_scope_examples else None
    if in_scope is not None and not in_scope["intent"].isin(rows["intent"]).any():
        log.info("the in-scope examples' intents are not in this dataset: left out")
        in_scope = None
    splits = make_splits(rows, fallback, args, in_scope)
    log.info("splits: %s", ", ".join(f"{name} {len(split)}" for name, split in splits.items()))

    if args.dry_run:
        tokenizer = load_tokenizer(args.model)
        for name in ("train", "val"):
            _, dropped = encode_split(tokenizer, system_prompt, splits[name], args.max_seq_length)
            log.info("%s: %d examples over %d tokens would be left out", name, dropped, args.max_seq_length)
        log.info("dry run: data and config are fine, nothing written")
        return

    output_dir = args.output_dir or default_output_dir(args.model)
    work_dir = output_dir.with_name(output_dir.name + ".partial")
    if output_dir.exists() and not args.overwrite:
        raise UserError(f"output dir {output_dir} exists: pass --overwrite to replace it, or another --output-dir")
    if work_dir.exists() and not args.resume:
        raise UserError(f"{work_dir} holds an interrupted run: pass --resume to continue it, or delete it")
    if args.resume and not work_dir.exists():
        raise UserError(f"nothing to resume in {work_dir}: run without --resume")
    work_dir.mkdir(parents=True, exist_ok=True)
    log.addHandler(logging.FileHandler(work_dir / "train.log"))

    files = {name: work_dir / f"{name}.jsonl" for name in splits}
    for name, split in splits.items():
        split.to_json(files[name], orient="records", lines=True, force_ascii=False)
    manifest = split_manifest(splits, files, source_label, rows)
    previous = work_dir / "manifest.json"
    if args.resume and previous.exists() and json.loads(previous.read_text())["splits"] != manifest["splits"]:
        raise UserError(f"the data or split flags differ from the interrupted run in {work_dir}: use the same flags")
    write_json(previous, manifest)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_json(work_dir / "config.json", dict(config, base_model=concrete_model(args.model)))

    if args.guard:
        build_guard(splits, fallback, in_scope, args.seed).save(work_dir / scope.GUARD_FILE)
    metrics = train(args, splits, work_dir, system_prompt)
    write_json(work_dir / "metrics.json", metrics)
    shutil.copy(BUNDLED_LICENSE, work_dir / BUNDLED_LICENSE.name)
    write_model_card(work_dir / "README.md", args, metrics, manifest)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    work_dir.rename(output_dir)
    log.info("done: %s (base val loss %.4f -> tuned %.4f, %.0f s, %.0f tokens/s)", output_dir,
             metrics["base_val_loss"], metrics["tuned_val_loss"], metrics["train_runtime_s"], metrics["train_tokens_per_s"])
    if args.compare:
        import infer  # the held-out comparison, exactly as `infer.py --run OUTPUT_DIR --compare` does it

        infer.main(infer.parse_args(["--run", str(output_dir), "--compare", "--system-prompt-file", str(args.system_prompt_file),
                                     "--max-new-tokens", str(args.eval_max_new_tokens)]
                                    + (["--limit", str(args.eval_limit)] if args.eval_limit else [])))
    if args.export:
        export_run(args, output_dir)


def export_run(args, run_dir):
    export.export_run(run_dir, export.parse_formats(args.export), args.system_prompt_file, args.export_check_limit,
                      args.eval_max_new_tokens, min_agreement=args.export_min_agreement)


if __name__ == "__main__":
    run_main(main)
