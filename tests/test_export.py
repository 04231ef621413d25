"""Export: merged weights, GGUF files and the Ollama Modelfile from the tiny model and the real SmolLM2, bad inputs."""
import json
import shutil

import pytest

import export
from common import SYSTEM_PROMPT_FILE
from conftest import run_script


# ----------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2, nothing written


def test_from_run_that_does_not_exist(tmp_path):
    result = run_script("finetune.py", "--from-run", tmp_path / "nope", "--export", "merged")
    assert result.returncode == 2 and "is not a directory" in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_from_run_without_adapter(tiny_run, tmp_path):
    broken = tmp_path / "run"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_run / "config.json").read_text())
    result = run_script("finetune.py", "--from-run", broken, "--export", "merged")
    assert result.returncode == 2 and "no adapter in" in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (broken / "export").exists() and not (broken / "export.partial").exists()


@pytest.mark.parametrize("flags, message", [
    (["--export", "onnx"], "--export takes merged, gguf"),
    (["--export", "merged,gguf,q4"], "--export takes merged, gguf"),
    (["--from-run", "runs/x"], "add --export"),
    (["--export", "gguf", "--export-check-limit", "0"], "--export-check-limit must be >= 1"),
])
def test_bad_export_flags(flags, message):
    result = run_script("finetune.py", *flags)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--merged", "nowhere", "--compare"], "drop --compare"),
    (["--run", "a", "--gguf", "b.gguf"], "pass one of --run, --merged and --gguf"),
])
def test_bad_infer_export_flags(flags, message):
    result = run_script("infer.py", *flags, "--prompt", "hi")
    assert result.returncode == 2 and message in result.stderr


def test_infer_rejects_a_missing_merged_dir_and_a_non_gguf_file(tmp_path):
    result = run_script("infer.py", "--merged", tmp_path, "--prompt", "hi")
    assert result.returncode == 2 and "is not a merged model dir" in result.stderr
    result = run_script("infer.py", "--gguf", tmp_path / "model.bin", "--prompt", "hi")
    assert result.returncode == 2 and "is not a .gguf file" in result.stderr


def test_missing_converter_is_a_one_line_error(tiny_run, monkeypatch, tmp_path):
    monkeypatch.setattr(export, "LLAMA_CPP_DIR", tmp_path)
    with pytest.raises(export.UserError, match="run ./setup.sh"):
        export.export_run(tiny_run, ["gguf"], SYSTEM_PROMPT_FILE)


def test_an_export_below_its_agreement_threshold_is_an_error_and_leaves_nothing(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("export*"))
    # no export can agree on more than all prompts: the real check runs (load, merge, answer, compare), then refuses
    with pytest.raises(export.UserError, match="below --export-min-agreement 1.01: nothing exported"):
        export.export_run(run, ["merged"], SYSTEM_PROMPT_FILE, check_limit=1, max_new_tokens=2,
                          min_agreement=1.01)
    assert not (run / "export").exists() and not (run / "export.partial").exists()


# ----------------------------------------------------------------------------------------------------
# Ollama template


def test_ollama_templates_match_the_models_own_chat_templates(llama_tokenizer):
    from models import TEMPLATE_DATE, load_tokenizer

    system = "Be helpful."
    llama = export.ollama_template(llama_tokenizer, system)
    assert llama.startswith("{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date")
    assert f"Today Date: {TEMPLATE_DATE}" in llama and "{{ .Content }}<|eot_id|>" in llama
    chatml = export.ollama_template(load_tokenizer("smollm2"), system)
    assert chatml == ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ range .Messages }}'
                      '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n'
                      '{{ else if eq .Role "assistant" }}{{ .Content }}<|im_end|>\n{{ end }}{{ end }}')


# ----------------------------------------------------------------------------------------------------
# Whole exports


def test_tiny_model_export_merged_and_gguf(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("SUPPORT_LLM_CACHE", str(tmp_path / "cache"))  # GGUF files read back are dequantized there
    result = run_script("finetune.py", "--from-run", tiny_run, "--export", "merged,gguf", "--export-check-limit", "3",
                        "--eval-max-new-tokens", "6", "--export-min-agreement", "0", timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tiny_run / "export"
    assert not (tiny_run / "export.partial").exists()
    assert {"merged", "model-f16.gguf", "model-q8_0.gguf", "Modelfile", "check.json"} <= {p.name for p in out.iterdir()}
    assert (out / "merged" / "model.safetensors").is_file() and (out / "merged" / "tokenizer.json").is_file()
    assert json.loads((out / "merged" / "generation_config.json").read_text())["eos_token_id"] == 128009  # <|eot_id|>
    check = json.loads((out / "check.json").read_text())
    assert check["prompts"] == 3 and check["merged"]["dtype"] == "float16"
    # a random tiny model has near-flat logits, so rounding may flip greedy tokens: the figure must exist, not be high
    assert 0 <= check["merged"]["agreement"] <= 1 and len(check["merged"]["differences"]) == 3 - check["merged"]["same"]
    for name in ("model-f16.gguf", "model-q8_0.gguf"):
        gguf = check["gguf"][name]
        # transformers' GGUF reader splits Llama 3's "\n\n" into two tokens, so its prompt ids may differ: recorded only
        assert gguf["bytes"] == (out / name).stat().st_size and gguf["same_prompt_token_ids"] in (True, False), gguf
        assert gguf["tokenizer_pre"] == "llama-bpe" and 0 <= gguf["agreement"] <= 1
        assert gguf["tokenizer_model"] == "gpt2" and gguf["eos_token_id"] == 128009
    assert check["gguf"]["model-q8_0.gguf"]["bytes"] < check["gguf"]["model-f16.gguf"]["bytes"]
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf\n") and 'PARAMETER stop "<|eot_id|>"' in modelfile
    assert "customer-support assistant" in modelfile.split('SYSTEM """')[1]
    assert "merged/" in result.stdout and "model-q8_0.gguf" in result.stdout

    answers = tmp_path / "answers.jsonl"
    result = run_script("infer.py", "--gguf", out / "model-q8_0.gguf", "--prompt", "Where is my order?", "--max-new-tokens", "4")
    assert result.returncode == 0 and "> Where is my order?" in result.stdout, result.stderr[-2000:]
    result = run_script("infer.py", "--merged", out / "merged", "--prompts", "prompts/heldout.jsonl", "--limit", "2",
                        "--max-new-tokens", "4", "--out", answers)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(answers.read_text().splitlines()) == 2


def test_smollm2_export_agrees_with_the_adapter(smollm2_run, tmp_path, monkeypatch):
    monkeypatch.setenv("SUPPORT_LLM_CACHE", str(tmp_path / "cache"))  # not ~/.cache: each GGUF read back is 0.5 GB there
    result = run_script("finetune.py", "--from-run", smollm2_run, "--export", "merged,gguf", "--export-check-limit", "3",
                        "--eval-max-new-tokens", "16", timeout=2400)
    assert result.returncode == 0, result.stderr[-3000:]
    out = smollm2_run / "export"
    check = json.loads((out / "check.json").read_text())
    assert check["merged"]["agreement"] >= 0.9, check["merged"]
    q8 = check["gguf"]["model-q8_0.gguf"]
    assert q8["tokenizer_model"] == "gpt2" and q8["tokenizer_pre"] == "smollm" and q8["same_prompt_token_ids"], q8
    assert q8["eos_token_id"] == 2 and q8["agreement"] >= 0.5, q8  # <|im_end|>; 8-bit weights may change a few tokens
    assert 'PARAMETER stop "<|im_end|>"' in (out / "Modelfile").read_text()
    result = run_script("infer.py", "--gguf", out / "model-q8_0.gguf", "--prompt", "I wanna cancel #12345", "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.split("\n", 2)[1].strip()) > 10  # an answer, not an empty line
