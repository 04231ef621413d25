"""Does the tuned model itself know what is out of scope? Its own signals against the run's scope guard.

    python benchmarks/scope_probe.py --run runs/smollm2 --out /tmp/scope_probe.json

On the scope guard's own messages (data.guard_messages: the run's in-scope instructions and written in-scope pool
against the out-of-scope pool, per split), four ways to call a message out of scope:
- the run's guard (RUN/guard.json: MiniLM embeddings and its classifier, as shipped);
- the tuned model's likelihood of the guard's fixed reply after the message (the geometric mean of its tokens'
  probabilities);
- a probe: a logistic regression on the tuned model's own last hidden state, averaged over the prompt's tokens,
  fitted on the train messages;
- the average of the guard's and the probe's probabilities.
Each threshold but the guard's (which the run chose) is chosen on val by the guard's rule (scope.choose_threshold: the
most out-of-scope messages declined with at most 3% of in-scope ones), with the injection pattern in front as in the
guard; test is never used to choose. (Guards built since 28 Nov choose theirs by cross-validation over train and val,
so their val row is no longer unseen: compare on test.) Prints a Markdown table and writes the figures as JSON.
"""
import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
import scope  # noqa: E402
from common import read_jsonl, read_system_prompt, run_main, write_json  # noqa: E402

PROBE_C = 0.01  # of C 0.01, 0.1 and 1 the best on the README run's val set (0.892 of out-of-scope caught; 0.877, 0.877)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a finished finetune.py run with its guard.json")
    p.add_argument("--out", type=Path, required=True, help="the figures as JSON")
    args = p.parse_args(argv)
    if not args.out.parent.is_dir():
        p.exit(2, f"error: {args.out.parent} is not a folder: pass --out a file in an existing folder\n")
    return args


def messages_of(run, config):
    """The guard's messages of each split, as finetune.py built them for this run: {split: (in scope, out of scope)}."""
    splits = {name: pd.DataFrame(read_jsonl(run / f"{name}.jsonl")) for name in ("train", "val", "test")}
    fallback = data.load_fallback(config["fallback_file"])
    in_scope = data.load_in_scope(config["in_scope_file"]) if config.get("in_scope_examples") else None
    inside, outside = data.guard_messages(splits, fallback, in_scope, config["seed"], data.guard_sets_for(in_scope))
    return {name: (inside[name], outside[name]) for name in splits}


def model_signals(model, tokenizer, messages, reply):
    """Per message: the mean last hidden state over the prompt, and the geometric mean probability of `reply`'s tokens
    after it."""
    import torch

    system = read_system_prompt()
    states, likelihoods = [], []
    with torch.no_grad():
        for message in messages:
            prompt = models.render_chat(tokenizer, models.chat_messages(system, message), add_generation_prompt=True)
            prompt_length = len(tokenizer(prompt, add_special_tokens=False).input_ids)
            ids = tokenizer(prompt + reply, add_special_tokens=False, return_tensors="pt").input_ids
            output = model(input_ids=ids, output_hidden_states=True)
            states.append(output.hidden_states[-1][0, :prompt_length].float().mean(0).numpy())
            # the logits at prompt_length - 1 onwards predict the reply's tokens
            log_probs = torch.log_softmax(output.logits[0, prompt_length - 1:-1].float(), -1)
            targets = ids[0, prompt_length:]
            likelihoods.append(log_probs[torch.arange(len(targets)), targets].mean().exp().item())
    return np.array(states), np.array(likelihoods)


def rates(scores, threshold, flags, n_inside):
    """Shares declined (score at or over threshold, or an injection) among the in-scope and out-of-scope messages, and
    the score's AUC (the chance that an out-of-scope message scores above an in-scope one)."""
    from sklearn.metrics import roc_auc_score

    declined = (scores >= threshold) | flags
    return {"in_scope_declined": scope.share(declined[:n_inside]), "in_scope_n": n_inside,
            "out_of_scope_declined": scope.share(declined[n_inside:]), "out_of_scope_n": len(scores) - n_inside,
            "auc": round(float(roc_auc_score(np.arange(len(scores)) >= n_inside, scores)), 4)}


def main():
    args = parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    config = models.run_config(args.run)
    guard = scope.load_guard(args.run, True)
    sets = messages_of(args.run, config)
    model, tokenizer, _ = models.load_for_inference(run=args.run)
    started = time.perf_counter()
    signals = {}
    for name, (inside, outside) in sets.items():
        texts = inside + outside
        states, likelihoods = model_signals(model, tokenizer, texts, guard.reply)
        signals[name] = {"states": states, "likelihood": likelihoods, "guard": np.asarray(guard.probabilities(texts)),
                         "flags": np.asarray(guard.rule_matches(texts), dtype=bool), "n_inside": len(inside)}
    train = signals["train"]
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=5000, class_weight="balanced"))
    probe.fit(train["states"], [0] * train["n_inside"] + [1] * (len(train["flags"]) - train["n_inside"]))
    for s in signals.values():
        s["probe"] = probe.predict_proba(s["states"])[:, 1]
        s["average"] = (s["guard"] + s["probe"]) / 2
    names = {"guard": "the run's guard (MiniLM)", "likelihood": "tuned model: likelihood of the fixed reply",
             "probe": "tuned model: probe on its hidden state", "average": "guard and probe, averaged"}
    results = []
    for key, label in names.items():
        val = signals["val"]
        n = val["n_inside"]
        threshold = guard.threshold if key == "guard" else scope.choose_threshold(
            val[key][:n], val[key][n:], in_scope_matched=val["flags"][:n], out_of_scope_matched=val["flags"][n:])[0]
        results.append({"signal": key, "label": label, "threshold": float(f"{threshold:.4g}"),
                        **{name: rates(s[key], threshold, s["flags"], s["n_inside"]) for name, s in signals.items() if name != "train"}})
    report = {"run": str(args.run), "messages": {name: [len(i), len(o)] for name, (i, o) in sets.items()},
              "seconds": round(time.perf_counter() - started, 1), "probe_c": PROBE_C, "results": results}
    write_json(args.out, report)
    print("| signal | val: in scope declined | val: out of scope declined | test: in scope declined | test: out of scope declined | test AUC |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['label']} | {r['val']['in_scope_declined']:.3f} | {r['val']['out_of_scope_declined']:.3f} | "
              f"{r['test']['in_scope_declined']:.3f} | {r['test']['out_of_scope_declined']:.3f} | {r['test']['auc']:.3f} |")


if __name__ == "__main__":
    run_main(main)
