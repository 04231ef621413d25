"""A training run: its settings (one dataclass that is also finetune.py's command line and config file) and QLoRA with
Unsloth and TRL's SFTTrainer.

finetune.py builds its flags from RunSettings' fields (help and default from each field), reads `--config FILE`
(YAML or JSON, flags override it) and writes the settings, with the `auto` choices made, to RUN/config.json, so
`finetune.py --config RUN/config.json` repeats a run. TRL's parsers (HfArgumentParser, TrlParser) would do the same,
but importing them imports transformers before Unsloth can patch it, and loads torch for every `--help` or bad flag.
"""
import argparse
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import shutil
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from common import REPO, SYSTEM_PROMPT_FILE, ArgumentParser, UserError
from data import FALLBACK_FILE, HUB_DATASET, IN_SCOPE_FILE, encode_split
from export import MIN_AGREEMENT, parse_formats
from models import (CPU_DEFAULT_MODEL, compute_dtype, concrete_model, dtype_name, has_cuda, hub_model_id, linear_layer_names,
                    load_model, resolve_model, run_name)
from scope import load_intent_reader

# Unsloth's notebook rate for 1B-8B models; at 2e-4 the 65 steps of `--subset 500` left SmolLM2-135M undertrained
# (held-out intent accuracy +0.02 over base; 1e-3 gives +0.19 with --fallback-ratio 0.1, see README).
GPU_LEARNING_RATE, SMOLLM2_LEARNING_RATE = 2e-4, 1e-3
DEFAULT_TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
REPORT_TO = ("none", "tensorboard", "wandb", "trackio")
# Rows per optimizer step: today's 2 x 4, which the learning rates above were chosen with. --batch-size auto splits
# them into micro-batches as large as the memory allows; a GPU then runs them as one flattened, padding-free batch.
ROWS_PER_STEP = 8
CPU_BATCH_SIZE = 2  # the CPU computes row by row anyway; bigger micro-batches only pad more
# The shape --batch-size auto assumes when it can't read the model's config (Llama 3.2 3B, the GPU default).
LLAMA_3B_SHAPE = {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "vocab_size": 128256}
GPU_MEMORY_SHARE = 0.6  # of the memory left after the weights; the rest is headroom for fragmentation and the optimizer
DERIVED_KEYS = ("base_model",)  # written to config.json for the record, worked out again when it is read back

log = logging.getLogger("finetune")


def setting(default, help="", group="training", choices=None):
    return field(default=default, metadata={"help": help, "group": group, "choices": choices})


def data_setting(default, help="", choices=None):
    return setting(default, help, "data", choices)


def model_setting(default, help=""):
    return setting(default, help, "model and LoRA")


def output_setting(default, help=""):
    return setting(default, help, "output")


@dataclass
class RunSettings:
    """Every setting of a training run."""

    dataset: str = data_setting(HUB_DATASET, "hub id, local .csv/.parquet/.jsonl file, or 'bundled'")
    instruction_column: str = data_setting("instruction")
    response_column: str = data_setting("response")
    intent_column: str = data_setting("intent", "'none': the data has no intents (one stratum, no intent metric)")
    category_column: str = data_setting("category", "optional; missing -> 'UNKNOWN'")
    subset: int | None = data_setting(None, "train on a sample of N rows (val/test shrink in proportion)")
    subset_sampling: str = data_setting(
        "balanced", "how --subset shares its rows among intents: as evenly as the rows allow, or in the data's own "
                    "proportions (the bundled copy gives its 22 small intents 1-3 rows each of 500)", ("balanced", "proportional"))
    val_ratio: float = data_setting(0.05)
    test_ratio: float = data_setting(0.05)
    placeholders: str = data_setting("keep", "keep {{Order Number}} slots, replace them with generic phrases, or strip them",
                                     ("keep", "generic", "strip"))
    fallback_ratio: float = data_setting(
        0.0, "share of out-of-scope examples (with their refusals) in the model's train split; 0: none, the scope guard "
             "declines for it (0.1 taught SmolLM2 to decline 89%% of in-scope requests: docs/quality.md)")
    fallback_file: Path = data_setting(FALLBACK_FILE)
    fallback_answers: str = data_setting("written", "train the out-of-scope examples with their written refusals, or all "
                                                    "with the scope guard's fixed reply (prompts/fallback_reply.txt)",
                                         ("written", "fixed"))
    in_scope_examples: bool = data_setting(True, "add the written in-scope messages of --in-scope-file to train (70%%; "
                                                 "answers borrowed from training rows of the same intent) and to the "
                                                 "guard's val/test (15%% each)")
    in_scope_file: Path = data_setting(IN_SCOPE_FILE)
    intent_hints: bool = data_setting(True, "write each in-scope example's intent and an example answer of that intent "
                                            "into its system prompt (3 of 4), and save an intent reader "
                                            "(OUTPUT_DIR/intents.json) whose reading of a message goes there when the run "
                                            "answers (docs/quality.md, \"Intent hints\")")
    system_prompt_file: Path = data_setting(SYSTEM_PROMPT_FILE)

    model: str = model_setting("auto", "auto | smollm2 | hub id | local dir | .gguf file (auto: Llama 3.2 3B Instruct "
                                       "on a GPU, SmolLM2-135M-Instruct on a CPU)")
    max_seq_length: int = model_setting(1024, "longer examples are left out (and counted)")
    lora_r: int = model_setting(16)
    lora_alpha: int = model_setting(16)
    lora_dropout: float = model_setting(0.0)
    target_modules: str = model_setting(DEFAULT_TARGET_MODULES)

    learning_rate: float | None = setting(None, f"auto: {GPU_LEARNING_RATE:g}, or {SMOLLM2_LEARNING_RATE:g} for the "
                                                "CPU default SmolLM2")
    epochs: float = setting(1.0)
    batch_size: str = setting("auto", f"rows per micro-batch; auto: {CPU_BATCH_SIZE} on a CPU; on a GPU as many of the "
                                      f"{ROWS_PER_STEP} rows of a step as its memory holds at --max-seq-length")
    grad_accum: int | None = setting(None, f"micro-batches per optimizer step (auto: {ROWS_PER_STEP} rows per step / "
                                           "--batch-size)")
    warmup_steps: int = setting(5)
    max_steps: int = setting(-1, "stop after N optimizer steps (-1: run the epochs)")
    optim: str = setting("auto", "any transformers optimizer name; auto: adamw_8bit on a GPU, adamw_torch on a CPU")
    lr_scheduler_type: str = setting("linear", "any transformers scheduler name (linear, cosine, constant, ...)")
    weight_decay: float = setting(0.01)
    logging_steps: int = setting(5)
    save_steps: int = setting(50, "checkpoint every N optimizer steps")
    gradient_checkpointing: bool | None = setting(
        None, "Unsloth's gradient checkpointing (auto: on with a GPU, where memory is short; off on a CPU, where it cost "
              "1.5x the step time: BENCHMARKS.md)")
    seed: int = setting(42)
    report_to: str = setting("none", "experiment tracking: TensorBoard writes OUTPUT_DIR/tensorboard (offline); wandb and "
                                     "trackio need their package and an account", choices=REPORT_TO)

    output_dir: Path | None = output_setting(None, "default: runs/<model name>")
    compare: bool = output_setting(True, "after training, answer the held-out prompts with base and tuned and write "
                                         "OUTPUT_DIR/eval/")
    guard: bool = output_setting(True, "train the scope guard (OUTPUT_DIR/guard.json) that answers out-of-scope messages "
                                       "with prompts/fallback_reply.txt, on the out-of-scope examples of --fallback-file")
    eval_limit: int | None = output_setting(None, "use only the first N held-out prompts")
    eval_max_new_tokens: int = output_setting(256)
    export: str | None = output_setting(None, "after training: 'merged', 'gguf' or 'merged,gguf' into OUTPUT_DIR/export/ "
                                              "(gguf builds merged too)")
    export_check_limit: int | None = output_setting(None, "check the export on the first N held-out prompts only")
    export_min_agreement: float = output_setting(MIN_AGREEMENT, "fail the export when the merged model gives the "
                                                 "adapter's greedy answer on fewer of the checked prompts than this share")


# ----------------------------------------------------------------------------------------------------
# Settings as a command line, a config file and config.json


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default in --help."""


@functools.cache
def field_type(cls, name):
    """The field's type without `| None`: int, float, str, bool or Path."""
    kind = typing.get_type_hints(cls)[name]
    if isinstance(kind, types.UnionType):
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    return kind


def add_settings_flags(parser, cls):
    """One flag per field of the dataclass cls, spelt --output-dir and (as TRL spells it) --output_dir."""
    groups = {}
    for f in dataclasses.fields(cls):
        name, help = f.metadata["group"], f.metadata["help"] or "(default: %(default)s)"
        group = groups[name] if name in groups else groups.setdefault(name, parser.add_argument_group(name))
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        kind = field_type(cls, f.name)
        if kind is bool and f.default is False:  # an action such as --dry-run: no --no-dry-run
            group.add_argument(*flags, dest=f.name, action="store_true", help=f.metadata["help"])
        elif kind is bool:
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            group.add_argument(*flags, dest=f.name, type=kind, default=f.default, choices=f.metadata["choices"], help=help)


def parse_settings(argv, description, actions_cls):
    """(RunSettings, actions_cls instance) from the command line and the --config file it names."""
    parser = ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--config", type=Path, help="a YAML or JSON file of settings (RUN/config.json repeats a run); "
                                                    "flags given with it override the file")
    add_settings_flags(parser, RunSettings)
    add_settings_flags(parser, actions_cls)
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_settings_file(known.config))
    values = vars(parser.parse_args(argv))
    settings = RunSettings(**{f.name: values[f.name] for f in dataclasses.fields(RunSettings)})
    check_settings(settings)
    return settings, actions_cls(**{f.name: values[f.name] for f in dataclasses.fields(actions_cls)})


def read_settings_file(path):
    """The settings in a YAML or JSON file (JSON is YAML), checked against RunSettings' fields and types."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found: pass --config an existing YAML or JSON file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserError(f"config file {path} is not valid YAML or JSON ({str(error).splitlines()[0]}): fix its syntax") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must map setting names to values, like `learning_rate: 2.0e-4`")
    names = {f.name for f in dataclasses.fields(RunSettings)}
    settings = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in DERIVED_KEYS:
            continue
        if name not in names:
            raise UserError(f"config file {path} has an unknown setting {key!r}: see finetune.py --help for the names")
        settings[name] = setting_value(name, value, path)
    return settings


def setting_value(name, value, path):
    """A value from a config file as the field's type; YAML reads 2e-4 as text, for one."""
    kind = field_type(RunSettings, name)
    default = next(f.default for f in dataclasses.fields(RunSettings) if f.name == name)
    if value is None and default is None:
        return None
    try:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
        if kind is float and not isinstance(value, bool):
            return float(value)
        if kind in (str, Path) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return kind(str(value))
    except (TypeError, ValueError):
        pass
    raise UserError(f"config file {path}: {name} must be {kind.__name__}{' or null' if default is None else ''}, not {value!r}")


def check_settings(s):
    """Every bad value, flag or file alike, as a one-line error saying what to use."""
    problems = [
        (s.subset is not None and s.subset <= 0, "--subset must be a positive number of rows"),
        (s.learning_rate is not None and s.learning_rate <= 0, "--learning-rate must be > 0 (try 2e-4)"),
        (s.max_seq_length < 32, "--max-seq-length must be at least 32 (try 1024)"),
        (s.epochs <= 0, "--epochs must be > 0"),
        (s.max_steps == 0 or s.max_steps < -1, "--max-steps must be >= 1, or -1 to run the --epochs"),
        (not (s.batch_size == "auto" or str(s.batch_size).isdigit() and int(s.batch_size) >= 1),
         f"--batch-size takes auto or a number of rows >= 1 (got {s.batch_size!r})"),
        (min(s.grad_accum or 1, s.lora_r, s.lora_alpha, s.logging_steps, s.save_steps) < 1,
         "--grad-accum, --lora-r, --lora-alpha, --logging-steps and --save-steps must be >= 1"),
        (not 0 <= s.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
        (s.warmup_steps < 0 or s.weight_decay < 0, "--warmup-steps and --weight-decay must be >= 0"),
        (not (0 < s.val_ratio < 0.5 and 0 < s.test_ratio < 0.5), "--val-ratio and --test-ratio must be in (0, 0.5)"),
        (not 0 <= s.fallback_ratio < 0.5, "--fallback-ratio must be in [0, 0.5)"),
        (s.eval_limit is not None and s.eval_limit < 1, "--eval-limit must be >= 1"),
        (s.export is not None and parse_formats(s.export) is None,
         f"--export takes merged, gguf or both, comma-separated (got {s.export!r})"),
        (s.export_check_limit is not None and s.export_check_limit < 1, "--export-check-limit must be >= 1"),
        (not 0 <= s.export_min_agreement <= 1, "--export-min-agreement must be in [0, 1] (try 0.9)"),
    ]
    for f in dataclasses.fields(s):
        choices = f.metadata["choices"]
        if choices and getattr(s, f.name) not in choices:
            problems.append((True, f"--{f.name.replace('_', '-')} takes {', '.join(choices)} (got {getattr(s, f.name)!r})"))
    if s.report_to not in ("none", "tensorboard") and importlib.util.find_spec(s.report_to) is None:
        problems.append((True, f"--report-to {s.report_to} needs its package: pip install {s.report_to} (and log in), "
                               "or use --report-to tensorboard"))
    for bad, message in problems:
        if bad:
            raise UserError(message)


def resolve_auto(settings, cuda, gpu_memory_bytes=None):
    """The settings with every `auto` replaced by what this run uses, as config.json records them.

    gpu_memory_bytes: the memory --batch-size auto may plan with (default: the card's; train_bench's --t4-memory caps it).
    """
    model = concrete_model(settings.model)
    if settings.batch_size != "auto":
        batch_size = int(settings.batch_size)
    elif cuda:
        batch_size = auto_batch_size(gpu_memory_bytes or gpu_total_memory(), settings.max_seq_length, model_shape(model))
    else:
        batch_size = CPU_BATCH_SIZE
    return dataclasses.replace(
        settings,
        batch_size=batch_size,
        grad_accum=settings.grad_accum or max(1, ROWS_PER_STEP // batch_size),
        learning_rate=settings.learning_rate or (SMOLLM2_LEARNING_RATE if model == CPU_DEFAULT_MODEL else GPU_LEARNING_RATE),
        optim=("adamw_8bit" if cuda else "adamw_torch") if settings.optim == "auto" else settings.optim,
        gradient_checkpointing=cuda if settings.gradient_checkpointing is None else settings.gradient_checkpointing,
        output_dir=settings.output_dir or REPO / "runs" / run_name(model),
    )


def auto_batch_size(memory_bytes, max_seq_length, shape):
    """Rows per micro-batch on a GPU: the largest power of two up to ROWS_PER_STEP whose worst case, every row
    max_seq_length tokens long, fits in GPU_MEMORY_SHARE of the memory the 4-bit weights leave.

    Weights: NF4 blocks (half a byte a parameter) plus 16-bit embeddings and 1 GiB of CUDA context. Activations per
    token, with Unsloth's gradient checkpointing: every layer's 16-bit input is kept (2 h L bytes) and one layer is
    recomputed at a time (about 2 (12 h + 3 i) bytes), doubled for the backward pass. For Llama 3.2 3B that is
    0.6 MB a token; the H200 run measured about 0.2 (2.65 GB peak at 2 x 4 rows, 3.35 GB at 16 x 1: NOTES.md), so a
    T4 (15 GB) still takes 8 rows of 1,024 tokens with room to spare.
    """
    h, i, layers, vocab = (shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    weights = layers * (4 * h * h + 3 * h * i) / 2 + 2 * vocab * h + 2**30
    per_token = 2 * (2 * h * layers + 2 * (12 * h + 3 * i))
    rows = ROWS_PER_STEP
    while rows > 1 and rows * max_seq_length * per_token > GPU_MEMORY_SHARE * (memory_bytes - weights):
        rows //= 2
    return rows


def model_shape(model):
    """hidden size, intermediate size, layers and vocabulary of the model's config; Llama 3.2 3B's when it can't be read
    (a hub id not downloaded yet)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_model(model))
        return {key: getattr(config, key) for key in LLAMA_3B_SHAPE}
    except (OSError, ValueError, AttributeError, UserError):
        return LLAMA_3B_SHAPE


def gpu_total_memory():
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def check_target_modules(settings):
    """--target-modules against the model's linear layers, before the data is encoded or the weights are loaded."""
    names = linear_layer_names(settings.model)
    unknown = sorted(set(settings.target_modules.split(",")) - names)
    if unknown:
        raise UserError(f"--target-modules: this model has no linear layer named {unknown[0]!r}; its layers are "
                        f"{', '.join(sorted(names))}")


def settings_record(settings):
    """config.json: every setting (paths as text) and the base model `auto` stood for."""
    values = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()}
    return dict(values, base_model=concrete_model(settings.model))


# ----------------------------------------------------------------------------------------------------
# Training


@dataclass
class Processes:
    """The processes training one run: one, or several started by torchrun / accelerate launch (RANK and WORLD_SIZE
    set). Each trains its share of every batch (DDP: gloo on CPUs, NCCL on GPUs); the first writes the run."""
    count: int
    is_main: bool
    barrier: object = None

    @classmethod
    def start(cls):
        count = int(os.environ.get("WORLD_SIZE", "1"))
        if count == 1:
            return cls(1, True)
        import unsloth  # noqa: F401  (before transformers, which accelerate's state may load)
        from accelerate import PartialState

        cpu = not has_cuda()  # as the Trainer sets up its processes: gloo on CPUs, NCCL on GPUs
        state = PartialState(cpu=cpu, **({"backend": "gloo"} if cpu else {}))  # the process group the Trainer then uses
        log.info("process %d of %d (%s)", state.process_index + 1, count, state.backend)
        return cls(count, state.is_main_process, state.wait_for_everyone)

    def wait_for_everyone(self):
        if self.barrier:
            self.barrier()

    @staticmethod
    def shared_work_dir(output_dir):
        return output_dir.with_name(output_dir.name + ".partial")


def train(settings, splits, work_dir, system_prompt, resume=False):
    """QLoRA on the train split; saves WORK_DIR/adapter and returns the run's metrics (val loss before and after)."""
    import torch

    model, tokenizer, model_name = load_model(settings.model, settings.max_seq_length)
    from transformers import TrainerCallback

    reader = load_intent_reader(work_dir) if settings.intent_hints else None  # written there before training
    datasets, dropped = {}, {}
    for name in ("train", "val"):
        datasets[name], dropped[name] = encode_split(tokenizer, system_prompt, splits[name], settings.max_seq_length, reader)
        if dropped[name]:
            log.warning("%s: left out %d examples longer than %d tokens", name, dropped[name], settings.max_seq_length)
    cuda = has_cuda()
    model = add_lora(model, settings, gradient_checkpointing="unsloth" if settings.gradient_checkpointing else False)

    class LossToLog(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **_):
            log.info("step %d: %s", state.global_step, json.dumps(logs))

    trainer = build_trainer(settings, model, tokenizer, datasets["train"], datasets["val"], work_dir / "checkpoints",
                            native_bf16=compute_dtype() == torch.bfloat16, padding_free=cuda, callbacks=[LossToLog()],
                            logging_dir=work_dir / "tensorboard")
    log.info("micro-batches: %d rows x %d per step, %s", settings.batch_size, settings.grad_accum,
             "padding-free" if trainer.args.padding_free else "padded")
    # LoRA's B matrices start at zero, so before training the model is exactly the base model:
    # the same code on the same val rows gives the base loss.
    base_val_loss = trainer.evaluate()["eval_loss"]
    log.info("base val loss %.4f on %d rows", base_val_loss, len(datasets["val"]))
    checkpoint = last_checkpoint(work_dir) if resume else None
    if resume:
        log.info("resuming from %s", checkpoint)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    runtime = time.time() - started
    tuned_val_loss = trainer.evaluate()["eval_loss"]
    log.info("tuned val loss %.4f (base %.4f)", tuned_val_loss, base_val_loss)

    if trainer.is_world_process_zero():  # the other processes of a multi-process run hold the same weights
        model.save_pretrained(work_dir / "adapter")
        tokenizer.save_pretrained(work_dir / "adapter")
        name_base_model(work_dir / "adapter" / "adapter_config.json", settings.model)
        shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)  # the adapter supersedes them
    steps_done = trainer.state.global_step - (int(checkpoint.name.split("-")[1]) if checkpoint else 0)
    tokens_per_step = sum(len(ids) for ids in datasets["train"]["input_ids"]) / max(1, len(datasets["train"]))
    trained_tokens = tokens_per_step * steps_done * settings.batch_size * settings.grad_accum * trainer.args.world_size
    return {
        "model": model_name,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "compute_dtype": dtype_name(compute_dtype()),
        # ATen's vector kernels (AVX512, AVX2): they round fp32 sums differently, so answers may differ in a late token
        "cpu_kernels": None if cuda else torch.backends.cpu.get_cpu_capability(),
        "batch": {"rows": settings.batch_size, "grad_accum": settings.grad_accum, "processes": trainer.args.world_size,
                  "padding_free": trainer.args.padding_free},
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


def name_base_model(adapter_config, model):
    """adapter_config.json names the base by its hub id, as PEFT's loaders elsewhere need, not by a cache path here."""
    hub_id = hub_model_id(model)
    if hub_id:
        config = json.loads(adapter_config.read_text())
        config["base_model_name_or_path"] = hub_id
        adapter_config.write_text(json.dumps(config, indent=2) + "\n")


def lora_settings(settings):
    """The LoRA hyperparameters, as both Unsloth's get_peft_model and peft's LoraConfig take them."""
    return {"r": settings.lora_r, "lora_alpha": settings.lora_alpha, "lora_dropout": settings.lora_dropout,
            "target_modules": settings.target_modules.split(","), "bias": "none"}


def add_lora(model, settings, gradient_checkpointing):
    from unsloth import FastLanguageModel

    return FastLanguageModel.get_peft_model(model, **lora_settings(settings), use_gradient_checkpointing=gradient_checkpointing,
                                            random_state=settings.seed)


def build_trainer(settings, model, tokenizer, train_dataset, eval_dataset, output_dir, native_bf16, padding_free, callbacks=(),
                  logging_dir=None, **config_overrides):
    """TRL's SFTTrainer on the pre-tokenized answer-only examples, every SFTConfig value from the run's settings;
    benchmarks/train_bench.py reuses it.

    padding_free: flatten each micro-batch into one row with per-example position ids instead of padding it (TRL's
    collator; Unsloth passes the example lengths to its attention so examples never attend to each other, which
    tests/test_finetune.py checks on the loss). Unsloth's CPU fallback turns it off; on a GPU it keeps it only
    because data.encode_split's datasets claim their length (see there); train() records what ran.
    logging_dir: where --report-to tensorboard writes (the checkpoints in output_dir are deleted after training).
    config_overrides replace SFTConfig fields.
    """
    from trl import SFTConfig, SFTTrainer

    cuda = has_cuda()
    if logging_dir is not None and settings.report_to == "tensorboard":
        # transformers 5 reads the TensorBoard folder from this variable only (else OUTPUT_DIR/runs)
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(logging_dir)
    config_values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps,
        lr_scheduler_type=settings.lr_scheduler_type,
        gradient_checkpointing=False,  # get_peft_model already set up Unsloth's own; TRL's would recompute twice
        weight_decay=settings.weight_decay,
        optim=settings.optim,
        fp16=cuda and not native_bf16,  # a T4 has no bf16
        bf16=native_bf16,
        logging_steps=settings.logging_steps,
        save_steps=settings.save_steps,
        save_total_limit=2,
        eval_strategy="no",
        seed=settings.seed,
        data_seed=settings.seed,
        report_to=settings.report_to,
        # encode_split already left out the examples over max_seq_length (and says so to Unsloth, which refills
        # max_length from the model anyway: without that claim it ran padded on the H200)
        max_length=None,
        padding_free=padding_free,
        dataset_kwargs={"skip_prepare_dataset": True},  # already tokenized, with answer-only labels
        remove_unused_columns=False,
    )
    config = SFTConfig(**dict(config_values, **config_overrides))
    # No data_collator: TRL's pads (or flattens) and keeps our labels, and a custom one would block padding-free.
    trainer = SFTTrainer(model=model, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, callbacks=list(callbacks))
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
