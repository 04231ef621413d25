"""Export a finished finetune.py run for local serving: merged 16-bit weights, GGUF files and an Ollama Modelfile.

    python finetune.py --from-run runs/smollm2 --export merged,gguf     # or --export merged,gguf when training

Writes RUN/export/ (built in RUN/export.partial/, renamed when complete):
    merged/                          safetensors + tokenizer + generation_config.json (eos = the template's end token)
    model-f16.gguf, model-q8_0.gguf  llama.cpp's converter (setup.sh puts it in .venv/llama.cpp)
    model-q4_k_m.gguf                llama.cpp's quantizer (llama-cpp-python, installed by setup.sh)
    Modelfile                        for `ollama create`: the GGUF, the chat template in Go form, system prompt, stops
    check.json                       the merged model's greedy answers to the held-out prompts against the adapter's;
                                     each GGUF run in llama.cpp through the chat template stored in it: its prompt ids,
                                     its first 32 answer tokens and its end token against the merged model's; sizes
Serve a GGUF with llama.cpp's OpenAI-compatible server and evaluate it there (see README, Serving):
    .venv/bin/python -m llama_cpp.server --model runs/smollm2/export/model-q8_0.gguf --port 8080 --n_threads $(nproc)
    .venv/bin/python infer.py --endpoint http://127.0.0.1:8080/v1 --prompts prompts/heldout.jsonl --out answers.jsonl
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from common import HELDOUT_FILE, REPO, UserError, building, read_prompts, read_system_prompt, run_main, shown_path, write_json
from models import (GENERATION_BATCH_SIZE, TEMPLATE_DATE, chat_messages, dtype_name, each_system_prompt, generate,
                    load_for_inference, merge_adapter, render_chat, run_config, template_with_pinned_date)
from scope import load_intent_reader, system_prompts_for

FORMATS = ("merged", "gguf")
LLAMA_CPP_DIR = REPO / ".venv" / "llama.cpp"  # setup.sh extracts llama.cpp's converter here
GGUF_TYPES = ("f16", "q8_0")  # what the Python converter writes itself; q4_k_m comes from llama.cpp's quantizer
MIN_AGREEMENT = 0.9  # merged vs adapter: the same weights, summed in another order, should rarely change a greedy token
# Held to MIN_AGREEMENT too: the f16 GGUF is the merged model's own weights (20/20 on the README run). q8_0 and q4_k_m are
# reported only: llama.cpp also rounds the activations to 8 bits in their matmuls, and on SmolLM2's near-tie tokens
# q8_0 kept the merged model's first 32 tokens on 6 of 20 held-out prompts, q4_k_m on 0 (README, Local chat).
LOSSLESS_GGUFS = ("model-f16.gguf",)
PREFIX_TOKENS = 32  # a GGUF answer in llama.cpp agrees when its first 32 tokens are the merged model's
STOP_CHECK_TOKENS = 256  # and it should end with the end token within this many
# Ollama wants the chat template in Go's text/template form. One entry per chat format this project trains with,
# keyed by its end-of-turn token: the BOS the template writes, how a turn starts, what the system turn begins with
# (Llama 3's pinned date, see models.TEMPLATE_DATE) and how a turn ends. write_modelfile checks the entry against
# the model's own template before using it.
OLLAMA_FORMATS = {
    "<|im_end|>": {"bos": "", "start": "<|im_start|>{role}\n", "system_prefix": "", "end": "<|im_end|>\n",
                   "stops": ["<|im_end|>", "<|im_start|>"]},  # ChatML: SmolLM2, Qwen
    "<|eot_id|>": {"bos": "<|begin_of_text|>", "start": "<|start_header_id|>{role}<|end_header_id|>\n\n",
                   "system_prefix": f"Cutting Knowledge Date: December 2023\nToday Date: {TEMPLATE_DATE}\n\n",
                   "end": "<|eot_id|>", "stops": ["<|eot_id|>", "<|start_header_id|>"]},  # Llama 3.x
}


def parse_formats(text):
    """--export merged,gguf -> ["merged", "gguf"]; None for an unknown name (the caller reports it)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    return names if names and set(names) <= set(FORMATS) else None


def converter():
    script = LLAMA_CPP_DIR / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise UserError(f"the GGUF converter is missing ({script}): run ./setup.sh, which fetches it from the llama-cpp-python source package")
    return script


def export_run(run, formats, system_prompt_file, check_limit=None, max_new_tokens=256, batch_size=GENERATION_BATCH_SIZE,
               min_agreement=MIN_AGREEMENT):
    """Export a finished run (RUN/config.json + RUN/adapter/) and check every file against the model it came from.

    A merged model that gives the adapter's greedy answer on fewer than min_agreement of the prompts is an error, and
    nothing is left in RUN/export: it would serve a different model from the one that was evaluated."""
    run_config(run)  # a finished run, or a one-line error before anything loads
    if "gguf" in formats:
        converter()
        llama_cpp_module()
    prompts = [item["prompt"] for item in read_prompts(HELDOUT_FILE, check_limit)]
    system_prompt = read_system_prompt(system_prompt_file)  # the Modelfile's; the checks ask as the run answers:
    system_prompts = system_prompts_for(system_prompt, prompts, load_intent_reader(run))

    def answer(model, tokenizer):
        return generate(model, tokenizer, prompts, system_prompts, max_new_tokens, batch_size)

    with building(Path(run) / "export") as partial:  # nothing is left in RUN/export when a check fails
        # The adapter's answers come from the base in 16 or 32 bits, never 4-bit NF4: merging needs those weights, and
        # the merged model is then the same function up to rounding, so its answers should match.
        model, tokenizer, _ = load_for_inference(run=run, base_in_4bit=False)
        adapter_answers = answer(model, tokenizer)
        dtype = save_merged(merge_adapter(model), tokenizer, partial / "merged")
        del model
        merged_answers = answer(*load_for_inference(merged=partial / "merged")[:2])
        check = {"prompts": len(prompts), "prompt_file": shown_path(HELDOUT_FILE), "max_new_tokens": max_new_tokens,
                 "greedy": True, "min_agreement": min_agreement,
                 "merged": dict(dtype=dtype, bytes=folder_bytes(partial / "merged"), against="adapter",
                                **agreement(adapter_answers, merged_answers, tokenizer))}
        if check["merged"]["agreement"] < min_agreement:
            raise UserError(f"the merged model ({dtype}) gives the adapter's greedy answer on only {check['merged']['same']} of "
                            f"{len(prompts)} prompts, below --export-min-agreement {min_agreement:g}: nothing exported; report "
                            "it with the run's metrics.json (compute_dtype), or lower the threshold to keep such an export")
        if "gguf" in formats:
            check.update(export_ggufs(partial, tokenizer, prompts, system_prompts, merged_answers, max_new_tokens, min_agreement))
            check["modelfile"] = write_modelfile(partial, tokenizer, system_prompt)
        write_json(partial / "check.json", check)
    print_summary(Path(run) / "export", check)
    return check


def export_ggufs(folder, tokenizer, prompts, system_prompts, merged_answers, max_new_tokens, min_agreement):
    """The GGUF files, each checked in llama.cpp against the merged model (system_prompts: one for all prompts, or one
    per prompt), their part of check.json. An f16 file (LOSSLESS_GGUFS) below min_agreement is an error (nothing is
    exported)."""
    check = {"gguf": {}}
    for path in write_ggufs(folder / "merged", folder):
        found = llama_cpp_check(path, tokenizer, prompts, system_prompts, merged_answers, max_new_tokens)
        check["gguf"][path.name] = dict(bytes=path.stat().st_size, **gguf_metadata(path), **found)
        if path.name in LOSSLESS_GGUFS and found["agreement"] < min_agreement:
            raise UserError(f"{path.name} in llama.cpp gives the merged model's first {PREFIX_TOKENS} answer tokens on only "
                            f"{found['same']} of {len(prompts)} prompts, below --export-min-agreement {min_agreement:g}: "
                            "nothing exported; report it with the run's metrics.json")
    return check


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        raise UserError("the GGUF check runs llama.cpp through llama-cpp-python, which is not installed: run ./setup.sh") from None
    return llama_cpp


def llama_cpp_check(path, tokenizer, prompts, system_prompts, merged_answers, max_new_tokens):
    """The GGUF in llama.cpp itself (llama-cpp-python), greedy: for how many prompts do the chat template stored in the
    file and llama.cpp's tokenizer give the merged tokenizer's prompt token ids, and, from those ids, do its first
    PREFIX_TOKENS answer tokens match the merged model's, and how many answers end with the end token within
    STOP_CHECK_TOKENS?"""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = Llama(model_path=str(path), n_ctx=4096, n_threads=os.cpu_count(), verbose=False)
    eos = llm.token_eos()
    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token=llm._model.token_get_text(eos),
                                    bos_token=llm._model.token_get_text(llm.token_bos()), stop_token_ids=[eos])
    same_ids, differences, stopped = 0, [], 0
    for prompt, system_prompt, merged in zip(prompts, each_system_prompt(system_prompts, prompts), merged_answers):
        messages = chat_messages(system_prompt, prompt)
        formatted = formatter(messages=messages)  # what create_chat_completion sends: the file's template, then tokenize
        ids = llm.tokenize(formatted.prompt.encode(), add_bos=not formatted.added_special, special=True)
        own = tokenizer(render_chat(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        same_ids += ids == own
        llm.reset()
        # From the merged tokenizer's ids, so that the weights are compared on the same input: llama.cpp's SmolLM2
        # pre-tokenizer gives whitespace before a digit as one token where the HF tokenizer gives two ("\n\n1." in
        # the numbered example answers of intent hints), which changed 2 of 20 answers of the 8-step test run (7 Dec);
        # that difference is counted in prompts_with_same_token_ids, not against the weights.
        choice = llm.create_completion(own, temperature=0, max_tokens=max(max_new_tokens, STOP_CHECK_TOKENS))["choices"][0]
        text = choice["text"] or ""
        prefix = tokenizer.decode(merged["token_ids"][:PREFIX_TOKENS], skip_special_tokens=True).strip().rstrip("\ufffd")
        ended = merged["stopped_at_eos"] and len(merged["token_ids"]) <= PREFIX_TOKENS  # else llama.cpp's goes on past it
        if not (text.strip() == prefix if ended else text.strip().startswith(prefix)):
            differences.append({"prompt": prompt, "merged": prefix, "llama.cpp": text.strip()[:len(prefix) + 20]})
        stopped += choice["finish_reason"] == "stop"
    same = len(prompts) - len(differences)
    return {"runtime": f"llama.cpp (llama-cpp-python {llama_cpp_module().__version__})", "against": "merged",
            "prompts_with_same_token_ids": same_ids, "first_tokens_compared": PREFIX_TOKENS, "same": same,
            "agreement": round(same / len(prompts), 4), "stopped_at_end_token": round(stopped / len(prompts), 4),
            "differences": differences}


def save_merged(model, tokenizer, folder):
    """Save merged weights in 16 bits with the template's end token as EOS; returns the dtype's name.

    On a GPU the merge ran in the loaded 16-bit dtype (bf16, or fp16 on a T4). On a CPU it ran in fp32 and is saved as
    fp16: 3 more mantissa bits than bf16, so the file stays closest to the fp32 adapter model the check compares with
    (Llama and SmolLM2 weights are far inside fp16's range), and the f16 GGUF is then a lossless copy.
    """
    import torch

    dtype = torch.float16 if model.dtype == torch.float32 else model.dtype
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.to(dtype).save_pretrained(folder)
    tokenizer.chat_template = template_with_pinned_date(tokenizer.chat_template)  # and so every GGUF made from it
    tokenizer.save_pretrained(folder)
    untangle_byte_level_tokenizer(folder / "tokenizer.json")
    return dtype_name(dtype)


def untangle_byte_level_tokenizer(path):
    """Clear byte_fallback on a byte-level BPE tokenizer.json; it never fires there (every byte has a token).

    transformers sets it when it rebuilds SmolLM2's tokenizer from a GGUF file, and llama.cpp's converter then takes the
    vocabulary for a SentencePiece one (tokenizer.ggml.model "llama"): that GGUF read back with other token ids.
    """
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if data["model"].get("byte_fallback") and "ByteLevel" in json.dumps(data.get("pre_tokenizer")):
        data["model"]["byte_fallback"] = False
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def write_ggufs(merged, folder):
    """f16 and q8_0 GGUF files from the merged checkpoint (llama.cpp's converter), and q4_k_m from the f16 one (its
    quantizer, through llama-cpp-python)."""
    import ctypes

    script, paths = converter(), []
    env = {"PYTHONPATH": f"{script.parent / 'gguf-py'}:{script.parent}"}
    for outtype in GGUF_TYPES:
        path = folder / f"model-{outtype}.gguf"
        run_tool([sys.executable, str(script), str(merged), "--outfile", str(path), "--outtype", outtype], path, env)
        paths.append(path)
    llama_cpp, q4 = llama_cpp_module(), folder / "model-q4_k_m.gguf"
    print(f"writing {q4.name}", flush=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, os.cpu_count()
    if llama_cpp.llama_model_quantize(str(paths[0]).encode(), str(q4).encode(), ctypes.byref(params)) != 0:
        raise UserError(f"llama.cpp's quantizer could not write {q4.name}: re-run ./setup.sh, or export merged only")
    return paths + [q4]


def run_tool(command, output, env=None):
    print(f"writing {output.name}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"writing {output.name} failed ({last[:200]}): see {LLAMA_CPP_DIR} or re-run ./setup.sh")


def gguf_metadata(path):
    """The GGUF's own tokenizer type and special ids, as llama.cpp will read them."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    keys = {"tokenizer_model": "tokenizer.ggml.model", "tokenizer_pre": "tokenizer.ggml.pre",
            "eos_token_id": "tokenizer.ggml.eos_token_id", "add_bos_token": "tokenizer.ggml.add_bos_token"}
    return {name: fields[key].contents() if key in fields else None for name, key in keys.items()}


def agreement(reference, answers, tokenizer):
    """Share of prompts with token-for-token the same greedy answer; where they differ, the first differing token."""
    differences = []
    for ref, ans in zip(reference, answers):
        a, b = ref["token_ids"], ans["token_ids"]
        if a != b:
            position = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            differences.append({"prompt": ref["prompt"], "position": position,
                                "reference_token": token_at(tokenizer, a, position), "token": token_at(tokenizer, b, position)})
    same = len(reference) - len(differences)
    return {"same": same, "agreement": round(same / len(reference), 4), "differences": differences}


def token_at(tokenizer, ids, position):
    return tokenizer.decode(ids[position:position + 1]) if position < len(ids) else "(answer ended)"


def ollama_template(tokenizer, system_prompt):
    """The Go template for the tokenizer's chat format; None when it is not one of OLLAMA_FORMATS or renders differently."""
    fmt = OLLAMA_FORMATS.get(tokenizer.eos_token)
    if fmt is None:
        return None
    start, end = fmt["start"].format, fmt["end"]
    ours = (fmt["bos"] + start(role="system") + fmt["system_prefix"] + system_prompt + end
            + start(role="user") + "Where is my order?" + end + start(role="assistant"))
    if ours != render_chat(tokenizer, chat_messages(system_prompt, "Where is my order?"), add_generation_prompt=True):
        return None
    # llama.cpp adds the BOS itself (the GGUF's add_bos_token); .System is the Modelfile's SYSTEM unless a request sends one.
    return ("{{ if .System }}" + start(role="system") + fmt["system_prefix"] + "{{ .System }}" + end + "{{ end }}"
            + '{{ range .Messages }}{{ if eq .Role "user" }}' + start(role="user") + "{{ .Content }}" + end + start(role="assistant")
            + '{{ else if eq .Role "assistant" }}{{ .Content }}' + end + "{{ end }}{{ end }}")


def write_modelfile(folder, tokenizer, system_prompt):
    """An Ollama Modelfile for the q8_0 GGUF; returns a line saying what was written, or why not."""
    template = ollama_template(tokenizer, system_prompt)
    if template is None:
        return f"skipped: no Ollama template for this chat format (end token {tokenizer.eos_token}); the GGUF files work with llama.cpp"
    if '"""' in system_prompt:
        return 'skipped: the system prompt contains """, which a Modelfile cannot quote'
    stops = "".join(f'PARAMETER stop "{stop}"\n' for stop in OLLAMA_FORMATS[tokenizer.eos_token]["stops"])
    (folder / "Modelfile").write_text(f'FROM ./model-q8_0.gguf\nTEMPLATE """{template}"""\nSYSTEM """{system_prompt}"""\n'
                                      f"{stops}PARAMETER temperature 0\n", encoding="utf-8")
    return "written: FROM ./model-q8_0.gguf"


def folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def print_summary(folder, check):
    merged = check["merged"]
    print(f"export: {folder} (check.json: {check['prompts']} held-out prompts, greedy, up to {check['max_new_tokens']} new tokens)")
    print(f"  merged/ ({merged['dtype']}, {merged['bytes'] / 1e6:.0f} MB): same answer as the adapter for "
          f"{merged['same']}/{check['prompts']} prompts ({merged['agreement']:.1%})")
    for name, gguf in check.get("gguf", {}).items():
        print(f"  {name} ({gguf['bytes'] / 1e6:.0f} MB, tokenizer {gguf['tokenizer_model']}/{gguf['tokenizer_pre']}) in "
              f"llama.cpp: its chat template and tokenizer give the merged prompt ids for "
              f"{gguf['prompts_with_same_token_ids']}/{check['prompts']} prompts; from those ids, "
              f"first {gguf['first_tokens_compared']} answer tokens as merged for {gguf['same']}/{check['prompts']} "
              f"({gguf['agreement']:.1%}); ended with the end token within {STOP_CHECK_TOKENS}: {gguf['stopped_at_end_token']:.0%}")
    if "modelfile" in check:
        print(f"  modelfile: {check['modelfile']}")


# ----------------------------------------------------------------------------------------------------
# Sharing a run on the Hugging Face hub

# What of a finished run goes to the hub: the card, the adapter, the guard, the intent reader, the exports and the
# evaluation's summary; not the split files (the data stays where it is unless you share it), checkpoints or logs.
HUB_PATTERNS = ("README.md", "config.json", "metrics.json", "manifest.json", "guard.json", "intents.json", "LICENSE_CDLA-Sharing-1.0.txt",
                "adapter/*", "export/*", "export/merged/*", "eval/summary.json", "eval/report.md", "eval/metrics.png")
HUB_TOKEN_VARIABLE = "HF_TOKEN"


def hub_upload_plan(run):
    """The files of RUN that --push-to-hub uploads (HUB_PATTERNS), with their sizes in bytes."""
    run = Path(run)
    run_config(run)
    return {str(path.relative_to(run)): path.stat().st_size for pattern in HUB_PATTERNS for path in sorted(run.glob(pattern))
            if path.is_file()}


def check_hub_repo(repo_id, need_token):
    """A one-line error for a repo id that is not org/name, or a missing token; the token, else None. finetune.py checks
    before training, so a long run does not end in that error."""
    from data import HUB_ID

    if not HUB_ID.fullmatch(repo_id):
        raise UserError(f"--push-to-hub {repo_id!r} is not a hub repo id: use your-name/support-assistant")
    token = os.environ.get(HUB_TOKEN_VARIABLE)
    if need_token and not token:
        raise UserError(f"--push-to-hub needs a hub token with write access in ${HUB_TOKEN_VARIABLE} "
                        "(huggingface.co/settings/tokens), or add --dry-run to see what would be uploaded")
    return token


def push_to_hub(run, repo_id, dry_run=False, private=True):
    """Upload the run's shareable files to a hub model repo (created private if missing), or with dry_run only list them
    and the card's metadata. The token comes from $HF_TOKEN only, never from a flag or a file here."""
    token = check_hub_repo(repo_id, need_token=not dry_run)
    plan = hub_upload_plan(run)
    card = (Path(run) / "README.md").read_text(encoding="utf-8")
    metadata = card.split("---", 2)[1].strip() if card.startswith("---") else "(none)"
    print(f"{'would upload' if dry_run else 'uploading'} {len(plan)} files ({sum(plan.values()) / 1e6:.1f} MB) from {run} "
          f"to https://huggingface.co/{repo_id}:")
    for name, size in plan.items():
        print(f"  {name}  {size / 1e6:.2f} MB")
    print(f"model card metadata:\n{metadata}")
    if dry_run:
        return plan
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(run), repo_id=repo_id, allow_patterns=list(plan),
                          commit_message="Upload a customer-support adapter from finetune.py")
    except Exception as error:  # the hub client raises many types (HTTP, auth, network); all end this command
        raise UserError(f"the upload to {repo_id} failed ({type(error).__name__}: {str(error).splitlines()[0][:150]}): check "
                        f"${HUB_TOKEN_VARIABLE} and the network, then run the same command again") from None
    print(f"uploaded: https://huggingface.co/{repo_id}")
    return plan


def main():
    raise UserError("export.py is a module, not a command: run python finetune.py --from-run RUN --export merged,gguf")


if __name__ == "__main__":
    run_main(main)
