"""The scope guard alone on prompt sets, rebuilt for several seeds of a run's split: how the README's "guard alone,
5 seeds pooled" figures are made.

    python benchmarks/guard_seeds.py --run runs/smollm2 prompts/blind19.jsonl prompts/blind20.jsonl --out /tmp/guard_seeds.json
    python benchmarks/guard_seeds.py --run runs/smollm2 --seeds 42 prompts/heldout.jsonl --out /tmp/seed42.json

One guard per seed: the run's settings (RUN/config.json) with that seed, its data split made again and the guard
built as finetune.py builds it (finetune.build_guard), so the run's own seed gives back the run's own guard.json. No
model is loaded. Every message of each prompt file is judged by the guard alone: its rules (injections, other people's
orders, other businesses) and its classifier, without the language check. Requests (every type but out_of_scope and
injection) are the customers, out-of-scope messages and injections the others; "pooled" is the share over all seeds.
Prints one line per file and writes, per file, the counts, each seed's, the customers declined and the others let
through (with the number of seeds that did so) as JSON.
"""
import argparse
import dataclasses
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import data  # noqa: E402
import finetune  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402
from common import UserError, read_jsonl, run_main, write_json  # noqa: E402

SEEDS = "42,1,2,3,4"  # the README run's seed and four more: every "5 seeds pooled" figure since 28 Nov


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt_files", nargs="+", type=Path, help="JSONL prompt sets with 'prompt' and 'type' fields")
    p.add_argument("--run", type=Path, required=True, help="a finetune.py run: its config.json gives data and settings")
    p.add_argument("--seeds", default=SEEDS, help="comma-separated split seeds, one guard each")
    p.add_argument("--out", type=Path, required=True, help="the figures as JSON")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: give whole numbers separated by commas, like {SEEDS}") from None
    return args


def main():
    args = parse_args()
    models.run_config(args.run, need_adapter=False)  # a finished run, or a one-line error
    settings = dataclasses.replace(training.RunSettings(**training.read_settings_file(args.run / "config.json")), guard=True)
    fix = "pass JSONL files whose lines each have a prompt and a type"
    sets = {str(path): read_jsonl(path, needs=("prompt", "type"), what="prompt set", fix=fix) for path in args.prompt_files}
    judged = {name: ([item["prompt"] for item in items if item["type"] not in data.DECLINED_TYPES],  # the customers
                     [item for item in items if item["type"] in data.DECLINED_TYPES])  # the others
              for name, items in sets.items()}
    rows, _ = finetune.load_data(settings)
    fallback, in_scope = finetune.written_examples(settings, rows)
    tallies = {name: {"per_seed": [], "declined": Counter(), "let_through": Counter()} for name in sets}
    for seed in args.seeds:
        started = time.time()
        seeded = dataclasses.replace(settings, seed=seed)
        guard = finetune.build_guard(finetune.split_rows(seeded, rows, fallback, in_scope), fallback, in_scope, seed)
        for name, (customers, others) in judged.items():
            declined = [m for m, out in zip(customers, guard.out_of_scope(customers)) if out]
            let_through = [item for item, out in zip(others, guard.out_of_scope([item["prompt"] for item in others])) if not out]
            tally = tallies[name]
            tally["per_seed"].append({"seed": seed, "customers_declined": len(declined), "customers": len(customers),
                                      "others_declined": len(others) - len(let_through), "others": len(others),
                                      "let_through_by_type": dict(Counter(item["type"] for item in let_through))})
            tally["declined"].update(declined)
            tally["let_through"].update(item["prompt"] for item in let_through)
        print(f"seed {seed}: guard built and judged in {time.time() - started:.0f} s", flush=True)
    report = {name: summary(tally, sets[name]) for name, tally in tallies.items()}
    write_json(args.out, {"run": str(args.run), "seeds": args.seeds, "files": report})
    for name, figures in report.items():
        print(f"{name}: customers declined {figures['customers']['declined']} of {figures['customers']['n']} "
              f"({figures['customers']['rate']}), others declined {figures['others']['declined']} of "
              f"{figures['others']['n']} ({figures['others']['rate']}; {figures['others']['by_type']})")


def summary(tally, items):
    """Pooled counts over the seeds, and which messages were judged wrongly by how many seeds."""
    seeds = tally["per_seed"]
    pooled = {key: sum(s[key] for s in seeds) for key in ("customers_declined", "customers", "others_declined", "others")}
    by_type = {}
    for kind in data.DECLINED_TYPES:
        n = len(seeds) * sum(item["type"] == kind for item in items)
        missed = sum(s["let_through_by_type"].get(kind, 0) for s in seeds)
        by_type[kind] = rate(n - missed, n)
    return {"customers": {"declined": pooled["customers_declined"], "n": pooled["customers"],
                          "rate": rate(pooled["customers_declined"], pooled["customers"])},
            "others": {"declined": pooled["others_declined"], "n": pooled["others"],
                       "rate": rate(pooled["others_declined"], pooled["others"]), "by_type": by_type},
            "per_seed": seeds, "customers_declined": tally["declined"].most_common(),
            "others_let_through": tally["let_through"].most_common()}


def rate(count, n):
    return round(count / n, 3) if n else None


if __name__ == "__main__":
    run_main(main)
