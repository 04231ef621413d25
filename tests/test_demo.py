"""demo.py: the chat function on the tiny model, bad command lines, the app in a real browser, 50 users at once."""
import dataclasses
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import demo
from common import MAX_PROMPT_CHARS, load_company, read_system_prompt
from conftest import REPO, make_tiny_llama, run_script
from endpoint import free_port
from models import load_for_inference
from scope import load_guard, load_intent_reader

QUESTION = "I wanna cancel #12345"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LOAD_USERS = 50
RSS_GROWTH_LIMIT_MB = 300  # a leak per request would show up as far more over 50 requests with history


@pytest.fixture(scope="module")
def bot(tiny_run):
    model, tokenizer, config = load_for_inference(run=tiny_run)
    return demo.Bot(model, tokenizer, read_system_prompt(), demo.context_size(model, config), has_adapter=True)


@pytest.fixture(scope="module")
def company():
    return load_company()


# ----------------------------------------------------------------------------------------------------
# The chat function, called directly


def test_answers_stream_as_growing_text(bot):
    messages, dropped = demo.prompt_messages(bot, [], QUESTION, 8)
    steps = list(demo.stream_generate(bot, messages, 8))
    assert dropped == 0 and len(steps) >= 2
    assert all(len(a) < len(b) and b.startswith(a) for a, b in zip(steps, steps[1:]))
    assert not bot.lock.locked()


def test_chat_streams_then_keeps_the_raw_answer_as_history(bot, company):
    updates = list(demo.chat(bot, QUESTION, [], company, False, 6))
    assert len(updates) >= 3  # the empty bubble, tokens as they come, the finished turn
    view, turns, notice, box = updates[-1]
    assert box == "" and notice == "" and len(turns) == 1 and turns[0]["user"] == QUESTION
    assert [m["role"] for m in view] == ["user", "assistant"] and view[1]["content"]
    follow_up = list(demo.chat(bot, "and the refund?", turns, company, False, 4))[-1]
    assert len(follow_up[1]) == 2 and len(follow_up[0]) == 4


def test_the_run_s_scope_guard_answers_out_of_scope_messages_without_the_model(bot, company, tiny_run):
    guard = load_guard(tiny_run, None)  # finetune.py trained it with the run
    guarded = dataclasses.replace(bot, guard=guard, lock=ExplodingLock())  # the model must not be touched
    view, turns, notice, box = list(demo.chat(guarded, "Write me a poem about autumn leaves", [], company, False, 6))[-1]
    assert turns == [{"user": "Write me a poem about autumn leaves", "answer": guard.reply}] and notice == demo.GUARD_NOTICE
    assert view[1]["content"] == guard.reply and box == ""
    in_scope = list(demo.chat(dataclasses.replace(bot, guard=guard), QUESTION, [], company, False, 4))[-1]
    assert in_scope[1][0]["answer"] != guard.reply and in_scope[2] == ""  # the model answered


def test_a_card_number_is_masked_before_the_model_and_the_history_see_it(bot, company):
    message = "here is my card number 4111 1111 1111 1111 exp 12/27 cvv 123, please charge it"
    seen = []
    spying = dataclasses.replace(bot, tokenizer=SpyTokenizer(bot.tokenizer, seen))
    view, turns, notice, box = list(demo.chat(spying, message, [], company, False, 4))[-1]
    assert turns[0]["user"] == "here is my card number [removed] exp [removed] cvv [removed], please charge it"
    assert "4111" not in view[0]["content"] and "please don't share card numbers" in notice
    assert seen and not any("4111" in text or "123," in text for text in seen)  # the prompt the model was given
    base, tuned, compare_notice = list(demo.compare(spying, "my password is hunter2", company, False, 2))[-1]
    assert "please don't share" in compare_notice and not any("hunter2" in text for text in seen)


class SpyTokenizer:
    """The demo's tokenizer, recording every text it is asked to encode."""

    def __init__(self, tokenizer, seen):
        self.tokenizer, self.seen = tokenizer, seen

    def __call__(self, text, *args, **kwargs):
        self.seen.extend([text] if isinstance(text, str) else text)
        return self.tokenizer(text, *args, **kwargs)

    def apply_chat_template(self, messages, *args, **kwargs):
        self.seen.extend(m["content"] for m in messages)
        return self.tokenizer.apply_chat_template(messages, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


class ExplodingLock:
    def __enter__(self):
        raise AssertionError("the model was called")

    def __exit__(self, *_):
        return False


def test_raw_toggle_and_filling_with_the_latest_order_number(company):
    turns = [{"user": "cancel order #4411", "answer": "Order {{Order Number}} can be cancelled on {{Website URL}}. {{Mystery}}"},
             {"user": "and when are you open?", "answer": "{{Customer Support Hours}}, for order {{Order Number}}."}]
    filled = [m["content"] for m in demo.chat_view(turns, company, show_raw=False)]
    assert filled[1] == "Order 4411 can be cancelled on https://northwind.example."  # the {{Mystery}} sentence left out
    assert filled[3] == "Monday to Friday, 8am to 6pm ET, for order 4411."
    raw = [m["content"] for m in demo.chat_view(turns, company, show_raw=True)]
    assert raw[1] == turns[0]["answer"] and raw[3] == turns[1]["answer"]
    edited, message = demo.edit_company('"Customer Support Hours": "24/7"\n', company)
    assert message == "" and demo.chat_view(turns, edited, False)[3]["content"] == "24/7, for order 4411."
    kept, message = demo.edit_company('"Favourite Colour": "blue"\n', company)
    assert kept is company and "unknown placeholder 'Favourite Colour'" in message
    kept, message = demo.edit_company('"Website URL": [unclosed\n', company)
    assert kept is company and "is not valid YAML" in message


def test_history_is_trimmed_to_fit_the_context(bot, company):
    turns = [{"user": f"question {i}", "answer": f"answer number {i} " * 40} for i in range(6)]
    small = dataclasses.replace(bot, context_tokens=600)
    messages, dropped = demo.prompt_messages(small, turns, "the newest question", 64)
    assert 0 < dropped < len(turns)
    kept = [m["content"] for m in messages if m["role"] == "user"]
    assert kept == [t["user"] for t in turns[dropped:]] + ["the newest question"]  # the oldest go first
    view, new_turns, notice, _ = list(demo.chat(small, "the newest question", turns, company, False, 64))[-1]
    assert f"The {dropped} oldest turn(s) no longer fit the 600-token context" in notice
    assert len(new_turns) == 7 and len(view) == 14  # the page still shows the whole conversation
    tiny = dataclasses.replace(bot, context_tokens=200)
    *_, notice, box = list(demo.chat(tiny, "refund " * 200, [], company, False, 64))[-1]
    assert "over the model's 200-token context" in notice and box == "refund " * 200


@pytest.mark.parametrize("message, expected", [
    ("x" * (MAX_PROMPT_CHARS + 1), f"over the {MAX_PROMPT_CHARS} limit"),
    ("   ", "is empty"),
    ("hi \x00 there", "control bytes"),
])
def test_bad_messages_get_a_message_not_a_crash(bot, company, message, expected):
    updates = list(demo.chat(bot, message, [], company, False, 500_000))
    assert len(updates) == 1
    view, turns, notice, box = updates[0]
    assert view == [] and turns == [] and expected in notice and box == message


def test_a_model_error_is_shown_and_the_next_request_works(bot, company, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(bot.model, "generate", broken)
    view, turns, notice, box = list(demo.chat(bot, QUESTION, [], company, False, 4))[-1]
    assert "model error: RuntimeError: out of memory (simulated)" in notice and turns == [] and box == QUESTION
    monkeypatch.undo()
    assert not bot.lock.locked() and len(list(demo.chat(bot, QUESTION, [], company, False, 4))[-1][1]) == 1


def test_the_tuned_model_gets_the_intent_hint_of_the_new_message(bot, tiny_run):
    hinted = dataclasses.replace(bot, intent_reader=load_intent_reader(tiny_run))  # tiny_run was trained with hints
    turns = [{"user": "where is my parcel", "answer": "On its way."}]
    messages, _ = demo.prompt_messages(hinted, turns, QUESTION, 8)
    intent = hinted.intent_reader.read([QUESTION])[0]
    assert messages[0]["content"] == (f"{read_system_prompt()}\nThe customer's message is about: {intent.replace('_', ' ')}.\n"
                                      f"An answer to such a message: {hinted.intent_reader.examples[intent]}")
    assert demo.prompt_messages(hinted, turns, QUESTION, 8, tuned=False)[0][0]["content"] == read_system_prompt()
    assert demo.prompt_messages(bot, turns, QUESTION, 8)[0][0]["content"] == read_system_prompt()  # no reader: no hint


def test_compare_answers_with_the_adapter_off_then_on(bot, company):
    base, tuned, notice = list(demo.compare(bot, QUESTION, company, True, 4))[-1]
    assert base and tuned and notice == ""


# ----------------------------------------------------------------------------------------------------
# Bad command lines: one line, exit 2, before any model loads


@pytest.mark.parametrize("argv, message", [
    (["--run", "/nonexistent/run"], "run dir /nonexistent/run not found"),
    ([], "pass one of --run DIR"),
    (["RUN", "--auth", "nopassword"], "--auth must look like USER:PASSWORD"),
    (["RUN", "--auth", ":secret"], "--auth must look like USER:PASSWORD"),
    (["RUN", "--port", "70000"], "--port 70000 is out of range"),
    (["RUN", "--max-new-tokens", "4096"], "--max-new-tokens must be between 1 and 512"),
    (["RUN", "--company", "BAD_YAML"], "is not valid YAML"),
    (["RUN", "--company", "UNKNOWN_KEY"], "unknown placeholder 'Favourite Colour'"),
    (["NO_ADAPTER"], "no adapter in"),
    (["RUN", "--slot-grammar"], "--slot-grammar sends the run's slot names to a llama.cpp server"),
])
def test_bad_command_lines(tiny_run, tmp_path, argv, message):
    (tmp_path / "bad.yaml").write_text('"Website URL": [unclosed\n')
    (tmp_path / "unknown.yaml").write_text('"Favourite Colour": "blue"\n')
    (tmp_path / "no-adapter").mkdir()
    shutil.copy(tiny_run / "config.json", tmp_path / "no-adapter")
    names = {"RUN": ["--run", tiny_run], "NO_ADAPTER": ["--run", tmp_path / "no-adapter"],
             "BAD_YAML": [tmp_path / "bad.yaml"], "UNKNOWN_KEY": [tmp_path / "unknown.yaml"]}
    argv = [part for arg in argv for part in names.get(arg, [arg])]
    started = time.time()
    result = run_script("demo.py", *argv, timeout=120)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert time.time() - started < 60  # failed before loading the model


def test_a_busy_port_fails_before_the_model_loads(tiny_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_script("demo.py", "--run", tiny_run, "--port", taken.getsockname()[1], timeout=120)
    assert result.returncode == 2 and "cannot serve on 127.0.0.1:" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Unsloth" not in result.stdout


# ----------------------------------------------------------------------------------------------------
# The running app: a browser, then 50 users at once


def rss_mb(pid):
    status = open(f"/proc/{pid}/status").read()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """demo.py on a tiny random Llama on a free loopback port; killed at the end whatever happens.

    Its weights are drawn 10x wider than usual so that greedy decoding writes visible tokens: at the usual
    scale the tiny model (and the tiny run's adapter) only ever writes blank lines, which would leave the browser
    nothing to check but the app's "no text yet" note."""
    model = make_tiny_llama(tmp_path_factory.mktemp("chatty-tiny-llama"), initializer_range=0.2)
    port = free_port()
    log = tmp_path_factory.mktemp("demo-server") / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(REPO / "demo.py"), "--base-only", "--model", str(model),
                                    "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 300
        while True:
            assert process.poll() is None, f"demo.py exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"demo.py did not serve within 300 s:\n{log.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                time.sleep(1)
        yield url, process
    finally:
        process.kill()
        process.wait(timeout=30)


def test_browser_chat(server, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH (.ci/run installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    url, _ = server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            box = page.get_by_label("Your message")
            box.fill(QUESTION)
            box.press("Enter")
            answer = page.locator('[data-testid="bot"]').first
            answer.wait_for(timeout=60_000)
            page.wait_for_function("() => !document.querySelector('.generating')", timeout=60_000)  # answer finished
            page.screenshot(path=tmp_path / "demo.png", full_page=True)
            assert page.locator('[data-testid="user"]').first.inner_text().strip() == QUESTION
            assert answer.inner_text().strip() not in ("", demo.NO_TEXT)
        finally:
            browser.close()
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_fifty_users_at_once(server, monkeypatch):
    from gradio_client import Client

    url, process = server
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # the client would phone home from every thread
    # One session each, like 50 browser tabs. httpx's default 5 s timeout is shorter than a wait in the queue;
    # plain http on loopback needs no certificates (loading them costs 0.4 s per client).
    clients = [Client(url, verbose=False, ssl_verify=False, httpx_kwargs={"timeout": 120}) for _ in range(LOAD_USERS)]
    rss_before = rss_mb(process.pid)

    def one_user(client):
        started = time.time()
        try:
            view, notice, _ = client.predict(QUESTION, False, 4, api_name="/chat")
            return "answered" if view[-1]["role"] == "assistant" and not notice else f"bad reply {notice!r}", time.time() - started
        except Exception as error:  # a full queue is a clean answer too; anything else is not
            return ("queue full" if "Queue is full" in str(error) else f"{type(error).__name__}: {error}"), time.time() - started

    started = time.time()
    with ThreadPoolExecutor(LOAD_USERS) as pool:
        results = list(pool.map(one_user, clients, timeout=240))
    seconds = time.time() - started
    outcomes = [outcome for outcome, _ in results]
    latencies = sorted(latency for outcome, latency in results if outcome == "answered")
    assert set(outcomes) <= {"answered", "queue full"}, outcomes
    assert len(latencies) >= 1
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))]
    view, notice, _ = clients[0].predict("and is the app still alive?", False, 4, api_name="/chat")
    assert view[-1]["role"] == "assistant" and notice == "" and process.poll() is None
    rss_after = rss_mb(process.pid)
    print(f"\n{LOAD_USERS} users: {outcomes.count('answered')} answered, {outcomes.count('queue full')} queue full, "
          f"{seconds:.1f} s in all; latency p50 {p50:.2f} s, p95 {p95:.2f} s; "
          f"server RSS {rss_before:.0f} -> {rss_after:.0f} MB")
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MB


def test_a_sentence_with_a_slot_the_company_cannot_fill_is_not_shown(company):
    # the README run's tuned model wrote slots like these (docs/heldout-subset500/report.md)
    answer = "I can help with your refund for order {{Order Number}}. Please send us your {{Account Number}}.\nThanks!"
    assert demo.shown(answer, company, ["refund for #55123 please"], show_raw=False) == \
        "I can help with your refund for order 55123. Thanks!"
    assert demo.shown(answer, company, ["refund please"], show_raw=True) == answer  # raw: everything, braces included
    assert demo.shown("Send your {{Account Number}}.", company, ["hi"], show_raw=False) == "Send your {{Account Number}}."
