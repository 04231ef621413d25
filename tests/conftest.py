"""Shared fixtures: a tiny random Llama with the real Llama 3.2 tokenizer, small data files, a script runner."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LLAMA_TOKENIZER = SHARED / "tokenizers" / "llama-3.2-instruct"
sys.path.insert(0, str(REPO))


def run_script(script, *args, timeout=900, cwd=REPO):
    """Run an entry script as a user would; returns the CompletedProcess (never raises on exit status)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def assert_user_error(result, message):
    """A bad input: exit 2 and one `error:` line naming it, no traceback (libraries may log above it)."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-2000:]


@pytest.fixture(scope="session")
def llama_tokenizer():
    from transformers import AutoTokenizer

    from models import prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(LLAMA_TOKENIZER))


def make_tiny_llama(folder, initializer_range=0.02):
    """A randomly initialised 2-layer Llama (hidden 64) with the real Llama 3.2 tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=128000, eos_token_id=128009, pad_token_id=128004, tie_word_embeddings=True,
                         initializer_range=initializer_range)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        shutil.copy(LLAMA_TOKENIZER / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def bundled_rows():
    from data import BUNDLED_DATA, read_table

    return read_table(BUNDLED_DATA)


def write_small_csv(rows, path):
    """40 real Bitext rows over 8 intents, 5 each, in the original column layout."""
    picked = rows.groupby("intent").head(5)
    picked[picked["intent"].isin(sorted(picked["intent"].unique())[:8])].to_csv(path, index=False)
    return path


@pytest.fixture
def small_csv(tmp_path, bundled_rows):
    return write_small_csv(bundled_rows, tmp_path / "small.csv")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_llama, bundled_rows):
    """A finished finetune.py run of the tiny random Llama (3 steps, no held-out comparison)."""
    folder = tmp_path_factory.mktemp("tiny-run")
    data = write_small_csv(bundled_rows, folder / "small.csv")
    result = run_script("finetune.py", "--dataset", data, "--model", tiny_llama, "--output-dir", folder / "run",
                        "--max-steps", "3", "--no-compare")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run"


def readme_command(prefix):
    """The README's command line (after ./setup.sh &&) that contains `prefix`, split into arguments."""
    readme = (REPO / "README.md").read_text()
    line = next(l for l in re.findall(r"^\s*(\./setup\.sh && .+)$", readme, re.M) if prefix in l)
    return shlex.split(line.split("&&", 1)[1])


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory):
    """The README's training command on the real SmolLM2, shortened to 8 steps (shared by several tests)."""
    argv = readme_command("finetune.py")
    assert argv[:2] == [".venv/bin/python", "finetune.py"]
    out = tmp_path_factory.mktemp("smollm2") / "run"
    result = run_script("finetune.py", *argv[2:], "--output-dir", out, "--max-steps", "8", "--grad-accum", "1",
                        "--learning-rate", "5e-4", "--no-compare")
    assert result.returncode == 0, result.stderr[-3000:]
    return out
