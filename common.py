"""What every script shares: errors that say how to fix them, files written all or nothing, JSONL, the prompt files,
and filling {{placeholders}} with a company's values. No ML library is imported here.
"""
import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
PROMPTS_DIR = REPO / "prompts"
SYSTEM_PROMPT_FILE = PROMPTS_DIR / "system.txt"
HELDOUT_FILE = PROMPTS_DIR / "heldout.jsonl"
MAX_PROMPT_CHARS = 4000
# What is built once and reused across runs: dequantized GGUF models, the intents' example answers
CACHE_DIR = Path(os.environ.get("SUPPORT_LLM_CACHE", Path.home() / ".cache" / "support-llm"))

PLACEHOLDER = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")  # Bitext slots such as {{Order Number}}
COMPANY_FILE = PROMPTS_DIR / "company.yaml"
PLACEHOLDER_TABLE = PROMPTS_DIR / "placeholders.yaml"  # every known slot name, with a generic phrase for it


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are a short usage line and the one line that matters, not the whole usage block."""

    def error(self, message):
        self.exit(2, f"usage: {self.prog} [options]  (see {self.prog} --help)\nerror: {message}\n")


def read_system_prompt(path=SYSTEM_PROMPT_FILE):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"system prompt file {path} not found: pass --system-prompt-file with an existing file")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise UserError(f"system prompt file {path} is empty: write the assistant's instructions into it")
    return text


def check_prompt(prompt, number):
    """A customer message the models can take: text, not empty, not huge, no binary bytes."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"prompt {number} is empty or not text: give every prompt some text")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(f"prompt {number} has {len(prompt)} characters, over the {MAX_PROMPT_CHARS} limit: shorten it")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in prompt):
        raise UserError(f"prompt {number} contains binary control bytes: send plain text")


def checked_prompts(items):
    """Prompt items (dicts with a 'prompt'), each checked; none at all is an error too."""
    for number, item in enumerate(items, 1):
        check_prompt(item.get("prompt"), number)
    if not items:
        raise UserError("no prompts to answer: the file is empty")
    return items


def read_prompts(path=HELDOUT_FILE, limit=None):
    """A prompts file (JSONL, a 'prompt' on every line; the held-out set by default): its first `limit` items, checked."""
    return checked_prompts(read_jsonl(path, needs=("prompt",), what="prompts file",
                                      fix="pass --prompts an existing JSONL file")[:limit])


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        problem = "is a directory" if path.is_dir() else "not found"
        raise UserError(f"company profile {path} {problem}: pass --company a YAML file (like prompts/company.yaml)")
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


def run_slot_names(run_dir):
    """The {{slot}} names in a finetune.py run's training answers: the slots its model learned to write."""
    return slot_names(read_jsonl(Path(run_dir) / "train.jsonl", needs=("response",), what="split file",
                                 fix="pass --run a complete finetune.py output dir"))


def slot_names(rows):
    """The {{slot}} names in these rows' answers."""
    return frozenset(name for row in rows for name in PLACEHOLDER.findall(row["response"]))


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


# ----------------------------------------------------------------------------------------------------
# Files: JSON and JSONL, written all or nothing


@contextlib.contextmanager
def building(target, folder=True, keep_on_error=False, fresh=True):
    """Build `target` (a folder, or a file with folder=False) as TARGET.partial and rename it into place when the block
    ends without an error, so no reader ever sees a half-written output. On an error the partial copy is removed,
    unless keep_on_error (finetune.py keeps an interrupted run for --resume); fresh=False continues an existing one."""
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    if fresh:
        remove(partial)
    if folder:
        partial.mkdir(parents=True, exist_ok=True)
    try:
        yield partial
    except BaseException:
        if not keep_on_error:
            remove(partial)
        raise
    remove(target)
    partial.rename(target)


def remove(path):
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_json(path, data):
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def write_jsonl(path, records):
    with building(path, folder=False) as partial:
        partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def read_jsonl(path, needs=(), what="JSONL file", fix="pass an existing JSONL file"):
    """One JSON object per line (blank lines skipped), each with the fields in `needs`; anything else is a one-line
    error that names the file, the line and `fix`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found: {fix}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text: re-save it as UTF-8 JSONL") from None
    items = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (ValueError, RecursionError):  # also a 5,000-digit number or 100,000 nested brackets
            raise UserError(f"{path} line {number} is not JSON: write one JSON object per line") from None
        missing = [name for name in needs if not isinstance(item, dict) or name not in item]
        if not isinstance(item, dict) or missing:
            example = ", ".join(f'"{name}": "..."' for name in needs)
            raise UserError(f"{path} line {number} has no {(missing or ['object'])[0]!r} field: each line needs {{{example}}}")
        items.append(item)
    return items


def shown_path(path):
    """A path as reports show it: relative to the repository when inside it, so no machine's folders leak into them."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
