"""The data: reading a dataset (the Bitext hub copy, a local file, or the bundled rows), the written in-scope and
out-of-scope examples, the splits, and the tokenized training examples (loss on the answer only).
"""
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common import HELDOUT_FILE, PLACEHOLDER, PROMPTS_DIR, REPO, UserError, building, read_jsonl, read_system_prompt, sha256_file
from models import chat_messages, load_tokenizer, render_chat

log = logging.getLogger(__name__)

HUB_DATASET = "bitext/Bitext-customer-support-llm-chatbot-training-dataset"
BUNDLED_DATA = REPO / "data" / "bitext_v11_bundled.csv.gz"
BUNDLED_LICENSE = REPO / "data" / "LICENSE_CDLA-Sharing-1.0.txt"
FALLBACK_FILE = PROMPTS_DIR / "fallback.jsonl"
IN_SCOPE_FILE = PROMPTS_DIR / "in_scope.jsonl"
# Sets written to score the scope guard on messages nobody had tuned it for, each scored once and then read to fix
# what it showed (docs/quality.md): no longer blind, they teach the guard (never the model) how customers and everyone
# else write. The held-out prompts and the blind sets written after them are the ones scored: nothing a run or its
# guard learns from may copy one of their prompts (copies_an_evaluated_prompt).
READ_BLIND_SETS = [PROMPTS_DIR / f"blind{number}.jsonl" for number in ("", 2, 3, 4, 5, 6, 7, 8, 9)]
# Written for the guard (29 Nov) by a writer who saw no project file: for 14 kinds of shop, 16 customer requests that
# name one of its products ("still waiting on my refund for the Oakley sunglasses") and 6 questions about its products
# or topic that are not support (a recipe, a restock); less one request about a Nintendo Switch, a business
# prompts/other_businesses.yaml names for this store. On the new stores of blind10-blind12 the guard declined 60 of
# 1,400 customers, nearly all naming a product whose topic (pet food, protein bars, a novel) reads like an off-topic
# question; learning from these (and a 2% budget, scope.MAX_IN_SCOPE_DECLINED) it declined 11. Judged once on blind13
# (toy and garden shops, kinds the file leaves out): customers declined 21 -> 10 of 670, others 292 -> 300 of 315
# (docs/quality.md, "Customers who name a product").
PRODUCT_MESSAGES_FILE = PROMPTS_DIR / "product_messages.jsonl"
GUARD_SETS = [*READ_BLIND_SETS, PRODUCT_MESSAGES_FILE]  # what the guard learns from besides the run's messages
EVALUATED_PROMPT_FILES = [HELDOUT_FILE, *(path for path in sorted(PROMPTS_DIR.glob("blind*.jsonl")) if path not in READ_BLIND_SETS)]
# Words too common to make two messages alike: "what's the meaning of life" is no copy of "what's the capital of
# Australia?". A copy shares at least half of the two messages' other words (Jaccard).
COPY_STOPWORDS = {"a", "an", "the", "of", "to", "i", "you", "my", "me", "is", "are", "what", "s", "how", "do", "can", "it",
                  "in", "for", "on", "and", "your", "hi"}
COPY_JACCARD = 0.5
MAX_CELL_CHARS = 100_000  # ~25k tokens: no training example that long fits any sensible --max-seq-length
FALLBACK_INTENT, FALLBACK_CATEGORY = "out_of_scope", "FALLBACK"
DECLINED_TYPES = ("out_of_scope", "injection")  # prompt-set types the assistant should decline; the rest are requests
NO_INTENT = "(none)"  # every row's intent with --intent-column none: one stratum, no intent metric
UNHINTED_ONE_IN = 4  # with intent hints, one in this many in-scope training rows has none (training_system_prompt)
ROLES = ("system", "user", "assistant")
FLAG_MEANINGS = {
    "B": "basic", "I": "interrogative", "C": "coordinated", "N": "negation", "M": "morphological variation",
    "L": "lexical variation", "P": "polite", "Q": "colloquial", "W": "offensive", "K": "keyword",
    "E": "abbreviation", "Z": "typo / error",
}


# ----------------------------------------------------------------------------------------------------
# Reading and checking a dataset


@dataclass(frozen=True)
class Columns:
    """Which column of the dataset holds each field (category is optional; intent "none": the data has no intents)."""
    instruction: str = "instruction"
    response: str = "response"
    intent: str = "intent"
    category: str = "category"


def load_rows(dataset, columns=Columns()):
    """Read the dataset (a hub id, a local file or 'bundled'), map its columns to instruction/response/intent/category/
    flags and validate it. Returns the rows and a label saying where they came from."""
    source = dataset
    if source == HUB_DATASET and not hub_reachable():
        log.warning("the Hugging Face hub can't be reached: using the bundled copy (%s)", BUNDLED_DATA.name)
        source = "bundled"
    if source == "bundled":
        frame, label = read_table(BUNDLED_DATA), f"bundled:{BUNDLED_DATA.name}"
    elif Path(source).suffix.lower() in FILE_SUFFIXES or Path(source).exists():
        frame, label = read_table(Path(source)), str(source)
    elif not HUB_ID.fullmatch(source):
        raise UserError(f"--dataset {source!r} is neither an existing file nor a hub id like 'org/name': check the path, "
                        "or pass 'bundled'")
    else:
        frame, label = read_hub(source), f"hub:{source}"
    frame, columns = other_formats(frame, columns)
    return validate_rows(frame, columns), label


def other_formats(frame, columns):
    """TRL's two other dataset formats as instruction/response rows, when the instruction column is absent: a `messages`
    column (conversations; multi-turn ones keep the whole conversation in a `conversation` column, trained with the loss
    on every assistant turn) or `prompt` / `completion` columns. Without an intent column their rows get none."""
    if columns.instruction in frame.columns:
        return frame, columns
    if "messages" in frame.columns:
        frame = pd.DataFrame([conversation_row(cell, number) for number, cell in enumerate(frame["messages"], 1)]).assign(
            **{name: frame[name].to_numpy() for name in frame.columns if name != "messages"})
        log.info("the dataset has a messages column: %d conversations", len(frame))
    elif {"prompt", "completion"} <= set(frame.columns):
        frame = frame.rename(columns={"prompt": "instruction", "completion": "response"})
        log.info("the dataset has prompt / completion columns: prompt -> instruction, completion -> response")
    else:
        return frame, columns
    wanted = columns.intent
    columns = Columns("instruction", "response", wanted if wanted in frame.columns else "none", columns.category)
    if columns.intent == "none":
        log.info("no %r column: the rows have no intent (no stratified split, no intent metric)", wanted)
    return frame, columns


def conversation_row(cell, number):
    """One `messages` cell (a list of {role, content}, or its JSON text in a CSV) as an instruction/response row."""
    try:
        messages = json.loads(cell) if isinstance(cell, str) else list(cell)
        messages = [{"role": str(m["role"]), "content": m["content"]} for m in messages]
    except (ValueError, TypeError, KeyError):
        raise UserError(f"row {number}: messages must be a list of {{\"role\": ..., \"content\": ...}} objects") from None
    roles = [m["role"] for m in messages]
    bad = next((m for m in messages if m["role"] not in ROLES or not isinstance(m["content"], str) or not m["content"].strip()), None)
    if bad or "user" not in roles or roles[-1] != "assistant":
        raise UserError(f"row {number}: a conversation needs user and assistant turns with text (roles {', '.join(ROLES)}), "
                        "ending with the assistant's answer")
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    # a plain user -> assistant pair is an ordinary row; one with its own system prompt or more turns keeps them all
    whole = "" if roles == ["user", "assistant"] else json.dumps(messages, ensure_ascii=False)
    return {"instruction": first_user, "response": messages[-1]["content"], "conversation": whole}


# What --dataset names as a local file, found or not (a mistyped mydata.tsv is not a hub id); a hub id is org/name.
FILE_SUFFIXES = {".csv", ".gz", ".parquet", ".jsonl", ".json", ".tsv", ".txt", ".xlsx", ".xls", ".arrow"}
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def hub_reachable():
    """Whether the Bitext dataset can be fetched, asked through the hub client (so HTTPS_PROXY and HF_ENDPOINT apply)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(HUB_DATASET, timeout=10)
        return True
    except Exception:  # no network, a proxy refusing, the hub down: all mean "use the bundled copy"
        return False


def read_hub(dataset_id):
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split="train").to_pandas()
    except Exception as error:  # datasets raises many types; all mean "could not get it"
        raise UserError(f"cannot load hub dataset {dataset_id!r} ({type(error).__name__}): "
                        "check the id, or pass a local file or 'bundled' to --dataset") from None


def read_table(path):
    if path.is_dir():
        raise UserError(f"dataset {path} is a directory: pass --dataset one .csv/.parquet/.jsonl file")
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


def validate_rows(frame, names=Columns()):
    if names.intent == "none":
        frame, names = frame.assign(**{NO_INTENT: NO_INTENT}), Columns(names.instruction, names.response, NO_INTENT, names.category)
    columns = {"instruction": names.instruction, "response": names.response, "intent": names.intent}
    for role, name in columns.items():
        if name not in frame.columns:
            fix = " (or --intent-column none if the data has no intents)" if role == "intent" else ""
            raise UserError(f"column {name!r} not found (have: {', '.join(map(str, frame.columns))}): "
                            f"pass --{role}-column with the column that holds the {role}{fix}")
    optional = {"category": names.category, "flags": "flags", **({"conversation": "conversation"} if "conversation" in frame.columns else {})}
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
# Placeholders and the written examples


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


def load_guard_sets(paths=tuple(GUARD_SETS)):
    """The messages of GUARD_SETS as (instruction, intent) rows: a plain request with the intent its writer meant,
    an out-of-scope message or an injection with FALLBACK_INTENT; a message in two sets once ("tell me a joke")."""
    items = [item for path in paths for item in read_jsonl(path, needs=("prompt", "type", "expected_intent"),
                                                           what="guard set", fix="restore it from git")]
    frame = pd.DataFrame({"instruction": [item["prompt"].strip() for item in items],
                          "intent": [FALLBACK_INTENT if item["type"] in DECLINED_TYPES else item["expected_intent"]
                                     for item in items]}).drop_duplicates("instruction", ignore_index=True)
    # 66 of 1,966 ("I forgot my password", "What's your refund policy?") are evaluated prompts in other words
    return frame[~np.array(copies_an_evaluated_prompt(frame["instruction"]))].reset_index(drop=True)


def guard_sets_for(in_scope):
    """load_guard_sets() for a run that has the written in-scope messages (in_scope), None for one without them: the
    guard sets are customers' words too, and come with those."""
    return None if in_scope is None else load_guard_sets()


def content_words(text):
    return set(re.findall(r"[a-z0-9]+", text.lower())) - COPY_STOPWORDS


def copies_an_evaluated_prompt(messages, paths=tuple(EVALUATED_PROMPT_FILES)):
    """For each message, whether it shares COPY_JACCARD of its content words with a prompt of the evaluated sets."""
    evaluated = [content_words(item["prompt"]) for path in paths
                 for item in read_jsonl(path, needs=("prompt",), what="prompt set", fix="restore it from git")]

    def closest(words):
        return max(len(words & other) / max(1, len(words | other)) for other in evaluated)
    return [closest(content_words(message)) >= COPY_JACCARD for message in messages]


def read_written_examples(path, what, fields, fix):
    items = read_jsonl(path, needs=fields, what=f"{what} file", fix=f"pass {fix}")
    for number, item in enumerate(items, 1):
        if not all(isinstance(item[name], str) and item[name].strip() for name in fields):
            raise UserError(f"{path} example {number} needs text in {' and '.join(map(repr, fields))}: fix or delete it")
    if not items:
        raise UserError(f"{what} file {path} has no examples: add some, or pass {fix}")
    return pd.DataFrame([{name: item[name].strip() for name in fields} for item in items])


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
# Splits


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


def make_splits(rows, fallback=None, in_scope=None, *, val_ratio=0.05, test_ratio=0.05, seed=42, subset=None,
                subset_sampling="balanced", fallback_ratio=0.0):
    """Train / val / test: stratified by intent, a `subset` of training rows (val and test shrink in proportion), the
    written in-scope messages' train pool added to train, and `fallback_ratio` of out-of-scope examples in each split."""
    splits = split_by_intent(rows, val_ratio, test_ratio, seed)
    if subset is not None:
        if subset > len(splits["train"]):
            raise UserError(f"--subset {subset} is larger than the {len(splits['train'])} training rows: use a smaller number")
        train_share = 1 - val_ratio - test_ratio
        sample = balanced_sample if subset_sampling == "balanced" else stratified_sample
        splits["train"] = sample(splits["train"], subset, seed)
        for name, ratio in (("val", val_ratio), ("test", test_ratio)):
            splits[name] = sample(splits[name], math.ceil(subset * ratio / train_share), seed)
    if in_scope is not None:  # the train pool only: the val and test pools are the guard's, with no answers to score
        written = borrow_responses(example_pools(in_scope, seed)["train"], splits["train"], seed)
        splits["train"] = pd.concat([splits["train"], written]).sample(frac=1, random_state=seed).reset_index(drop=True)
    if fallback is not None and fallback_ratio > 0:
        pools = example_pools(fallback, seed)
        for name, split in splits.items():
            wanted = max(1, round(len(split) * fallback_ratio / (1 - fallback_ratio)))
            extra = pools[name].head(wanted)
            splits[name] = pd.concat([split, extra]).sample(frac=1, random_state=seed).reset_index(drop=True)
    return splits


def guard_messages(splits, fallback, in_scope, seed, guard_sets=None):
    """The scope guard's messages of each split, {split: [text]} in scope and out of scope: the run's in-scope
    instructions (with the written in-scope pool of each split) against the whole out-of-scope pool of each split, and
    the messages of GUARD_SETS (load_guard_sets; their requests of intents the run has) cut into pools the same
    way. The guard is not limited by --fallback-ratio, which sets the model's mixture."""
    inside = {name: split.loc[split["intent"] != FALLBACK_INTENT, "instruction"].tolist() for name, split in splits.items()}
    if in_scope is not None:
        for name, pool in example_pools(in_scope, seed).items():
            if name != "train":  # the train pool is in the train split already
                inside[name] += pool["instruction"].tolist()
    outside = {name: pool["instruction"].tolist() for name, pool in example_pools(fallback, seed).items()}
    if guard_sets is not None:
        declined = guard_sets["intent"] == FALLBACK_INTENT
        requests = guard_sets[~declined & guard_sets["intent"].isin(splits["train"]["intent"])]
        for name, pool in example_pools(requests, seed).items():
            inside[name] += pool["instruction"].tolist()
        for name, pool in example_pools(guard_sets[declined], seed).items():
            outside[name] += pool["instruction"].tolist()
    return inside, outside


def example_pools(examples, seed):
    """Written examples cut into disjoint train / val / test pools: the val and test ones are never trained on."""
    pool = examples.sample(frac=1, random_state=seed).reset_index(drop=True)
    n_eval = max(1, round(len(pool) * 0.15))
    return {"val": pool[:n_eval], "test": pool[n_eval:2 * n_eval], "train": pool[2 * n_eval:]}


def is_bitext(source_label, intents):
    """Whether a run's rows are Bitext's (the hub dataset, the bundled copy, or a local file whose intents are all
    Bitext intents), so its card must carry Bitext's CDLA-Sharing notice."""
    if source_label.startswith("bundled:") or source_label == f"hub:{HUB_DATASET}":
        return True
    known = set(read_table(BUNDLED_DATA)["intent"]) | {FALLBACK_INTENT}
    return bool(intents) and set(intents) <= known


def intent_balance(rows):
    """How the rows share out among intents: the bundled copy gives ~1,000 rows each to 5 of its 27 intents."""
    counts = rows["intent"].value_counts()
    return {"rows": len(rows), "intents": len(counts), "rows_per_intent_min": int(counts.min()),
            "rows_per_intent_median": float(counts.median()), "rows_per_intent_max": int(counts.max()),
            "largest_5_intents_share": round(float(counts.head(5).sum() / len(rows)), 3)}


def describe_balance(balance):
    return (f"{balance['rows']:,} rows, {balance['intents']} intents, {balance['rows_per_intent_min']}-"
            f"{balance['rows_per_intent_max']:,} rows per intent (median {balance['rows_per_intent_median']:g}); the 5 "
            f"largest intents hold {balance['largest_5_intents_share']:.0%}")


def split_manifest(splits, files, source_label, rows):
    return {
        "source": source_label,
        "source_balance": intent_balance(rows),
        "source_rows_sha256": hashlib.sha256(rows.to_json(orient="records", lines=True).encode()).hexdigest(),
        "splits": {
            name: {"rows": len(split), "sha256": sha256_file(files[name]),
                   "per_intent": split["intent"].value_counts().sort_index().to_dict()}
            for name, split in splits.items()
        },
    }


# ----------------------------------------------------------------------------------------------------
# Tokenized examples: the loss covers the assistant answer and its end token, nothing else


def encode_example(tokenizer, system_prompt, instruction, response):
    return encode_conversation(tokenizer, chat_messages(system_prompt, instruction, response))


def encode_row(tokenizer, system_prompt, row, reader=None):
    """A row as a training example: its conversation when it has one (with the system prompt unless it brings its own),
    else system prompt (with the row's intent hint when trained with intent hints, the run's scope.IntentReader
    `reader`: training_system_prompt) / instruction / response."""
    conversation = getattr(row, "conversation", "")
    if not isinstance(conversation, str) or not conversation:  # none, or a row mixed in from the written examples (NaN)
        system_prompt = training_system_prompt(system_prompt, row, reader) if reader else system_prompt
        return encode_example(tokenizer, system_prompt, row.instruction, row.response)
    messages = json.loads(conversation)
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return encode_conversation(tokenizer, messages)


def training_system_prompt(system_prompt, row, reader):
    """The system prompt with the row's intent hint and the reader's example answer of that intent (the prompt the
    reader gives a message of that intent: scope.IntentReader.system_prompt), but for one in UNHINTED_ONE_IN of
    the in-scope rows (by their message's CRC-32, the same rows in every run) and every out-of-scope or intent-less row:
    the tuned model also learns to answer without a hint, as in a chat with the GGUF whose system prompt is fixed."""
    if row.intent in (FALLBACK_INTENT, NO_INTENT) or zlib.crc32(row.instruction.encode()) % UNHINTED_ONE_IN == 0:
        return system_prompt
    return reader.system_prompt(system_prompt, row.intent)


def encode_conversation(tokenizer, messages):
    """Token ids of a conversation rendered with the model's chat template, with the loss on every assistant turn and its
    end token only. Each turn's text is what the template adds for it, so the template must render every earlier part
    of the conversation the same way (Llama 3 and ChatML do)."""
    ids, labels, done = [], [], ""  # done: the text encoded so far
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:turn], add_generation_prompt=True)
        full = render_chat(tokenizer, messages[:turn + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError("the chat template renders a conversation's earlier turns differently as it grows: "
                            "this model's template is not supported for answer-only loss")
        answer = full[len(prompt):]
        # Stop right after the end token: ChatML adds a newline that belongs to the next turn.
        answer = answer[: answer.rindex(tokenizer.eos_token) + len(tokenizer.eos_token)]
        # The templates write the BOS token themselves, so no tokenizer-added specials (no double BOS).
        context_ids = tokenizer(prompt[len(done):], add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids += context_ids + answer_ids
        labels += [-100] * len(context_ids) + answer_ids
        done = prompt + answer
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def encode_split(tokenizer, system_prompt, split, max_seq_length, reader=None):
    """Encode a split (with intent hints, the run's IntentReader `reader`: encode_row); examples over max_seq_length are
    left out, since truncation would cut the end token."""
    from datasets import Dataset

    encoded = [encode_row(tokenizer, system_prompt, r, reader) for r in split.itertuples()]
    kept = [e for e in encoded if len(e["input_ids"]) <= max_seq_length]
    if not kept:
        raise UserError(f"every example is longer than --max-seq-length {max_seq_length}: raise it")
    dataset = Dataset.from_list(kept)
    # Unsloth's own hook for pre-tokenized data: without this claim it refills max_length from the model and, as the
    # dataset can't be truncated there, silently turns padding-free off (what ran on the H200, 27 Nov: BENCHMARKS.md)
    dataset._unsloth_truncated_to = max_seq_length
    return dataset, len(encoded) - len(kept)


# ----------------------------------------------------------------------------------------------------
# finetune.py --inspect: a report on the data


def inspect_data(rows, source_label, model, system_prompt_file, max_seq_length, report_dir):
    """Write REPORT_DIR/report.md and plots: counts, lengths, placeholders, flags, duplicates; lengths in the tokens of
    `model`, with the system prompt of `system_prompt_file`."""
    stats = data_stats(rows, load_tokenizer(model), read_system_prompt(system_prompt_file))
    with building(report_dir) as partial:
        plot_data(rows, stats, max_seq_length, partial)
        report = data_report(rows, stats, source_label, max_seq_length, model, system_prompt_file)
        (partial / "report.md").write_text(report, encoding="utf-8")
    log.info("wrote %s: %d rows, %d intents, %d categories, %d placeholders, %d duplicates, %d over max length",
             report_dir / "report.md", len(rows), rows["intent"].nunique(), rows["category"].nunique(),
             len(stats["placeholders"]), stats["duplicates"], sum(n > max_seq_length for n in stats["rendered"]))


def data_stats(rows, tokenizer, system_prompt):
    """Lengths in characters and tokens, rendered example lengths, placeholder and flag counts, duplicates."""
    lengths = pd.DataFrame({
        "instruction_chars": rows["instruction"].str.len(),
        "response_chars": rows["response"].str.len(),
        "instruction_tokens": [len(ids) for ids in tokenizer(rows["instruction"].tolist(), add_special_tokens=False)["input_ids"]],
        "response_tokens": [len(ids) for ids in tokenizer(rows["response"].tolist(), add_special_tokens=False)["input_ids"]],
    })
    rendered = [len(encode_row(tokenizer, system_prompt, r)["input_ids"]) for r in rows.itertuples()]
    placeholders = pd.Series([m for text in pd.concat([rows["instruction"], rows["response"]])
                              for m in PLACEHOLDER.findall(text)]).value_counts()
    flag_counts = pd.Series([c for flags in rows["flags"] for c in flags]).value_counts()
    duplicates = int(rows.duplicated(["instruction", "response"]).sum())
    duplicate_instructions = int(rows.duplicated(["instruction"]).sum())
    return {"lengths": lengths, "rendered": rendered, "placeholders": placeholders, "flag_counts": flag_counts,
            "duplicates": duplicates, "duplicate_instructions": duplicate_instructions,
            "tokenizer": type(tokenizer).__name__}


def plot_data(rows, stats, max_seq_length, folder):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, rendered, partial = stats["lengths"], stats["rendered"], folder
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
    ax.axvline(max_seq_length, color="black", linestyle="--", label=f"--max-seq-length {max_seq_length}")
    ax.set(title="Rendered example length (system + user + assistant)", xlabel="tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(partial / "rendered_lengths.png", dpi=100)
    plt.close("all")


def data_report(rows, stats, source_label, max_seq_length, model, system_prompt_file):
    lengths, rendered, placeholders = stats["lengths"], stats["rendered"], stats["placeholders"]
    too_long = sum(n > max_seq_length for n in rendered)

    def table(series, key, value):
        return "\n".join([f"| {key} | {value} |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in series.items()])

    summary = lengths.describe(percentiles=[0.5, 0.95]).T[["mean", "min", "50%", "95%", "max"]].round(1)
    describe = "\n".join(["| | mean | min | median | p95 | max |", "|---|---:|---:|---:|---:|---:|"]
                         + [f"| {name} | " + " | ".join(f"{v:g}" for v in values) + " |" for name, values in summary.iterrows()])
    return f"""# Data report

- Source: `{source_label}`
- Rows: **{len(rows)}**; intents: **{rows['intent'].nunique()}**; categories: **{rows['category'].nunique()}**
- Tokenizer: `{model}` ({stats['tokenizer']}); rendered with `{system_prompt_file}` as system prompt
- Rendered examples longer than `--max-seq-length {max_seq_length}`: **{too_long}** (left out of training)
- Exact duplicates (instruction and response): **{stats['duplicates']}**; repeated instructions: **{stats['duplicate_instructions']}**
- Distinct placeholders: **{len(placeholders)}** ({int(placeholders.sum())} occurrences)

## Lengths (characters and tokens)

{describe}

Rendered example tokens: mean {np.mean(rendered):.0f}, 95th percentile {np.percentile(rendered, 95):.0f}, max {max(rendered)}.

![lengths](lengths.png)
![rendered lengths](rendered_lengths.png)

## Rows per intent

{table(rows["intent"].value_counts(), "intent", "rows")}

![intents](intents.png)

## Rows per category

{table(rows['category'].value_counts(), "category", "rows")}

## Placeholders

{table(placeholders.rename(lambda name: f"`{{{{{name}}}}}`"), "placeholder", "occurrences")}

## Language-variation flags

Bitext tags each instruction with letters; a row can carry several. Rows without flags: {int((rows['flags'] == '').sum())}.

{table(stats['flag_counts'].rename(lambda c: f"{c} ({FLAG_MEANINGS.get(c, 'unknown')})"), "flag", "rows")}
"""
