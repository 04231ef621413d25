"""Serving speed: an exported GGUF in llama.cpp's OpenAI-compatible server against infer.py's in-process generation.

    python benchmarks/serving_bench.py --export runs/smollm2/export --out benchmarks/results/serving_cpu.json
    python benchmarks/serving_bench.py --export RUN/export --limit 4 --concurrency 1,2 --max-new-tokens 8 --out /tmp/s.json

One run, same machine, same held-out prompts, greedy, a fixed --max-new-tokens:
- in process: the export's merged/ checkpoint loaded as `infer.py --merged` loads it, answering with models.generate
  in batches of --batch-size (infer.py's default 16);
- llama.cpp: `python -m llama_cpp.server` (llama-cpp-python, built by setup.sh) serving the export's q8_0 GGUF on a
  loopback port (its output in OUT.server.log), answered through endpoint.answers (what `infer.py --endpoint` uses)
  with each --concurrency; then, where --llama-server exists (`./setup.sh --llama-server` builds it), llama.cpp's C++
  server with as many parallel slots as the highest --concurrency (its output in OUT.llama-server.log).
New tokens per second of wall time: every answer's new tokens (as each side counts them, end token included) over
the time from the first request to the last answer. Each side first answers one prompt to warm up, not counted.
"""
import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import endpoint  # noqa: E402
from common import HELDOUT_FILE, read_prompts, read_system_prompt, run_main, shown_path, write_json  # noqa: E402
from models import GENERATION_BATCH_SIZE, generate, load_for_inference  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, required=True, help="RUN/export of finetune.py --export merged,gguf")
    p.add_argument("--gguf", default="model-q8_0.gguf", help="which GGUF in --export the server loads")
    p.add_argument("--prompts", type=Path, default=HELDOUT_FILE)
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=GENERATION_BATCH_SIZE, help="in-process batch (infer.py's default)")
    p.add_argument("--concurrency", default="1,16", help="requests in flight at the server, one measurement each")
    p.add_argument("--llama-server", type=Path, default=REPO / ".venv/bin/llama-server",
                   help="llama.cpp's C++ server binary; left out where it does not exist")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serving.json"))
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.exit(2, "error: --concurrency takes numbers like 1,16\n")
    if not (args.export / "merged").is_dir() or not (args.export / args.gguf).is_file():
        p.exit(2, f"error: {args.export} has no merged/ and {args.gguf}: run finetune.py --from-run RUN --export merged,gguf\n")
    return args


def in_process(merged, prompts, system_prompt, max_new_tokens, batch_size):
    model, tokenizer, _ = load_for_inference(merged=merged)
    generate(model, tokenizer, prompts[:1], system_prompt, 4, 1)  # warm-up
    started = time.time()
    records = generate(model, tokenizer, prompts, system_prompt, max_new_tokens, batch_size)
    return measured(records, time.time() - started, f"in process (merged/, batch {batch_size})")


def served(gguf, prompts, system_prompt, max_new_tokens, concurrencies, log, binary=None):
    """llama.cpp's server with the GGUF (llama-cpp-python's, or the C++ `binary` with a slot per request in flight),
    measured at each concurrency, stopped at the end."""
    name = "llama-server" if binary else "llama-cpp-python server"
    with endpoint.llama_cpp_server(gguf, log, binary, parallel=max(concurrencies)) as url:
        server = endpoint.Endpoint(url)
        endpoint.answers(server, prompts[:1], system_prompt, 4, 1)  # warm-up
        results = []
        for concurrency in concurrencies:
            started = time.time()
            records = endpoint.answers(server, prompts, system_prompt, max_new_tokens, concurrency)
            results.append(measured(records, time.time() - started, f"{name} ({gguf.name}), concurrency {concurrency}"))
        return results


def measured(records, seconds, name):
    tokens = sum(r["new_tokens"] for r in records)
    return {"name": name, "prompts": len(records), "new_tokens": tokens, "seconds": round(seconds, 2),
            "new_tokens_per_s": round(tokens / seconds, 1), "stopped_at_eos": sum(r["stopped_at_eos"] for r in records)}


def main():
    args = parse_args()
    prompts = [item["prompt"] for item in read_prompts(args.prompts, args.limit)]
    system_prompt = read_system_prompt()
    rows = [in_process(args.export / "merged", prompts, system_prompt, args.max_new_tokens, args.batch_size)]
    rows += served(args.export / args.gguf, prompts, system_prompt, args.max_new_tokens, args.concurrency,
                   args.out.with_suffix(".server.log"))
    if args.llama_server.is_file():
        rows += served(args.export / args.gguf, prompts, system_prompt, args.max_new_tokens, args.concurrency,
                       args.out.with_suffix(".llama-server.log"), args.llama_server)
    else:
        print(f"no {shown_path(args.llama_server)}: the C++ server is left out (./setup.sh --llama-server builds it)")
    for row in rows:
        row["speedup_vs_in_process"] = round(row["new_tokens_per_s"] / rows[0]["new_tokens_per_s"], 2)
    write_json(args.out, {"prompts": shown_path(args.prompts), "limit": len(prompts), "max_new_tokens": args.max_new_tokens,
                          "results": rows})
    print("| what | new tokens | seconds | new tokens/s | vs in process |\n|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['name']} | {row['new_tokens']} | {row['seconds']} | {row['new_tokens_per_s']} | {row['speedup_vs_in_process']}x |")


if __name__ == "__main__":
    run_main(main)
