"""Answers from an OpenAI-compatible chat server instead of a model in this process: llama.cpp's server, Ollama, vLLM,
TGI. infer.py --endpoint uses it; the records have the fields models.generate writes.

    .venv/bin/python -m llama_cpp.server --model RUN/export/model-q8_0.gguf --port 8080 --n_threads $(nproc)  # another terminal
    .venv/bin/python infer.py --endpoint http://127.0.0.1:8080/v1 --prompt "I wanna cancel #12345"

Greedy like everything else here (temperature 0). A key, when the server wants one, comes only from the environment
variable ENDPOINT_API_KEY and never appears in a message.
"""
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from common import UserError
from models import chat_messages, each_system_prompt

API_KEY_VARIABLE = "ENDPOINT_API_KEY"
SERVER_START_TIMEOUT_S = 120
SERVER_CONTEXT_TOKENS = 4096  # each request's room (llama-server: each slot's)


@dataclass
class Endpoint:
    """An OpenAI-compatible server: its base URL (ending in /v1) and the model name it serves ("" = its first one)."""
    url: str
    model: str = ""
    timeout_s: float = 600
    grammar: str = ""  # a GBNF grammar sent with every request (llama.cpp's servers; models.slot_grammar)

    def __post_init__(self):
        self.url = self.url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise UserError(f"--endpoint {self.url} is not an http(s) URL: pass the server's base URL, e.g. http://127.0.0.1:8080/v1")
        if not self.url.endswith("/v1"):
            self.url += "/v1"

    def request(self, path, body=None):
        """The opened HTTP response of GET (body None) or POST path; a one-line UserError when the server fails."""
        key = os.environ.get(API_KEY_VARIABLE, "")
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        data = None if body is None else json.dumps(body).encode()
        try:
            return urllib.request.urlopen(urllib.request.Request(self.url + path, data=data, headers=headers),
                                          timeout=self.timeout_s)
        except urllib.error.HTTPError as error:
            detail = error.read()[:160].decode("utf-8", "replace").replace("\n", " ")
            raise UserError(f"the endpoint {self.url} answered HTTP {error.code} to {path} ({detail}): check --endpoint, "
                            f"--endpoint-model and ${API_KEY_VARIABLE}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise UserError(f"the endpoint {self.url} could not be reached ({type(reason).__name__}: {reason}): start the "
                            "server or fix --endpoint") from None

    def served_model(self):
        """The model name to send: the one given, else the first the server lists at /v1/models."""
        if not self.model:
            with self.request("/models") as response:
                self.model = self.parse(response.read(), "a model list", lambda d: d["data"][0]["id"])
        return self.model

    def parse(self, raw, what, pick):
        try:
            return pick(json.loads(raw))
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(f"the endpoint {self.url} did not answer with {what} (got {raw[:80]!r}): is it an "
                            "OpenAI-compatible server?") from None

    def body(self, messages, max_new_tokens):
        body = {"model": self.served_model(), "messages": messages, "max_tokens": max_new_tokens, "temperature": 0}
        return dict(body, grammar=self.grammar) if self.grammar else body

    def answer(self, prompt, system_prompt, max_new_tokens):
        """One greedy answer as a generate() record (no token ids: the server keeps them)."""
        started = time.time()
        with self.request("/chat/completions", self.body(chat_messages(system_prompt, prompt), max_new_tokens)) as response:
            raw = response.read()
        choice, usage = self.parse(raw, "a chat completion", lambda d: (d["choices"][0], d.get("usage") or {}))
        text = choice.get("message", {}).get("content")
        if not isinstance(text, str):
            raise UserError(f"the endpoint {self.url} sent a chat completion without text (got {raw[:80]!r}): check the server")
        return {"prompt": prompt, "response": text.strip(), "new_tokens": int(usage.get("completion_tokens") or 0),
                "token_ids": [], "latency_s": round(time.time() - started, 3), "stopped_at_eos": choice.get("finish_reason") == "stop"}


    def stream(self, messages, max_new_tokens):
        """Yield the answer as it grows, from the server's streamed chat completion (server-sent events); demo.py
        --endpoint shows it so."""
        answer = ""
        with self.request("/chat/completions", dict(self.body(messages, max_new_tokens), stream=True)) as response:
            for line in response:
                line = line.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue  # blank separators and SSE comments
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    break
                piece = self.parse(data.encode(), "a streamed chat completion",
                                   lambda d: d["choices"][0].get("delta", {}).get("content") or "")
                if piece:
                    answer += piece
                    yield answer


def answers(endpoint, prompts, system_prompt, max_new_tokens, concurrency):
    """Greedy answers to the prompts, in order, `concurrency` requests in flight at a time (system_prompt: one for all,
    or one per prompt). Each record's seconds is its share of the wall time, as in models.generate (so throughput_of is
    the server's rate); latency_s its own request's."""
    from tqdm.auto import tqdm

    endpoint.served_model()  # one request first: a dead server is one error, not one per prompt
    records, started = [], time.time()
    with ThreadPoolExecutor(max_workers=concurrency) as pool, \
            tqdm(total=len(prompts), unit="prompt", desc="answering", leave=False) as progress:
        for record in pool.map(lambda prompt, system: endpoint.answer(prompt, system, max_new_tokens), prompts,
                               each_system_prompt(system_prompt, prompts)):
            records.append(record)
            progress.update(1)
            progress.set_postfix_str(f"{sum(r['new_tokens'] for r in records) / (time.time() - started):.1f} new tokens/s")
    share = round((time.time() - started) / max(1, len(records)), 3)
    for record in records:
        record["seconds"] = share
    return records


def free_port():
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def llama_cpp_server(gguf, log, binary=None, parallel=1):
    """llama.cpp's OpenAI-compatible server with the GGUF on a free loopback port, its output in the file `log`; yields
    its /v1 URL once it lists its model, and stops it whatever happens.
    Without `binary`: llama-cpp-python's server (built by setup.sh), which answers one request at a time. With it: the
    C++ `llama-server` at that path (`./setup.sh --llama-server` builds .venv/bin/llama-server), which decodes up to
    `parallel` requests together in one batch (continuous batching over `parallel` slots of 4,096 tokens each).
    Every core decodes: llama-cpp-python's default is half of them, one on a 2-core CPU, which gave 35.8 new tokens/s
    instead of 58.0 there (BENCHMARKS.md, Serving)."""
    port = free_port()
    if binary is None:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_ctx", str(SERVER_CONTEXT_TOKENS),
                   "--n_threads", str(os.cpu_count())]
    else:
        command = [str(binary), "--model", str(gguf), "--ctx-size", str(SERVER_CONTEXT_TOKENS * parallel), "--parallel",
                   str(parallel), "--threads", str(os.cpu_count()), "--no-webui"]
    with open(log, "w") as out:
        server = subprocess.Popen(command + ["--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        started = time.time()
        while True:
            if server.poll() is not None:
                last = (Path(log).read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
                raise UserError(f"llama.cpp's server exited at start ({last[:200]}): see {log}, or re-run ./setup.sh")
            try:
                urllib.request.urlopen(url + "/models", timeout=5).read()
                break
            except OSError:
                if time.time() - started > SERVER_START_TIMEOUT_S:
                    raise UserError(f"llama.cpp's server did not answer within {SERVER_START_TIMEOUT_S} s: see {log}") from None
                time.sleep(0.5)
        yield url
    finally:
        server.kill()
        server.wait()
