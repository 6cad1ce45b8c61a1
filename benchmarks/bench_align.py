"""
DPO settings side by side on one SFT model and its on-policy pairs (data/prepare_pairs.py):
ms per iteration, the reference's memory, reward accuracy and margin on the held-out pairs,
and on dev questions (the held-out questions after the first --skip, which evaluations.py
scores: those never pick a setting) char F1, exact match, the key-fact rate (the right
author, the right next line: default decoding, greedy, pass@k), distinct-2 and answers with
U+FFFD; for GRPO how a step splits into sampling and learning. "sft" is the model unchanged.

  python benchmarks/bench_align.py --sft=out/tiny-sft --pairs=data/pairs
  python benchmarks/bench_align.py --runs sft beta=0.1,learning_rate=1e-4 beta=0.5,max_iters=200
  python benchmarks/bench_align.py --runs sft beta=0.1 --skip=0 --questions=100   # the scored questions (final)

Each run is "key=value,..." (train.py overrides of config/dpo_tiny_cpu.py) or "grpo:key=value,..."
(of config/grpo_tiny_cpu.py), trained in its own process, one after another. With --k, also
pass@k of the key-fact questions (k answers sampled at temperature 1 each).
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from data_utils import UserError, run_cli  # noqa: E402
from miniglm.checkpoint import load_model  # noqa: E402
from miniglm.generation import DEFAULT_DECODING, GREEDY, answer_batch, model_constraint, model_template  # noqa: E402
from miniglm.metrics import KEY_FACTS, answer_metrics, held_out_questions, key_fact, question_type  # noqa: E402


def train_run(spec, args, work):
    """(out_dir, seconds, ms/iter, last eval record, train records) of one run; the SFT model for 'sft'."""
    if spec == "sft":
        return Path(args.sft), 0.0, None, {}, []
    stage, _, overrides = spec.rpartition(":")
    stage = stage or "dpo"
    flags = [f"--{kv}" for kv in overrides.split(",") if kv]
    out = Path(work) / re.sub(r"[^\w.=-]+", "_", spec)
    cmd = [sys.executable, "train.py", f"config/{stage}_tiny_cpu.py", f"--init_from={Path(args.sft) / 'best.pt'}",
           f"--data_dir={args.pairs if stage == 'dpo' else args.sft_data}", f"--out_dir={out}", *flags]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise UserError(f"{spec}: train.py failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["dt_ms"] for r in records if r["kind"] == "train"][1:]  # the first has the warm-up in it
    print(f"  trained {spec} in {time.time() - t0:.0f}s", flush=True)
    return out, time.time() - t0, statistics.median(steps) if steps else None, \
        [r for r in records if r["kind"] == "eval"][-1], [r for r in records if r["kind"] == "train"]


def pass_at_k(model, tok, meta, questions, k):
    """Per key-fact type, the share of questions with the fact in at least one of k answers
    sampled at temperature 1."""
    facts = [(q, r) for q, r in questions if question_type(q) in KEY_FACTS]
    hit = [False] * len(facts)
    for seed in range(k):
        answers = answer_batch(model, tok, [q for q, _ in facts], constraint=model_constraint(tok, meta),
                               template=model_template(meta), max_new_tokens=96, batch_size=32, seed=seed,
                               temperature=1.0)
        hit = [h or bool(key_fact(q, r, a)) for h, (q, r), a in zip(hit, facts, answers)]
    return {t: sum(h for h, (q, _) in zip(hit, facts) if question_type(q) == t) for t in KEY_FACTS}


def measure(spec, args, work, questions):
    out, seconds, ms_iter, last_eval, steps = train_run(spec, args, work)
    model, tok, meta = load_model(out)  # the weights a user's out_dir gives: its best.pt, by the stage's own rule
    print(f"  {spec}: {meta['weights']}", flush=True)
    ask = lambda d: answer_batch(model, tok, [q for q, _ in questions], constraint=model_constraint(tok, meta),  # noqa
                                 template=model_template(meta), max_new_tokens=96, batch_size=32, **d)
    preds, greedy = ask(DEFAULT_DECODING), ask(GREEDY)
    scores = answer_metrics(preds, questions)
    sampling = [s for s in steps if "sample_tokens_per_s" in s]
    return {"run": spec, "seconds": seconds, "ms_iter": ms_iter, "reference_mib": model.num_params() * 4 / 2**20,
            "reward_acc": last_eval.get("val_rewards/accuracies"), "margin": last_eval.get("val_rewards/margins"),
            "val_loss": last_eval.get("val_loss"), **{k: scores[k] for k in ("char_f1", "exact_match", "distinct_2",
                                                                            "answers_with_fffd")},
            "by_type": scores["by_type"], "greedy_by_type": answer_metrics(greedy, questions)["by_type"],
            "pass_at_k": pass_at_k(model, tok, meta, questions, args.k) if args.k else {},
            "sample_s": statistics.mean(s["sample_s"] for s in sampling) if sampling else None,
            "learn_s": statistics.mean(s["learn_s"] for s in sampling) if sampling else None,
            "sample_tokens_per_s": statistics.mean(s["sample_tokens_per_s"] for s in sampling) if sampling else None,
            "answers": preds[:5], "questions": [q for q, _ in questions[:5]]}


def table(results, k):
    types = sorted({t for r in results for t in r["by_type"]})
    facts = [t for t in types if any("key_fact_rate" in r["by_type"].get(t, {}) for r in results)]
    head = ["run", "ms/iter", "val pairs: reward acc / margin", "char F1", "exact", *[f"{t} F1" for t in types],
            *[f"{t} key fact (default / greedy / pass@{k})" for t in facts], "distinct-2", "U+FFFD"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for r in results:
        bt = r["by_type"]
        lines.append(
            f"| {r['run']} | {f(r['ms_iter'], '.0f')} | {f(r['reward_acc'], '.2f')} / {f(r['margin'], '.3f')} | "
            f"{r['char_f1']:.3f} | {r['exact_match']:.2f} | "
            + " | ".join(f"{bt.get(t, {}).get('char_f1', 0):.3f}" for t in types)
            + " | "
            + " | ".join(
                f"{round(bt[t]['key_fact_rate'] * bt[t]['questions'])} / "
                f"{round(r['greedy_by_type'][t]['key_fact_rate'] * bt[t]['questions'])} / "
                f"{r['pass_at_k'].get(t, '-')} of {bt[t]['questions']}"
                if t in bt
                else "-"
                for t in facts
            )
            + f" | {r['distinct_2']:.3f} | {r['answers_with_fffd']} |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", default="out/tiny-sft", help="the SFT out_dir every run starts from")
    p.add_argument("--pairs", default="data/pairs", help="its preference pairs (data/prepare_pairs.py --on_policy)")
    p.add_argument("--sft_data", default="data/sft", help="the SFT folder whose held-out questions are asked")
    p.add_argument("--runs", nargs="+", default=["sft", "beta=0.1", "beta=0.5"])
    p.add_argument("--questions", type=int, default=200, help="dev questions to answer")
    p.add_argument("--skip", type=int, default=100, help="the scored questions (evaluations.py --questions) left out")
    p.add_argument("--k", type=int, default=8, help="pass@k of the key-fact questions at temperature 1 (0: skip)")
    p.add_argument("--work", help="where the runs go (default: a temporary folder)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if not (Path(args.sft) / "best.pt").is_file():
        raise UserError(f"{args.sft}: no best.pt (run the demo first: python demo.py)")
    questions = held_out_questions(args.sft_data, args.questions, skip=args.skip)
    print(f"{len(questions)} questions (held-out, after the first {args.skip})")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.runs:
            results.append(measure(spec, args, Path(args.work or tmp), questions))
            print(table(results[-1:], args.k).splitlines()[-1], flush=True)  # each row as it is measured
            if args.json:
                Path(args.json).write_text(json.dumps(results, ensure_ascii=False, indent=1))
    print(table(results, args.k))
    for r in results:
        if r["sample_s"]:
            print(
                f"{r['run']}: a step is {r['sample_s']:.2f} s sampling ({r['sample_tokens_per_s']:,.0f} tokens/s) "
                f"+ {r['learn_s']:.2f} s learning"
            )
    for r in results:
        print(f"\n{r['run']}:")
        for q, a in zip(r["questions"], r["answers"]):
            print(f"  问: {q}  答: {' / '.join(a.splitlines())}")


if __name__ == "__main__":
    run_cli(main)
