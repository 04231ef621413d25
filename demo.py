"""Chat with the fine-tuned support assistant in the browser (Gradio), and compare it with its base model.

    python demo.py --run runs/smollm2                          # http://127.0.0.1:7860
    python demo.py --run runs/smollm2 --port 8080 --auth demo:secret
    python demo.py --base-only --model smollm2                 # the base model alone (no Compare tab)
    python demo.py --merged runs/smollm2/export/merged         # finetune.py --export merged
    python demo.py --gguf runs/smollm2/export/model-q8_0.gguf  # finetune.py --export gguf
    python demo.py --run runs/smollm2 --host 0.0.0.0           # reachable from other machines: add --auth
    python demo.py --endpoint http://127.0.0.1:8080/v1 --run runs/smollm2   # streamed from an OpenAI-compatible server
    python demo.py --endpoint http://127.0.0.1:8080/v1 --run runs/smollm2 --slot-grammar  # llama.cpp: the run's slots only

Answers stream token by token (greedy, stop at the chat template's end-of-turn token). The model writes
Bitext slots such as {{Order Number}}; the app fills them from the company profile (prompts/company.yaml,
editable in the page) and the order number in the customer's messages, and a toggle shows the raw answer.
One model is loaded and shared: requests wait in a bounded queue and generate one at a time.
"""
import argparse
import functools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    ArgumentParser,
    COMPANY_FILE,
    HELDOUT_FILE,
    SYSTEM_PROMPT_FILE,
    UserError,
    check_prompt,
    fill_placeholders,
    load_company,
    parse_company,
    read_jsonl,
    read_system_prompt,
    run_main,
    run_slot_names,
)
from endpoint import API_KEY_VARIABLE, SERVER_CONTEXT_TOKENS, Endpoint
from models import (add_model_arguments, answer_rules, adapter_mode, load_for_inference, model_source, prepare_tokenizer,
                    render_chat, run_config, slot_grammar)
from scope import (SECRETS_NOTICE, checked_answer, hinted_system_prompt, load_guard, load_intent_reader, mask_secrets,
                   system_prompts_for, without_slots)

DEFAULT_HOST = "127.0.0.1"  # loopback: nobody else can reach the demo unless --host says so
DEFAULT_PORT = 7860
MAX_NEW_TOKENS = 512  # the slider's top: longer answers hold the single model for too long
DEFAULT_NEW_TOKENS = 256
NO_TEXT = "(no text yet: the model has only written whitespace)"
GUARD_NOTICE = ("The scope guard answered: the message looks outside customer support, or not in English (start with "
                "--no-guard to send everything to the model).")
QUEUE_SIZE = 32  # requests waiting for the model; more are rejected with "queue is full"
# Gradio's default theme pulls fonts from Google; system fonts keep the page offline and private.
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)  # --run (which also enables the Compare tab), --base-only, --model, --merged, --gguf
    app = p.add_argument_group("app")
    app.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default: loopback only)")
    app.add_argument("--port", type=int, default=DEFAULT_PORT)
    app.add_argument("--share", action="store_true", help="also publish a public *.gradio.live link (needs internet)")
    app.add_argument("--auth", help="USER:PASSWORD required to open the app")
    app.add_argument("--queue-size", type=int, default=QUEUE_SIZE, help="requests allowed to wait for the model")
    app.add_argument("--max-new-tokens", type=int, default=DEFAULT_NEW_TOKENS, help=f"initial answer length (1-{MAX_NEW_TOKENS})")
    app.add_argument("--company", type=Path, default=COMPANY_FILE, help="placeholder values (editable in the app)")
    app.add_argument("--system-prompt-file", type=Path, default=SYSTEM_PROMPT_FILE)
    served = p.add_argument_group("a server instead of a model in this process (OpenAI-compatible, streamed; the key, if "
                                  f"any, from ${API_KEY_VARIABLE})")
    served.add_argument("--endpoint", help="the server's base URL, e.g. http://127.0.0.1:8080/v1; with --run, the run's guard, "
                                           "tokenizer and context length are used")
    served.add_argument("--endpoint-model", default="", help="model name to ask for (default: the server's first)")
    served.add_argument("--slot-grammar", action="store_true",
                        help="send a grammar that allows only the run's {{slots}} (llama.cpp servers; needs --run)")
    args = p.parse_args(argv)
    sources = sum(map(bool, [args.run or args.endpoint, args.base_only and not args.run, args.merged, args.gguf]))
    problems = [
        (sources != 1, "pass one of --run DIR, --base-only --model NAME, --merged DIR, --gguf FILE or --endpoint URL"),
        (args.run and not args.run.is_dir(), f"run dir {args.run} not found: pass --run a finetune.py output dir"),
        (not 1 <= args.port <= 65535, f"--port {args.port} is out of range: use 1-65535"),
        (args.auth is not None and parse_auth(args.auth) is None, "--auth must look like USER:PASSWORD, both non-empty"),
        (args.queue_size < 1, "--queue-size must be >= 1"),
        (args.slot_grammar and not (args.endpoint and args.run),
         "--slot-grammar sends the run's slot names to a llama.cpp server: pass --endpoint URL and --run DIR"),
        (args.guard and (not args.run or args.base_only), "--guard stands in front of a --run's tuned model: pass --run DIR"),
        (not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS, f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS}"),
    ]
    for bad, message in problems:
        if bad:
            raise UserError(message)
    return args


def check_port_free(host, port):
    """Fail in a second when the address is taken, rather than after loading the model."""
    import socket

    family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will, so TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as error:
            raise UserError(f"cannot serve on {host}:{port} ({error.strerror}): pass another --port or --host") from None


def parse_auth(text):
    user, colon, password = text.partition(":")
    return (user, password) if colon and user and password else None


# ----------------------------------------------------------------------------------------------------
# Generation: one shared model, streamed, one request at a time


@dataclass
class Bot:
    """The loaded model, or the server that answers, and what every request needs with it."""
    model: object  # None with an endpoint
    tokenizer: object  # None with an endpoint and no --run: prompt lengths are then estimated
    system_prompt: str
    context_tokens: int  # rendered prompt + new tokens must fit in this
    has_adapter: bool
    guard: object = None  # the run's scope.ScopeGuard, or None
    lock: threading.Lock = field(default_factory=threading.Lock)
    endpoint: Endpoint = None  # answers come from this server instead of the model
    slot_names: frozenset = None  # the {{slots}} answers may use (models.answer_rules); None: any
    intent_reader: object = None  # the run's scope.IntentReader (a run trained with intent hints), else None

    def system_prompt_for(self, message, tuned=True):
        """The tuned model's system prompt for a new message carries the intent read in it (intent hints)."""
        return system_prompts_for(self.system_prompt, [message], self.intent_reader if tuned else None)[0]

    def shown_system_prompt(self):
        """The tuned model's system prompt as the demo shows it: with intent hints, what each message adds to it."""
        if not self.intent_reader:
            return self.system_prompt
        example = "<the run's example answer of that intent>" if self.intent_reader.examples else None
        return hinted_system_prompt(self.system_prompt, "<the intent the run reads in the message>", example)


def context_size(model, config):
    """The training length when the run has one (the adapter never saw longer inputs), else the model's limit."""
    limit = getattr(model.config, "max_position_embeddings", None) or 2048
    return min(int(config.get("max_seq_length", limit)), limit)


def stream_generate(bot, messages, max_new_tokens, use_adapter=True):
    """Yield the answer as it grows. Greedy; stops at the template's end-of-turn token (the tokenizer's EOS).

    generate() runs in a thread and feeds a TextIteratorStreamer. The lock is held until that thread has
    ended, also when the browser goes away mid-answer (the stop flag ends generation at the next token).
    """
    if bot.endpoint:
        yield from bot.endpoint.stream(messages, max_new_tokens)  # the server queues concurrent requests itself
        return
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    stop = threading.Event()

    class StopWhenAsked(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop.is_set()

    tokenizer = bot.tokenizer
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(bot.model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure = []

    def work():
        try:
            with torch.inference_mode(), adapter_mode(bot.model, use_adapter):
                bot.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                   stopping_criteria=StoppingCriteriaList([StopWhenAsked()]),
                                   logits_processor=answer_rules(tokenizer, bot.slot_names, inputs["input_ids"].shape[1]))
        except Exception as error:  # shown to the user by the caller; the streamer must still end
            failure.append(error)
            streamer.end()

    with bot.lock:
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            answer = ""
            for piece in streamer:
                if piece:  # the streamer also sends empty pieces (at the end, or while a word is incomplete)
                    answer += piece
                    yield answer
        finally:
            stop.set()
            thread.join()
    if failure:
        raise failure[0]


def prompt_messages(bot, turns, message, max_new_tokens, tuned=True):
    """System prompt (for the tuned or the base model: Bot.system_prompt_for) + as many of the latest turns as fit + the
    new message; returns (messages, turns dropped)."""
    budget = bot.context_tokens - max_new_tokens
    system_prompt = bot.system_prompt_for(message, tuned)
    for dropped in range(len(turns) + 1):
        messages = [{"role": "system", "content": system_prompt}]
        for turn in turns[dropped:]:
            messages += [{"role": "user", "content": turn["user"]}, {"role": "assistant", "content": turn["answer"]}]
        messages.append({"role": "user", "content": message})
        length = prompt_tokens(bot.tokenizer, messages)
        if length <= budget:
            return messages, dropped
    raise UserError(f"this message is {length} tokens with the system prompt; with {max_new_tokens} new tokens that is over "
                    f"the model's {bot.context_tokens}-token context: shorten it or lower max new tokens")


def prompt_tokens(tokenizer, messages):
    """The rendered prompt's length in tokens; without the model's tokenizer (an endpoint without --run) an estimate on
    the safe side: 3 characters a token (English averages about 4) and 8 tokens of template per message."""
    if tokenizer is None:
        return sum(len(m["content"]) // 3 + 8 for m in messages)
    return len(tokenizer(render_chat(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False).input_ids)


# ----------------------------------------------------------------------------------------------------
# What the page shows. A conversation is kept as turns {"user", "answer"} with the model's raw answers
# (slots and all): the model sees what it wrote, and the page fills the slots for display.


def shown(answer, company, user_messages, show_raw):
    """An answer as displayed; the order number comes from the customer's latest message that has one. A sentence with
    a slot the company profile cannot fill is left out rather than shown with its braces (10 of the README run's 138
    held-out answers had one)."""
    if not answer.strip():
        return NO_TEXT  # an empty bubble would look like a broken page
    if show_raw:
        return answer
    messages = "\n".join(reversed(user_messages))
    unknown = fill_placeholders(answer, company, messages)[1]  # sentences are cut before filling: "order 55123." ends none
    return fill_placeholders(without_slots(answer, unknown), company, messages)[0]


def chat_view(turns, company, show_raw):
    """The turns as Gradio chatbot messages."""
    view = []
    for number, turn in enumerate(turns):
        users = [t["user"] for t in turns[: number + 1]]
        view += [{"role": "user", "content": turn["user"]},
                 {"role": "assistant", "content": shown(turn["answer"], company, users, show_raw)}]
    return view


def chat(bot, message, turns, company, show_raw, max_new_tokens):
    """Answer a chat message; yields (chatbot messages, turns, notice, text left in the input box) as it streams."""
    turns = list(turns or [])
    max_new_tokens = max(1, min(int(max_new_tokens), MAX_NEW_TOKENS))  # API clients can send anything
    try:
        check_prompt(message, len(turns) + 1)
        message, secrets = mask_secrets(message)  # before the model, the history or any log sees it
        messages, dropped = prompt_messages(bot, turns, message, max_new_tokens)
    except UserError as error:
        yield chat_view(turns, company, show_raw), turns, f"⚠️ {error}", message  # keep the text to edit it
        return
    notices = [f"⚠️ {SECRETS_NOTICE}"] if secrets else []
    if dropped:
        notices.append(f"The {dropped} oldest turn(s) no longer fit the {bot.context_tokens}-token context; the model does not see them.")
    notice = " ".join(notices)
    guard_reply = bot.guard.replies([message])[0] if bot.guard else None
    if guard_reply:
        turns.append({"user": message, "answer": guard_reply})
        yield chat_view(turns, company, show_raw), turns, " ".join(notices[:1] + [GUARD_NOTICE]), ""
        return
    raw = answer = ""
    try:
        for raw in stream_generate(bot, messages, max_new_tokens):
            # the guard also takes each sentence with a critical failure out of the answer as it grows
            answer = checked_answer(raw, message) if bot.guard else raw
            yield chat_view(turns + [{"user": message, "answer": answer}], company, show_raw), turns, notice, ""
    except Exception as error:  # a model failure must not take the app down
        yield chat_view(turns, company, show_raw), turns, f"⚠️ model error: {error_text(error)}", message
        return
    turns.append({"user": message, "answer": answer if answer or not raw.strip() else bot.guard.reply})
    yield chat_view(turns, company, show_raw), turns, notice, ""


def compare(bot, message, company, show_raw, max_new_tokens):
    """The same single message to the base model (adapter off) and the fine-tuned one; yields (base, tuned, notice)."""
    max_new_tokens = max(1, min(int(max_new_tokens), MAX_NEW_TOKENS))
    try:
        check_prompt(message, 1)
        message, secrets = mask_secrets(message)
        base_messages, _ = prompt_messages(bot, [], message, max_new_tokens, tuned=False)
        messages, _ = prompt_messages(bot, [], message, max_new_tokens)
    except UserError as error:
        yield "", "", f"⚠️ {error}"
        return
    notice = f"⚠️ {SECRETS_NOTICE}" if secrets else ""
    base = tuned = ""
    try:
        for base in stream_generate(bot, base_messages, max_new_tokens, use_adapter=False):
            yield shown(base, company, [message], show_raw), "", notice
        for tuned in stream_generate(bot, messages, max_new_tokens):
            yield shown(base, company, [message], show_raw), shown(tuned, company, [message], show_raw), notice
    except Exception as error:
        yield shown(base, company, [message], show_raw), shown(tuned, company, [message], show_raw), \
            f"⚠️ model error: {error_text(error)}"


def error_text(error):
    """A failure while answering, in one line: a UserError (the endpoint's) says what to do already."""
    return str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"


def edit_company(text, company):
    """A company profile edit: the new values, or the last valid ones and a message saying what is wrong."""
    try:
        return parse_company(text, "the edited company profile"), ""
    except UserError as error:
        return company, f"⚠️ {error}. Still using the last valid profile."


def example_prompts(path=HELDOUT_FILE):
    """One held-out prompt of each type (paraphrase, typo, out of scope, injection, ...)."""
    firsts = {}
    for item in read_jsonl(path, needs=("prompt",)):
        firsts.setdefault(item.get("type"), item["prompt"])
    return [[prompt] for prompt in firsts.values()]


# ----------------------------------------------------------------------------------------------------
# The app


def build_app(bot, company_text, label, max_new_tokens=DEFAULT_NEW_TOKENS):
    import gradio as gr

    company = parse_company(company_text)
    with gr.Blocks(title="Support assistant demo") as demo:
        guarded = (" Behind the run's scope guard: out-of-scope and non-English messages get its fixed replies, and a sentence "
                   "asking for a password or card number, or giving a phone number or web address of the model's own, is "
                   "left out.") if bot.guard else ""
        where = f"streamed from {bot.endpoint.url}" if bot.endpoint else "generated on this machine, one at a time"
        gr.Markdown(f"## Customer-support assistant\nModel: `{label}`. Answers are {where}.{guarded}")
        turns = gr.State([])
        company_state = gr.State(company)
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tab("Chat"):
                    chatbot = gr.Chatbot(label="Conversation", height=460)
                    message = gr.Textbox(label="Your message", placeholder="Ask about an order, a refund, your account...",
                                         lines=1, max_lines=8)  # Enter sends, Shift+Enter starts a new line
                    with gr.Row():
                        send = gr.Button("Send", variant="primary")
                        clear = gr.Button("New conversation")
                    notice = gr.Markdown()
                    gr.Examples(example_prompts(), inputs=message, label="Held-out prompts (prompts/heldout.jsonl)")
                with gr.Tab("Compare"):
                    if bot.has_adapter:
                        question = gr.Textbox(label="One message to both models", lines=2)
                        ask = gr.Button("Ask both", variant="primary")
                        with gr.Row():
                            base_answer = gr.Textbox(label="Base model (adapter off)", lines=10, interactive=False)
                            tuned_answer = gr.Textbox(label="Fine-tuned (adapter on)", lines=10, interactive=False)
                        compare_notice = gr.Markdown()
                        gr.Examples(example_prompts(), inputs=question)
                    else:
                        gr.Markdown("Compare needs a fine-tuned adapter in this process: start the demo with `--run DIR` "
                                    "(without `--endpoint`).")
            with gr.Column(scale=2):
                show_raw = gr.Checkbox(label="Show raw answers with their {{slots}}", value=False)
                new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=max_new_tokens, step=1, label="Max new tokens")
                gr.Textbox(bot.shown_system_prompt(), label="System prompt (read-only: the one the model was trained with)",
                           lines=5, interactive=False)
                company_box = gr.Code(company_text, language="yaml", label="Company profile (fills the {{slots}}; edit me)")
                company_notice = gr.Markdown()

        # Chat and Compare share one model: one concurrency group, so the queue runs one generation at a time.
        model_event = dict(concurrency_id="model", concurrency_limit=1)
        chat_inputs = [message, turns, company_state, show_raw, new_tokens]
        chat_outputs = [chatbot, turns, notice, message]
        message.submit(functools.partial(chat, bot), chat_inputs, chat_outputs, api_name="chat", **model_event)
        send.click(functools.partial(chat, bot), chat_inputs, chat_outputs, api_name=False, **model_event)
        # Redrawing and checking edits need no model: they skip the queue instead of waiting behind answers.
        ui_event = dict(api_name=False, queue=False)
        clear.click(lambda: ([], [], ""), None, [chatbot, turns, notice], **ui_event)
        redraw = dict(fn=chat_view, inputs=[turns, company_state, show_raw], outputs=chatbot, **ui_event)
        show_raw.change(**redraw)
        company_box.change(edit_company, [company_box, company_state], [company_state, company_notice],
                           **ui_event).then(**redraw)
        if bot.has_adapter:
            ask.click(functools.partial(compare, bot), [question, company_state, show_raw, new_tokens],
                      [base_answer, tuned_answer, compare_notice], api_name="compare", **model_event)
    return demo


def main(args=None):
    args = args or parse_args()
    auth = parse_auth(args.auth) if args.auth else None
    load_company(args.company)  # a broken profile stops here, before the model loads
    company_text = args.company.read_text(encoding="utf-8")
    system_prompt = read_system_prompt(args.system_prompt_file)
    check_port_free(args.host, args.port)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline demo
    tuned = bool(args.run and not args.base_only)
    guard = load_guard(args.run, args.guard) if tuned else None
    intent_reader = load_intent_reader(args.run) if tuned else None
    if guard:
        guard.replies(["warm-up message here"])  # loads MiniLM and the language model now, not on the first customer's message
    if args.endpoint:
        bot, label = endpoint_bot(args, system_prompt, guard, intent_reader)
    else:
        model, tokenizer, config = load_for_inference(**model_source(args))
        bot = Bot(model, tokenizer, system_prompt, context_size(model, config), has_adapter=tuned, guard=guard,
                  slot_names=run_slot_names(args.run) if args.run else None, intent_reader=intent_reader)
        label = args.run or args.merged or args.gguf or args.model or config.get("base_model") or "base model"
    import gradio as gr

    demo = build_app(bot, company_text, label, args.max_new_tokens)
    demo.queue(default_concurrency_limit=1, max_size=args.queue_size)
    theme = gr.themes.Default(font=FONTS, font_mono=MONO_FONTS)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth, theme=theme)


def endpoint_bot(args, system_prompt, guard, intent_reader):
    """A Bot whose answers stream from --endpoint: the server is asked for its model now (a dead one is one error line);
    with --run, the run's tokenizer and training length bound the prompt, else an estimate and SERVER_CONTEXT_TOKENS."""
    grammar = slot_grammar(run_slot_names(args.run)) if args.slot_grammar else ""
    server = Endpoint(args.endpoint, args.endpoint_model, grammar=grammar)
    server.served_model()
    tokenizer, context = None, SERVER_CONTEXT_TOKENS
    if args.run:
        from transformers import AutoTokenizer

        config = run_config(args.run)
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(Path(args.run) / "adapter"))  # saved with the adapter
        context = int(config.get("max_seq_length", context))
    return (Bot(None, tokenizer, system_prompt, context, has_adapter=False, guard=guard, endpoint=server,
                intent_reader=intent_reader), f"{server.model} at {server.url}")


if __name__ == "__main__":
    run_main(main)
