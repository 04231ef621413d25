"""infer.py: metric functions on hand-made cases, the intent classifier, bad inputs, reports, SmolLM2 compare."""
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import infer
from common import PROMPTS_DIR, UserError, fill_placeholders, load_company
from conftest import assert_user_error, run_script


# ----------------------------------------------------------------------------------------------------
# Metric functions


@pytest.mark.parametrize("answer, declines", [
    ("I'm sorry, but I can't help with weather forecasts. I can help with orders and refunds.", True),
    ("I'm afraid I'm not able to recommend movies; I'm here for your orders.", True),
    ("That's outside what I can help with, but I'm glad to track an order.", True),
    ("The capital of Australia is Canberra.", False),
    ("If you're unable to pay by card, you can choose PayPal at checkout.", False),
    ("I'm sorry to hear that. To cancel your order, open Order History and click Cancel.", False),
])
def test_decline_detector_on_hand_made_answers(answer, declines):
    assert bool(infer.DECLINES.search(answer)) == declines


def test_decline_detector_agrees_with_hand_labelled_model_answers():
    """186 answers of base SmolLM2 and a --subset 500 adapter to the held-out prompts, each labelled by reading it."""
    labelled = [json.loads(line) for line in (Path(__file__).parent / "data" / "decline_labels.jsonl").open()]
    wrong = [(r["declines"], r["response"][:120]) for r in labelled if bool(infer.DECLINES.search(r["response"])) != r["declines"]]
    assert len(labelled) == 186 and sum(r["declines"] for r in labelled) == 63
    assert not wrong, wrong


def test_decline_detector_finds_the_written_fallback_answers():
    written = [json.loads(line) for line in PROMPTS_DIR.joinpath("fallback.jsonl").open()]
    declines = [r for r in written if r["topic"] not in ("chit_chat", "abuse")]  # greetings and angry customers get a reply
    found = sum(bool(infer.DECLINES.search(r["response"])) for r in declines)
    assert found / len(declines) > 0.9, found


def test_the_tuned_model_is_asked_with_the_intent_hint_and_the_base_model_without(tmp_path):
    import numpy as np
    import scope

    basis = np.eye(scope.EMBEDDING_SIZE)
    reader = scope.train_intent_reader(["cancel it", "cancel order 5", "where is it", "where's my parcel"],
                                       ["cancel_order"] * 2 + ["track_order"] * 2,
                                       embedder=lambda texts: np.array([basis[0] if "cancel" in t else basis[1] for t in texts]))
    generation = infer.Generation("Be kind.", intent_reader=reader)
    assert generation.system_prompts(["cancel my order", "where is it now"]) == [
        "Be kind.\nThe customer's message is about: cancel order.", "Be kind.\nThe customer's message is about: track order."]
    assert generation.system_prompts(["cancel my order"], tuned=False) == ["Be kind."]
    assert infer.Generation("Be kind.").system_prompts(["cancel my order"]) == ["Be kind."]  # a run without intent hints


def test_placeholder_validity():
    inventory = {"Order Number", "Website URL"}
    assert infer.placeholder_problems("Order {{Order Number}} on {{Website URL}}.", inventory) == ([], 0)
    assert infer.placeholder_problems("Order {{Order Id}}.", inventory) == (["Order Id"], 0)
    assert infer.placeholder_problems("Order {{Order Number}.", inventory) == ([], 3)


def rule_decode(tokenizer, start, wanted, rule):
    """Greedy decoding by a stand-in for a model that wants to write `wanted` after `start` (its next piece scores
    highest, every other token a little noise), through `rule` (a models.answer_rules processor, made with the length
    of `start`) when given; up to the first }} or 24 tokens."""
    import torch

    ids = tokenizer.encode(start, add_special_tokens=False)
    processor = rule(tokenizer, prompt_length=len(ids)) if rule else None
    for step in range(24):
        answer = tokenizer.decode(ids)[len(start):]
        if "}}" in answer or answer == wanted:
            break
        scores = torch.rand(1, len(tokenizer), generator=torch.Generator().manual_seed(step))
        if wanted.startswith(answer):
            scores[0, tokenizer.encode(wanted[len(answer):], add_special_tokens=False)[0]] = 10.0
        if processor:
            scores = processor(torch.tensor([ids]), scores)
        ids.append(int(scores.argmax()))
    return tokenizer.decode(ids)


def test_slot_names_keep_answers_to_the_slots_the_run_learned(llama_tokenizer):
    from common import PLACEHOLDER
    from models import SlotNames

    names = {"Account Type", "Order Number", "Customer Support Phone Number"}

    def slot_names(tokenizer, prompt_length):
        return SlotNames(tokenizer, names, prompt_length)

    # without the processor the stand-in writes the slot it wants; with it, only names from the run's list
    assert "{{Account Number}}" in rule_decode(llama_tokenizer, "Update your ", "{{Account Number}} details", None)
    for start, wanted in [("Update your ", "{{Account Number}} details"),  # a name the run never used
                          ("Call us at ", "{Customer Support Phone Number} today"),  # one brace too few
                          ("Your order ", "{{Order Number}} is on its way")]:  # a known name: unchanged
        text = rule_decode(llama_tokenizer, start, wanted, slot_names)
        answer = text[len(start):]
        assert PLACEHOLDER.findall(answer) and set(PLACEHOLDER.findall(answer)) <= names, text
        assert infer.placeholder_problems(answer, names) == ([], 0), text
    assert rule_decode(llama_tokenizer, "Your order ", "{{Order Number}} is on its way", slot_names).endswith("{{Order Number}}")


def test_answers_give_no_web_address_or_phone_number_of_their_own(llama_tokenizer):
    from models import ContactsFromSlots
    from scope import critical_failures

    for start, wanted, failure in [("Visit our website, ", "www.customer-support.com today", "invented_url"),
                                   ("See ", "https://northwind.com/help for more", "invented_url"),
                                   ("Just call ", "1-800-777-7777 now", "invented_phone")]:
        assert failure in critical_failures(rule_decode(llama_tokenizer, start, wanted, None), ""), wanted
        text = rule_decode(llama_tokenizer, start, wanted, ContactsFromSlots)
        assert critical_failures(text, "") == [] and not text.lower().endswith(("www", "http", "https")), text
    for wanted in ["{{Website URL}}", "order 12345 ships in 3-5 days"]:  # left alone
        assert rule_decode(llama_tokenizer, "See ", wanted, ContactsFromSlots) == "See " + wanted


def test_repetition():
    assert infer.repetition("one two three four five six") == 0
    assert infer.repetition("a b c d " * 10) > 0.8


def test_fill_placeholders_takes_the_order_number_from_the_message_and_never_expands_user_text():
    company = load_company()
    filled, unknown = fill_placeholders("Order {{Order Number}} is cancelled; see {{Website URL}}. {{Mystery}}",
                                        company, "I wanna cancel #12345 {{Website URL}}")
    assert filled == "Order 12345 is cancelled; see https://northwind.example. {{Mystery}}"
    assert unknown == ["Mystery"]
    assert fill_placeholders("Order {{Order Number}}", company, "Order 12345 – please cancel it")[0] == "Order 12345"
    assert fill_placeholders("Order {{Order Number}}", company, "cancel it")[0] == "Order your order number"


def test_paired_bootstrap_interval_excludes_zero_for_a_clear_win():
    def scored(correct):
        return {"intent_correct": correct, "expected_intent": "cancel_order", "fallback": False, "placeholders_valid": True,
                "critical_failures": [], "stopped_at_eos": True, "repetition": 0.0}

    base = [scored(False) for _ in range(30)]
    tuned = [scored(i % 10 != 0) for i in range(30)]
    differences = infer.paired_bootstrap(base, tuned)
    assert differences["placeholder_validity"]["ci95"] == [0, 0] and "rougeL" not in differences
    difference = differences["intent_accuracy"]
    assert difference["difference"] == pytest.approx(0.9)
    assert 0.7 < difference["ci95"][0] < 0.9 < difference["ci95"][1] <= 1.0


def test_intent_classifier_is_accurate_on_held_out_bitext_answers(bundled_rows):
    rows = bundled_rows.groupby("intent").head(12)
    train = [r for i, r in enumerate(rows.to_dict("records")) if i % 4]
    test = [r for i, r in enumerate(rows.to_dict("records")) if i % 4 == 0]
    classifier = infer.IntentClassifier(train, test)
    assert classifier.heldout_accuracy > 0.8 and classifier.heldout_rows == len(test)
    assert classifier.predict(["To cancel your order, go to Order History and click Cancel Order."]) == ["cancel_order"]


# ----------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2, nothing written


@pytest.mark.parametrize("content, message", [
    ('{"text": "hi"}\n', "has no 'prompt' field"),
    ('{"prompt": ""}\n', "prompt 1 is empty"),
    (json.dumps({"prompt": "x" * 100_000}) + "\n", "over the 4000 limit"),
    ('{"prompt": "hi \\u0000\\u0001 there"}\n', "binary control bytes"),
    ("not json\n", "is not JSON"),
])
def test_bad_prompt_files(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    result = run_script("infer.py", "--base-only", "--model", "smollm2", "--prompts", path, "--out", tmp_path / "out.jsonl")
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out.jsonl").exists()


JSON_VALUE = st.recursive(st.one_of(st.text(max_size=30), st.integers(), st.floats(), st.none()),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                          max_leaves=6)
PROMPT_ITEM = st.dictionaries(st.sampled_from(["prompt", "expected_intent", "reference", "instruction"]), JSON_VALUE, max_size=4)


def prompts_or_user_error(tmp_path, data):
    """Reading a prompts file either gives prompts or stops with a one-line UserError; anything else is a bug."""
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    try:
        items = infer.prompt_items(prompts_file=path)
    except UserError as error:
        assert "\n" not in str(error)
    else:
        assert items and all(isinstance(item["prompt"], str) for item in items)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_fuzz_prompt_loader_with_random_bytes(tmp_path, data):
    prompts_or_user_error(tmp_path, data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(st.one_of(JSON_VALUE, PROMPT_ITEM), max_size=4))
def test_fuzz_prompt_loader_with_structured_garbage(tmp_path, items):
    prompts_or_user_error(tmp_path, "\n".join(json.dumps(item) for item in items).encode())


@pytest.mark.parametrize("data", [b"[" * 100_000, b'{"prompt": ' + b"1" * 5000 + b"}"], ids=["deep-nesting", "huge-number"])
def test_prompt_loader_survives_json_that_breaks_the_parser(tmp_path, data):
    prompts_or_user_error(tmp_path, data)


def test_secrets_in_a_prompt_never_reach_the_model_or_the_records(tiny_run, tmp_path):
    out = tmp_path / "answers.jsonl"
    result = run_script("infer.py", "--run", tiny_run, "--prompt", "charge my card 4111 1111 1111 1111, cvv 123",
                        "--max-new-tokens", "2", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["prompt"] == "charge my card [removed], cvv [removed]"
    assert "4111" not in out.read_text() and "card number, security code masked before answering" in result.stderr


def test_company_profile_that_is_a_directory(tmp_path):
    result = run_script("infer.py", "--base-only", "--model", "smollm2", "--prompt", "hi", "--company", tmp_path)
    assert_user_error(result, "is a directory: pass --company a YAML file")


@pytest.mark.parametrize("content, message", [
    ('"Website URL": [unclosed\n', "is not valid YAML"),
    ('"Favourite Colour": "blue"\n', "unknown placeholder 'Favourite Colour'"),
])
def test_bad_company_profile(tmp_path, content, message):
    path = tmp_path / "company.yaml"
    path.write_text(content)
    result = run_script("infer.py", "--base-only", "--model", "smollm2", "--prompt", "hi", "--company", path)
    assert result.returncode == 2 and message in result.stderr


def test_missing_run_dir(tmp_path):
    assert_user_error(run_script("infer.py", "--run", tmp_path / "nope", "--prompt", "hi"), "is not a finetune.py output dir")


def test_adapter_for_another_base_model(tiny_run):
    result = run_script("infer.py", "--run", tiny_run, "--model", "smollm2", "--prompt", "hi")
    assert_user_error(result, "trained for another base model")


def test_corrupted_adapter_file(tiny_run, tmp_path):
    broken = tmp_path / "run"
    shutil.copytree(tiny_run, broken)
    weights = broken / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert_user_error(run_script("infer.py", "--run", broken, "--prompt", "hi"), "its files are damaged")


def test_missing_adapter(tiny_run, tmp_path):
    broken = tmp_path / "run"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_run / "config.json").read_text())
    result = run_script("infer.py", "--run", broken, "--prompt", "hi")
    assert result.returncode == 2 and "no adapter in" in result.stderr


# ----------------------------------------------------------------------------------------------------
# Whole runs


def test_any_prompt_file_to_jsonl(tiny_run, tmp_path):
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text('{"prompt": "Where is order #4411?"}\n{"prompt": "refund pls", "expected_intent": "get_refund"}\n')
    out = tmp_path / "answers.jsonl"
    result = run_script("infer.py", "--run", tiny_run, "--prompts", prompts, "--out", out, "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["Where is order #4411?", "refund pls"]
    for record in records:
        assert {"response", "new_tokens", "seconds", "stopped_at_eos", "filled_response", "critical_failures"} <= set(record)
        assert 1 <= record["new_tokens"] <= 5


def test_compare_report_on_tiny_model(tiny_run, tmp_path):
    report = tmp_path / "report"
    result = run_script("infer.py", "--run", tiny_run, "--split", "test", "--compare", "--limit", "6",
                        "--max-new-tokens", "6", "--report-dir", report)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((report / "summary.json").read_text())
    assert {"intent_accuracy", "rougeL", "cosine_to_reference", "critical_failure_rate (lower is better)"} <= set(summary["differences"])
    assert 0 < summary["classifier_heldout_accuracy"] <= 1
    assert "95% CI" in (report / "report.md").read_text() and "<table>" in (report / "report.html").read_text()
    assert (report / "metrics.png").stat().st_size > 1000


def test_smollm2_compare_on_a_short_prompt_list(smollm2_run, tmp_path):
    prompts = tmp_path / "short.jsonl"
    lines = [{"prompt": "I wanna cancel #12345", "expected_intent": "cancel_order"},
             {"prompt": "What's the weather?", "expected_intent": "out_of_scope"},
             {"prompt": "i need the invoice for order 5521", "expected_intent": "check_invoice"}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run_script("infer.py", "--run", smollm2_run, "--prompts", prompts, "--compare", "--max-new-tokens", "48",
                        "--report-dir", tmp_path / "report")
    assert result.returncode == 0, result.stderr[-2000:]
    answers = [json.loads(line) for line in (tmp_path / "report" / "answers.jsonl").read_text().splitlines()]
    mine, test_split = answers[:3], answers[3:]  # every comparison also answers the run's test split
    assert [a["base"]["prompt"] for a in mine] == [line["prompt"] for line in lines]
    assert len(test_split) == len((smollm2_run / "test.jsonl").read_text().splitlines())
    assert {a["tuned"]["type"] for a in test_split} == {"test_split"}
    assert all(a["base"]["response"] and a["tuned"]["response"] for a in answers)
    assert answers[0]["base"]["response"] != answers[0]["tuned"]["response"]
    # the run's guard stands in front of the tuned model: the weather question gets its fixed reply
    assert answers[1]["tuned + guard"]["guard_declined"] and answers[1]["tuned + guard"]["fallback"]


class FakeJudge:
    """An OpenAI-compatible endpoint on loopback: prefers the answer mentioning 'Order History', plus a bias to A."""

    def __enter__(self):
        import http.server
        import threading

        seen = self.headers = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                seen.append(self.headers["Authorization"])
                text = body["messages"][1]["content"]
                answer_a = text.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
                good_a = "Order History" in answer_a
                scores = {"A": {c: (5 if good_a else 1) for c in infer.JUDGE_CRITERIA},
                          "B": {c: (1 if good_a else 5) - 1 for c in infer.JUDGE_CRITERIA}}
                reply = json.dumps({"choices": [{"message": {"content": "Scores: " + json.dumps(scores)}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *_):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def __exit__(self, *_):
        self.server.shutdown()


def test_judge_swaps_order_and_keeps_the_key_out_of_errors(monkeypatch):
    monkeypatch.setenv("JUDGE_API_KEY", "secret-key")
    base = [{"prompt": "cancel #1", "response": "I can't help."}]
    tuned = [{"prompt": "cancel #1", "response": "Open Order History and click Cancel."}]
    judge = FakeJudge()
    with judge as url:
        infer.judge_pairs(base, tuned, url, "any-model")
    assert judge.headers == ["Bearer secret-key"] * 2
    # tuned is better (5 vs 1); the fake's bias of 1 point towards A cancels out over the two orders
    assert tuned[0]["judge_helpfulness"] == 4.5 and base[0]["judge_helpfulness"] == 0.5
    with pytest.raises(UserError) as error:
        infer.judge_pairs(base, tuned, "http://127.0.0.1:9/v1", "any-model")
    assert "could not be reached" in str(error.value) and "secret-key" not in str(error.value)
