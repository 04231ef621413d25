"""finetune.py and what it runs (data.py, training.py): loading and validation, split, placeholders, formatting and
label masking, settings and config files, end to end."""
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data
import finetune
import scope
import training
from common import PLACEHOLDER, UserError, load_placeholder_table
from conftest import REPO, SHARED, assert_user_error, readme_command, run_script
from models import TEMPLATE_DATE, load_tokenizer, render_chat, resolve_model, run_name

SHAPE_3B = SHARED / "models" / "llama-3.2-3b-instruct-shape"


def settings_for(*argv):
    return finetune.parse_args(list(argv))[0]


# ----------------------------------------------------------------------------------------------------
# Data in


def test_bundled_copy_has_all_intents_and_its_license(bundled_rows):
    assert len(bundled_rows) == 5398
    assert list(bundled_rows.columns) == ["flags", "instruction", "category", "intent", "response"]
    assert bundled_rows["intent"].nunique() == 27 and bundled_rows["category"].nunique() == 11
    assert "CDLA-Sharing-1.0" in (REPO / "data" / "README.md").read_text()
    assert "Community Data License Agreement" in data.BUNDLED_LICENSE.read_text()


def test_other_column_names_are_mapped(tmp_path):
    path = tmp_path / "faq.jsonl"
    records = [{"question": f"q{i}", "answer": f"a{i}", "label": "x" if i % 2 else "y"} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in records))
    rows, label = data.load_rows(str(path), data.Columns(instruction="question", response="answer", intent="label"))
    assert label == str(path)
    assert rows.loc[0, ["instruction", "response", "intent", "category"]].tolist() == ["q0", "a0", "y", "UNKNOWN"]


def test_bom_and_crlf_csv_load(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfinstruction,response,intent\r\nhi,hello,greet\r\nbye,ciao,greet\r\n")
    rows, _ = data.load_rows(str(path))
    assert rows["instruction"].tolist() == ["hi", "bye"] and rows["response"].tolist() == ["hello", "ciao"]


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00", "not UTF-8"),
    (b"question,answer,label\nhi,hello,greet\n", "pass --instruction-column"),
    (b"instruction,intent\nhi,greet\n", "pass --response-column"),
    (b"instruction,response,intent\n  ,hello,greet\n", "empty instruction"),
    (b"instruction,response,intent\nhi,\"" + b"x" * 1_048_576 + b"\",greet\n", "over the 100,000 limit"),
    (b"instruction,response,intent\nhi,,greet\n", "empty response"),
    (b"instruction,response,intent\nhi,h\xe9llo,greet\n", "not UTF-8"),
    (b"", "is empty"),
    (b"instruction,response,intent,response\nhi,a,greet,b\n", "repeats the column 'response'"),
])
def test_bad_dataset_file_gives_one_line_error(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_bytes(content)
    result = run_script("finetune.py", "--dataset", path, "--output-dir", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


DATASET_SUFFIXES = st.sampled_from([".csv", ".csv.gz", ".jsonl", ".json", ".parquet"])
CELL = st.one_of(st.text(max_size=20), st.integers(), st.floats(), st.none(), st.booleans(), st.lists(st.integers(), max_size=2))
ROWS = st.lists(st.dictionaries(st.sampled_from(["instruction", "response", "intent", "category", "flags", "extra"]),
                                CELL, max_size=6), max_size=5)


def load_or_user_error(tmp_path, content, suffix):
    """Loading a dataset file either works or stops with a one-line UserError; anything else is a bug."""
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(content)
    try:
        rows, _ = data.load_rows(str(path))
    except UserError as error:
        assert "\n" not in str(error)
    else:
        assert len(rows) and set(rows.columns) >= {"instruction", "response", "intent"}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=400), suffix=DATASET_SUFFIXES)
def test_fuzz_dataset_loader_with_random_bytes(tmp_path, content, suffix):
    load_or_user_error(tmp_path, content, suffix)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=ROWS, suffix=st.sampled_from([".csv", ".jsonl", ".json"]))
def test_fuzz_dataset_loader_with_structured_garbage(tmp_path, rows, suffix):
    if suffix == ".csv":
        content = pd.DataFrame(rows).to_csv(index=False).encode()
    elif suffix == ".jsonl":
        content = "\n".join(json.dumps(row) for row in rows).encode()
    else:
        content = json.dumps(rows).encode()
    load_or_user_error(tmp_path, content, suffix)


def test_non_text_values_are_rejected(tmp_path):
    path = tmp_path / "typed.jsonl"
    path.write_text('{"instruction": "hi", "response": 42, "intent": "greet"}\n')
    with pytest.raises(UserError, match="must hold text.*row 1"):
        data.load_rows(str(path))


@pytest.mark.parametrize("flags, message", [
    (["--subset", "0"], "--subset must be a positive"),
    (["--learning-rate", "0"], "--learning-rate must be > 0"),
    (["--max-seq-length", "16"], "--max-seq-length must be at least 32"),
    (["--placeholders", "shout"], "invalid choice"),
    (["--max-steps", "0"], "--max-steps must be >= 1, or -1"),
    (["--warmup-steps", "-3"], "--warmup-steps and --weight-decay must be >= 0"),
    (["--batch-size", "0"], "--batch-size takes auto or a number"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--dataset", "mydata.tsv"], "dataset file mydata.tsv not found"),  # a mistyped local file is not a hub id
    (["--dataset", "no-slash-no-file"], "is neither an existing file nor a hub id"),
    (["--dataset", "tests"], "is a directory: pass --dataset one"),
])
def test_bad_flags_exit_2(flags, message):
    """One `error:` line after a one-line usage hint, never argparse's whole usage block or a traceback."""
    result = run_script("finetune.py", *flags)
    assert_user_error(result, message)
    assert len(result.stderr.strip().splitlines()) <= 2, result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--model", "someorg/no-such-model"], "cannot load model 'someorg/no-such-model'"),  # offline: no hub
    (["--target-modules", "q_proj,foo_proj"], "no linear layer named 'foo_proj'; its layers are down_proj"),
])
def test_bad_model_flags_fail_before_training(flags, message, small_csv):
    assert_user_error(run_script("finetune.py", "--dataset", small_csv, "--dry-run", *flags), message)


def test_too_few_rows_is_an_error_and_few_rows_a_warning(bundled_rows, tmp_path):
    bundled_rows.head(1).to_csv(tmp_path / "one.csv", index=False)
    assert_user_error(run_script("finetune.py", "--dataset", tmp_path / "one.csv"), "has 1 distinct rows: a run needs at least 10")
    bundled_rows.head(30).to_csv(tmp_path / "thirty.csv", index=False)
    result = run_script("finetune.py", "--dataset", tmp_path / "thirty.csv", "--subset", "1000")  # stops at the split
    assert "WARNING: only 30 rows for" in result.stdout, result.stdout


def resolved(*argv, cuda=False, gpu_memory=16 * 2**30):
    return training.resolve_auto(settings_for(*argv), cuda, gpu_memory_bytes=gpu_memory if cuda else None)


def test_auto_settings_depend_on_the_model_and_the_device():
    assert resolved("--model", "smollm2").learning_rate == training.SMOLLM2_LEARNING_RATE == 1e-3
    assert resolved("--model", "unsloth/Llama-3.2-3B-Instruct").learning_rate == training.GPU_LEARNING_RATE == 2e-4
    assert resolved("--model", "smollm2", "--learning-rate", "5e-5").learning_rate == 5e-5
    cpu, gpu = resolved("--model", "smollm2"), resolved("--model", "smollm2", cuda=True)
    assert (cpu.optim, cpu.gradient_checkpointing, gpu.optim, gpu.gradient_checkpointing) == ("adamw_torch", False, "adamw_8bit", True)
    assert resolved("--model", "smollm2", "--optim", "adafactor", cuda=True).optim == "adafactor"


def test_subset_larger_than_the_data_is_an_error(small_csv, tmp_path):
    result = run_script("finetune.py", "--dataset", small_csv, "--subset", "1000", "--output-dir", tmp_path / "out")
    assert result.returncode == 2 and "is larger than the" in result.stderr


def test_offline_default_falls_back_to_bundled_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows, label = data.load_rows(settings_for().dataset)
    assert label.startswith("bundled:") and len(rows) == 5398


OWN_DATA = REPO / "tests" / "data"


def test_other_dataset_formats_become_instruction_response_rows():
    plain, label = data.load_rows(str(OWN_DATA / "own_data.csv"), data.Columns("question", "answer", "none"))
    assert len(plain) == 10 and set(plain["intent"]) == {data.NO_INTENT} and label.endswith("own_data.csv")
    with pytest.raises(UserError, match="--intent-column none"):
        data.load_rows(str(OWN_DATA / "own_data.csv"), data.Columns("question", "answer"))
    pairs, _ = data.load_rows(str(OWN_DATA / "prompt_completion.jsonl"))
    assert pairs["instruction"].tolist() == plain["instruction"].tolist() and pairs["response"].tolist() == plain["response"].tolist()
    chats, _ = data.load_rows(str(OWN_DATA / "messages.jsonl"))
    assert chats["instruction"].tolist() == plain["instruction"].tolist() and set(chats["intent"]) == {data.NO_INTENT}
    kinds = [len(json.loads(c)) if c else 0 for c in chats["conversation"]]  # 0: a plain pair; 3: own system prompt; 4 turns
    assert kinds[:3] == [0, 3, 4]


@pytest.mark.parametrize("messages, message", [
    ('[{"role": "user", "content": "hi"}]', "ending with the assistant's answer"),
    ('[{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]', "roles system, user, assistant"),
    ('"just text"', "messages must be a list of"),
])
def test_bad_conversations(tmp_path, messages, message):
    path = tmp_path / "chats.jsonl"
    path.write_text('{"messages": ' + messages + '}\n')
    with pytest.raises(UserError, match=message):
        data.load_rows(str(path))


def test_loss_is_on_every_assistant_turn(llama_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is my parcel?"},
                {"role": "assistant", "content": "It ships today."}, {"role": "user", "content": "And the invoice?"},
                {"role": "assistant", "content": "It is in your account."}]
    example = data.encode_conversation(llama_tokenizer, messages)
    trained = [i for i, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert llama_tokenizer.decode(trained) == "It ships today.<|eot_id|>It is in your account.<|eot_id|>"
    assert example["labels"][: len(example["labels"]) // 2].count(-100) > 20  # the system turn and the first question
    rendered = llama_tokenizer.decode(example["input_ids"])
    assert rendered == render_chat(llama_tokenizer, messages)  # the pieces add up to the template's own rendering


def test_intent_hints_go_into_three_of_four_in_scope_examples(bundled_rows, llama_tokenizer):
    """With intent hints, an in-scope row's system prompt ends with its intent and the reader's example answer of that
    intent, but for one in four (the same rows every time, so the model also learns to answer without one);
    out-of-scope and intent-less rows never get one."""
    rows = bundled_rows.drop_duplicates(["instruction", "response"])
    intents = sorted(set(rows["intent"]))
    reader = scope.IntentReader(intents, [[0.0] * scope.EMBEDDING_SIZE] * len(intents), [0.0] * len(intents),
                                examples={intent: f"Here is how to {intent}." for intent in intents})
    hinted = [data.training_system_prompt("Be kind.", row, reader) != "Be kind." for row in rows.itertuples()]
    assert 0.72 < sum(hinted) / len(hinted) < 0.78
    row = next(r for r, h in zip(rows.itertuples(), hinted) if h)
    assert data.training_system_prompt("Be kind.", row, reader) == (
        f"Be kind.\nThe customer's message is about: {row.intent.replace('_', ' ')}.\n"
        f"An answer to such a message: Here is how to {row.intent}.")
    example = llama_tokenizer.decode(data.encode_row(llama_tokenizer, "Be kind.", row, reader)["input_ids"])
    assert "message is about" in example and f"Here is how to {row.intent}." in example
    assert "message is about" not in llama_tokenizer.decode(data.encode_row(llama_tokenizer, "Be kind.", row)["input_ids"])
    for intent in (data.FALLBACK_INTENT, data.NO_INTENT):
        assert data.training_system_prompt("Be kind.", row._replace(intent=intent), reader) == "Be kind."


@pytest.mark.parametrize("file, flags", [
    ("messages.jsonl", []),
    ("own_data.csv", ["--instruction-column", "question", "--response-column", "answer", "--intent-column", "none"]),
])
def test_own_data_trains_and_evaluates(tiny_llama, tmp_path, file, flags):
    run = tmp_path / "run"
    result = run_script("finetune.py", "--dataset", OWN_DATA / file, *flags, "--model", tiny_llama, "--max-steps", "2",
                        "--output-dir", run, "--no-compare", "--no-guard", "--no-in-scope-examples")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING: only 10 rows for 1 intents" in result.stdout
    assert not json.loads((run / "config.json").read_text())["intent_hints"] and not (run / "intents.json").exists()
    result = run_script("infer.py", "--run", run, "--compare", "--limit", "3", "--max-new-tokens", "4", "--report-dir", tmp_path / "eval")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["classifier_heldout_accuracy"] is None and "placeholder_validity" in summary["differences"]
    assert "intent_accuracy" not in summary["differences"]
    assert "has no intents" in (tmp_path / "eval" / "report.md").read_text()


# ----------------------------------------------------------------------------------------------------
# Split


def test_split_is_stratified_disjoint_and_seeded(bundled_rows):
    rows = data.validate_rows(bundled_rows)
    splits = data.split_by_intent(rows, 0.05, 0.05, seed=42)
    assert sum(map(len, splits.values())) == len(rows)
    keys = {name: set(zip(s["instruction"], s["response"])) for name, s in splits.items()}
    assert not (keys["train"] & keys["val"] or keys["train"] & keys["test"] or keys["val"] & keys["test"])
    for name, split in splits.items():
        assert split["intent"].nunique() == 27, name  # every intent has >= 9 rows here
    assert 0.04 < len(splits["val"]) / len(rows) < 0.07
    again = data.split_by_intent(rows, 0.05, 0.05, seed=42)
    assert again["test"].equals(splits["test"])
    assert not data.split_by_intent(rows, 0.05, 0.05, seed=7)["test"].equals(splits["test"])


def test_subset_and_fallback_mixing(bundled_rows):
    rows = data.validate_rows(bundled_rows)
    splits = data.make_splits(rows, data.load_fallback(data.FALLBACK_FILE), subset=500, fallback_ratio=0.1)
    bitext = {name: s[s["intent"] != data.FALLBACK_INTENT] for name, s in splits.items()}
    assert len(bitext["train"]) == 500 and bitext["train"]["intent"].nunique() == 27
    assert len(bitext["val"]) == len(bitext["test"]) == 28  # ceil(500 * 5 / 90)
    assert bitext["val"]["intent"].nunique() == bitext["test"]["intent"].nunique() == 27
    # balanced: an intent with fewer training rows than its share (500 / 27) gives them all, the big ones fill up
    available = data.split_by_intent(rows, 0.05, 0.05, 42)["train"]["intent"].value_counts()
    counts = bitext["train"]["intent"].value_counts()
    assert all(counts[i] == min(available[i], counts.max()) or counts[i] == counts.max() - 1 for i in counts.index), counts
    assert counts["delete_account"] == available["delete_account"] and counts.max() <= 28
    fallback = {name: set(s.loc[s["intent"] == data.FALLBACK_INTENT, "instruction"]) for name, s in splits.items()}
    assert len(fallback["train"]) == 56  # --fallback-ratio 0.1: 56 of 556
    assert fallback["val"] and fallback["test"]
    assert not (fallback["train"] & fallback["val"] or fallback["train"] & fallback["test"] or fallback["val"] & fallback["test"])
    proportional = data.make_splits(rows, subset=500, subset_sampling="proportional")
    assert data.make_splits(rows, data.load_fallback(data.FALLBACK_FILE), subset=500)[
        "train"]["intent"].ne(data.FALLBACK_INTENT).all()  # the default: no refusals in the model's training
    assert proportional["train"]["intent"].value_counts().iloc[0] > 80  # the 1,000-row intents dominate, as in the data


def test_written_in_scope_examples_join_train_with_answers_of_their_intent(bundled_rows):
    rows = data.validate_rows(bundled_rows)
    written = data.load_in_scope(data.IN_SCOPE_FILE)
    assert len(written) >= 27 * 8 and written["intent"].value_counts().ge(8).all() and written["intent"].nunique() == 27
    splits = data.make_splits(rows, None, written, subset=500)
    added = splits["train"][splits["train"]["instruction"].isin(written["instruction"])]
    assert len(added) == len(written) - 2 * round(len(written) * 0.15)  # the train pool; val and test pools are the guard's
    assert not splits["val"]["instruction"].isin(written["instruction"]).any()
    bitext_answers = set(zip(rows["intent"], rows["response"]))
    assert all((r.intent, r.response) in bitext_answers for r in added.itertuples())


def test_training_messages_are_not_copies_of_held_out_or_blind_prompts():
    assert len(data.EVALUATED_PROMPT_FILES) == 12 and len(data.GUARD_SETS) == 10  # held-out, blind10-blind20; 9 read sets and the product messages
    written = [data.load_in_scope(data.IN_SCOPE_FILE), data.load_fallback(data.FALLBACK_FILE), data.load_guard_sets()]
    messages = pd.concat(written)["instruction"].tolist()
    assert [m for m, copy in zip(messages, data.copies_an_evaluated_prompt(messages)) if copy] == []
    assert data.copies_an_evaluated_prompt(["where's my order??", "What is the capital of Australia", "refund policy pls"]) == [True] * 3
    assert data.copies_an_evaluated_prompt(["what's the meaning of life", "the refund for my boots never came"]) == [False] * 2


def test_fixed_fallback_answers_are_the_guard_s_reply():
    import scope

    written = data.load_fallback(data.FALLBACK_FILE)
    fixed = data.load_fallback(data.FALLBACK_FILE, scope.read_fallback_reply())
    assert fixed["instruction"].equals(written["instruction"]) and written["response"].nunique() > 150
    assert set(fixed["response"]) == {scope.read_fallback_reply()}


def test_fallback_file_covers_the_required_topics():
    lines = [json.loads(line) for line in data.FALLBACK_FILE.read_text().splitlines()]
    topics = {line["topic"] for line in lines}
    assert len(lines) >= 60
    assert {"weather", "joke", "coding", "medical", "legal", "politics", "other_company", "chit_chat", "abuse",
            "prompt_injection"} <= topics
    assert not any("{{" in line["response"] for line in lines)


# ----------------------------------------------------------------------------------------------------
# Placeholders


def test_generic_table_covers_every_placeholder_in_the_data(bundled_rows):
    table = load_placeholder_table()
    used = {name for text in pd.concat([bundled_rows["instruction"], bundled_rows["response"]])
            for name in PLACEHOLDER.findall(text)}
    assert used <= set(table), used - set(table)


@pytest.mark.parametrize("mode, expected", [
    ("keep", "Visit '{{Online Order Interaction}}' for order {{Order Number}}, or call {{Customer Support Phone Number}}."),
    ("generic", "Visit 'Order History' for order your order number, or call our customer support phone line."),
    ("strip", "Visit for order, or call."),
])
def test_placeholder_modes(mode, expected):
    text = "Visit '{{Online Order Interaction}}' for order {{Order Number}}, or call {{Customer Support Phone Number}}."
    assert data.apply_placeholders(text, mode, load_placeholder_table()) == expected


def test_strip_leaves_no_orphans():
    text = ('Steps:\n1. Open "{{Online Order Interaction}}" now.\n2. {{Cancel Purchase}}\n3. Done ({{Order Number}}) .\n'
            "Dear {{Salutation}} {{Client Last Name}}, thanks.")
    stripped = data.strip_placeholders(text)
    assert stripped == "Steps:\n1. Open now.\n3. Done.\nDear, thanks."
    assert "  " not in stripped and '""' not in stripped and "()" not in stripped


def test_batch_size_auto_keeps_eight_rows_a_step_and_fits_the_card():
    llama_3b, t4, h200 = training.LLAMA_3B_SHAPE, 15 * 2**30, 141 * 10**9
    assert training.auto_batch_size(t4, 1024, llama_3b) == training.ROWS_PER_STEP == 8
    assert training.auto_batch_size(t4, 4096, llama_3b) == 2  # 8 rows of 4,096 tokens would not fit a T4
    assert training.auto_batch_size(h200, 4096, llama_3b) == 8
    assert training.auto_batch_size(4 * 2**30, 1024, llama_3b) == 1
    assert training.model_shape(SHAPE_3B) == llama_3b  # read from the model's config.json
    cpu = resolved("--model", "smollm2")
    long_t4 = resolved("--model", str(SHAPE_3B), "--max-seq-length", "4096", cuda=True, gpu_memory=t4)
    assert (cpu.batch_size, cpu.grad_accum, long_t4.batch_size, long_t4.grad_accum) == (2, 4, 2, 4)
    assert (resolved("--model", str(SHAPE_3B), cuda=True, gpu_memory=h200).batch_size, cpu.output_dir.name) == (8, "smollm2")
    given = resolved("--batch-size", "4"), resolved("--batch-size", "4", "--grad-accum", "3")
    assert [(g.batch_size, g.grad_accum) for g in given] == [(4, 2), (4, 3)]
    with pytest.raises(UserError, match="--batch-size takes auto or a number"):
        settings_for("--batch-size", "lots")


def test_run_dir_is_named_after_the_whole_model_id(tiny_llama):
    assert resolved("--model", "unsloth/Llama-3.2-3B-Instruct").output_dir.name == "llama-3.2-3b-instruct"
    assert run_name(Path("/models/SmolLM2-135M-Instruct.Q4_1.gguf")) == "smollm2-135m-instruct.q4_1"
    assert resolve_model(Path(tiny_llama)) == str(tiny_llama)  # a Path (train_bench.py --gpu passes one) as well as text


def test_padding_free_batch_has_the_loss_of_the_same_examples_padded(tmp_path):
    """What a GPU trains on: TRL's collator flattens a micro-batch into one row; per-example position ids (and the
    lengths Unsloth passes on) must keep the examples apart, so the loss is the padded batch's. benchmarks/gpu_check.py
    runs the same check on the GPU."""
    from benchmarks.gpu_check import padding_free_losses
    from conftest import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "tiny", initializer_range=0.2)  # larger weights: attention matters more
    losses = padding_free_losses(folder)
    assert abs(losses["padding_free"] - losses["padded"]) < 1e-4, losses
    assert abs(losses["padding_free_with_lengths"] - losses["padded"]) < 1e-4, losses
    assert abs(losses["attending_across"] - losses["padded"]) > 1e-3, losses  # the check would see a broken path


# ----------------------------------------------------------------------------------------------------
# Formatting and label masking


def unmasked_text(tokenizer, labels):
    return tokenizer.decode([t for t in labels if t != -100])


def test_llama_batch_labels_cover_exactly_the_answer_and_end_token(llama_tokenizer, bundled_rows):
    from transformers import DataCollatorForSeq2Seq

    rows = bundled_rows.sample(3, random_state=0)
    examples = [data.encode_example(llama_tokenizer, "Be helpful.", r.instruction, r.response) for r in rows.itertuples()]
    batch = DataCollatorForSeq2Seq(llama_tokenizer, padding=True, label_pad_token_id=-100)(examples)
    assert llama_tokenizer.pad_token != llama_tokenizer.eos_token == "<|eot_id|>"
    for labels, ids, row in zip(batch["labels"].tolist(), batch["input_ids"].tolist(), rows.itertuples()):
        assert unmasked_text(llama_tokenizer, labels) == row.response.strip() + "<|eot_id|>"
        assert ids.count(llama_tokenizer.bos_token_id) == 1 and ids[0] == llama_tokenizer.bos_token_id
        assert f"Today Date: {TEMPLATE_DATE}" in llama_tokenizer.decode(ids)
        assert all(label == -100 for token, label in zip(ids, labels) if token == llama_tokenizer.pad_token_id)


def test_smollm2_labels_cover_exactly_the_answer_and_end_token():
    tokenizer = load_tokenizer("smollm2")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token not in (None, "<|im_end|>")
    example = data.encode_example(tokenizer, "Be helpful.", "cancel order 12", "Sure.\n\n1. Open your orders.")
    assert unmasked_text(tokenizer, example["labels"]) == "Sure.\n\n1. Open your orders.<|im_end|>"
    full = tokenizer.decode(example["input_ids"])
    assert full.startswith("<|im_start|>system\nBe helpful.<|im_end|>") and "SmolLM" not in full


# ----------------------------------------------------------------------------------------------------
# Whole runs


def test_inspect_writes_report_and_plots(small_csv, tiny_llama, tmp_path):
    report_dir = tmp_path / "report"
    result = run_script("finetune.py", "--inspect", "--dataset", small_csv, "--model", tiny_llama, "--report-dir", report_dir)
    assert result.returncode == 0, result.stderr
    report = (report_dir / "report.md").read_text()
    assert "Rows: **40**; intents: **8**" in report
    assert "`{{Order Number}}`" in report and "Z (typo / error)" in report
    assert {p.name for p in report_dir.glob("*.png")} == {"intents.png", "lengths.png", "rendered_lengths.png"}


def test_dry_run_writes_nothing(small_csv, tiny_llama, tmp_path):
    result = run_script("finetune.py", "--dry-run", "--dataset", small_csv, "--model", tiny_llama, "--output-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "nothing written" in result.stdout and not any(tmp_path.glob("out*"))


def test_two_processes_train_one_run_under_torchrun(small_csv, tiny_llama, tmp_path):
    """Several GPUs (or CPU processes) train one run: torchrun starts finetune.py twice, the processes join one gloo group
    (NCCL on GPUs), each trains its share of every batch, and the first alone writes the run."""
    import subprocess
    import sys

    from endpoint import free_port

    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(REPO / "finetune.py"), "--dataset", small_csv, "--model", tiny_llama, "--max-steps", "2", "--no-compare",
               "--no-guard", "--output-dir", out]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600, cwd=REPO,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 1 of 2 (gloo)" in result.stdout and "process 2 of 2 (gloo)" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["batch"]["processes"] == 2 and metrics["steps"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not out.with_name("run.partial").exists()


def test_tiny_llama_end_to_end(small_csv, tiny_llama, tmp_path):
    out = tmp_path / "run"
    result = run_script("finetune.py", "--dataset", small_csv, "--model", tiny_llama, "--output-dir", out,
                        "--max-steps", "6", "--learning-rate", "2e-3", "--logging-steps", "1", "--batch-size", "4", "--grad-accum", "1",
                        "--eval-limit", "4", "--eval-max-new-tokens", "8", "--report-to", "tensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not out.with_name("run.partial").exists()
    expected = {"adapter", "train.jsonl", "val.jsonl", "test.jsonl", "manifest.json", "config.json", "metrics.json",
                "train.log", "README.md", "LICENSE_CDLA-Sharing-1.0.txt", "guard.json", "intents.json"}
    assert expected <= {p.name for p in out.iterdir()}
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "adapter" / "tokenizer.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and len(metrics["loss_per_step"]) == 6
    assert metrics["tuned_val_loss"] < metrics["base_val_loss"]
    assert metrics["train_tokens_per_s"] > 0 and metrics["peak_memory_gb"] > 0
    assert metrics["compute_dtype"] == "float32"  # on every CPU, with or without native bf16
    assert metrics["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", ...: recorded
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["val"]["per_intent"]["cancel_order"] == 1
    assert manifest["splits"]["train"]["rows"] == len((out / "train.jsonl").read_text().splitlines())
    assert json.loads((out / "config.json").read_text())["max_steps"] == 6
    # --report-to tensorboard: the trainer's loss at each of the 6 steps, in an event file TensorBoard reads offline
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert "CDLA-Sharing-1.0" in (out / "README.md").read_text()
    summary = json.loads((out / "eval" / "summary.json").read_text())  # finetune.py ends with the held-out comparison
    assert summary["differences"]["intent_accuracy"]["n"] == 4
    # every comparison also answers the run's own test split, and reports the model with and without the scope guard
    test_split = summary["tables"]["the run's test split"]
    assert test_split["tuned"]["false_fallback_rate (lower is better)"]["n"] == 8  # 8 intents, one test row each
    assert set(test_split) == {"tuned", "tuned + guard"} and "test_split" in summary["fallback_by_type"]
    again = run_script("finetune.py", "--dataset", small_csv, "--model", tiny_llama, "--output-dir", out)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_readme_training_command_on_real_smollm2(smollm2_run):
    """The README's main command, shortened to a few steps, must make the real SmolLM2 better on val."""
    metrics = json.loads((smollm2_run / "metrics.json").read_text())
    assert "SmolLM2-135M-Instruct" in metrics["model"] and metrics["val_rows"] >= 27
    assert metrics["tuned_val_loss"] < metrics["base_val_loss"] - 0.02, metrics


def test_ci_runs_the_readme_test_command():
    assert readme_command("pytest") == [".venv/bin/python", "-m", "pytest", "tests"]
    assert "./setup.sh && .venv/bin/python -m pytest tests" in (REPO / ".ci" / "run").read_text()


def test_kill_and_resume_matches_an_uninterrupted_run(small_csv, tiny_llama, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    common = ["--dataset", small_csv, "--model", tiny_llama, "--max-steps", "6", "--save-steps", "2", "--no-compare",
              "--batch-size", "2", "--grad-accum", "1", "--learning-rate", "2e-3"]
    straight = run_script("finetune.py", *common, "--output-dir", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(REPO / "finetune.py"), *map(str, common), "--output-dir", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    deadline = time.time() + 300
    while not (out.with_name("killed.partial") / "checkpoints" / "checkpoint-4").exists():
        assert process.poll() is None and time.time() < deadline, "training ended before its 4th-step checkpoint"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()

    resumed = run_script("finetune.py", *common, "--output-dir", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    final = {name: json.loads((path / "metrics.json").read_text()) for name, path in (("straight", tmp_path / "straight"), ("resumed", out))}
    assert final["resumed"]["steps"] == 6
    assert abs(final["resumed"]["tuned_val_loss"] - final["straight"]["tuned_val_loss"]) < 1e-3


# ----------------------------------------------------------------------------------------------------
# Settings: one dataclass, the command line, config files and config.json


def test_config_json_repeats_the_run_s_settings(tiny_run):
    recorded = json.loads((tiny_run / "config.json").read_text())
    settings = {f for f in training.RunSettings.__dataclass_fields__}
    assert settings | {"base_model"} == set(recorded)  # every setting, optimizer and scheduler included
    assert (recorded["optim"], recorded["lr_scheduler_type"], recorded["weight_decay"]) == ("adamw_torch", "linear", 0.01)
    result = run_script("finetune.py", "--config", tiny_run / "config.json", "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert logged_settings(result) == recorded


def logged_settings(result):
    line = next(line for line in result.stdout.splitlines() if " settings: " in line)
    return json.loads(line.split(" settings: ", 1)[1])


def test_yaml_config_with_flags_over_it_in_both_spellings(small_csv, tiny_llama, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"dataset: {small_csv}\nmodel: {tiny_llama}\nlearning_rate: 2e-4\nmax-steps: 3\ncompare: false\n")
    result = run_script("finetune.py", "--config", config, "--dry-run", "--max_steps", "7", "--output-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    settings = logged_settings(result)
    assert (settings["learning_rate"], settings["max_steps"], settings["compare"]) == (2e-4, 7, False)
    assert settings["output_dir"] == str(tmp_path / "out") and settings["dataset"] == str(small_csv)


@pytest.mark.parametrize("text, message", [
    ("learnin_rate: 0.1\n", "unknown setting 'learnin_rate'"),
    ("max_steps: many\n", "max_steps must be int, not 'many'"),
    ("- a list\n", "must map setting names to values"),
    ("lora_r: [1\n", "is not valid YAML or JSON"),
    ("report_to: comet\n", "--report-to takes none, tensorboard, wandb, trackio"),
])
def test_bad_config_files_give_one_line_errors(tmp_path, text, message):
    from conftest import assert_user_error

    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert_user_error(run_script("finetune.py", "--config", config, "--dry-run"), message)


def test_help_shows_every_setting_with_its_default():
    result = run_script("finetune.py", "--help")
    assert result.returncode == 0
    for name, field in training.RunSettings.__dataclass_fields__.items():
        assert f"--{name.replace('_', '-')}" in result.stdout and f"--{name}" in result.stdout
    assert "--weight-decay WEIGHT_DECAY, --weight_decay WEIGHT_DECAY" in result.stdout
    assert "(default: linear)" in result.stdout and "(default: none)" in result.stdout


def test_encoded_splits_keep_padding_free_on_a_gpu(tiny_llama, bundled_rows):
    """On the H200 Unsloth ran every micro-batch padded although finetune.py asked for padding-free: it refills max_length
    from the model and, for a pre-tokenized dataset it can't truncate, keeps padding-free only if the dataset claims it is
    already within that length (it does not scan the rows there). Unsloth's own reading of that claim (inlined in its
    generated trainer) must accept encode_split's output at the length it was cut to, and refuse it at a shorter one."""
    from unsloth.models.rl import _attested_within_cap

    import data
    from common import read_system_prompt
    from models import load_tokenizer

    dataset, _ = data.encode_split(load_tokenizer(tiny_llama), read_system_prompt(), bundled_rows.head(8), 1024)
    assert _attested_within_cap(dataset, 1024) is True and max(map(len, dataset["input_ids"])) <= 1024
    assert _attested_within_cap(dataset, 512) is False  # None: no claim at all, which turned padding-free off
