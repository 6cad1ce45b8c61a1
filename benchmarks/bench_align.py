"""
DPO settings side by side on one SFT model and its on-policy pairs (data/prepare_pairs.py):
ms per iteration, the reference's memory, reward accuracy and margin on the held-out pairs,
and on dev questions (the held-out questions after the first --skip, which evaluations.py
scores: those never pick a setting) char F1, exact match, the key-fact rate (the right
author, the right next line), distinct-2 and answers with U+FFFD. "sft" is the model unchanged.

  python benchmarks/bench_align.py --sft=out/tiny-sft --pairs=data/pairs
  python benchmarks/bench_align.py --runs sft beta=0.1,learning_rate=1e-4 beta=0.5,max_iters=200
  python benchmarks/bench_align.py --runs sft beta=0.1 --skip=0 --questions=100   # the scored questions (final)

Each run is "key=value,..." (train.py overrides of config/dpo_tiny_cpu.py), trained in its own
process, one after another.
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
from checkpoint import load_model  # noqa: E402
from data_utils import UserError, run_cli  # noqa: E402
from evaluations import answer_metrics, held_out_questions  # noqa: E402
from generation import DEFAULT_DECODING, answer_batch, model_constraint, model_template  # noqa: E402


def train_run(spec, args, work):
    """(out_dir, seconds, ms/iter, last eval record) of one DPO run; the SFT model for 'sft'."""
    if spec == "sft":
        return Path(args.sft), 0.0, None, {}
    flags = [f"--{kv}" for kv in spec.split(",") if kv]
    out = Path(work) / re.sub(r"[^\w.=-]+", "_", spec)
    cmd = [sys.executable, "train.py", "config/dpo_tiny_cpu.py", f"--init_from={Path(args.sft) / 'best.pt'}",
           f"--data_dir={args.pairs}", f"--out_dir={out}", *flags]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise UserError(f"{spec}: train.py failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["dt_ms"] for r in records if r["kind"] == "train"][1:]  # the first has the warm-up in it
    print(f"  trained {spec} in {time.time() - t0:.0f}s", flush=True)
    return out, time.time() - t0, statistics.median(steps) if steps else None, \
        [r for r in records if r["kind"] == "eval"][-1]


def measure(spec, args, work, questions):
    out, seconds, ms_iter, last_eval = train_run(spec, args, work)
    model, tok, meta = load_model(out / "ckpt.pt" if spec != "sft" else out)
    preds = answer_batch(model, tok, [q for q, _ in questions], constraint=model_constraint(tok, meta),
                         template=model_template(meta), max_new_tokens=96, batch_size=32, **DEFAULT_DECODING)
    scores = answer_metrics(preds, questions)
    return {"run": spec, "seconds": seconds, "ms_iter": ms_iter, "reference_mib": model.num_params() * 4 / 2**20,
            "reward_acc": last_eval.get("val_rewards/accuracies"), "margin": last_eval.get("val_rewards/margins"),
            "val_loss": last_eval.get("val_loss"), **{k: scores[k] for k in ("char_f1", "exact_match", "distinct_2",
                                                                            "answers_with_fffd")},
            "by_type": scores["by_type"], "answers": preds[:5], "questions": [q for q, _ in questions[:5]]}


def table(results):
    types = sorted({t for r in results for t in r["by_type"]})
    facts = [t for t in types if any("key_fact_rate" in r["by_type"].get(t, {}) for r in results)]
    head = ["run", "ms/iter", "val pairs: reward acc / margin", "char F1", "exact", *[f"{t} F1" for t in types],
            *[f"{t} key fact" for t in facts], "distinct-2", "U+FFFD"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for r in results:
        bt = r["by_type"]
        lines.append(f"| {r['run']} | {f(r['ms_iter'], '.0f')} | {f(r['reward_acc'], '.2f')} / {f(r['margin'], '.3f')} | "
                     f"{r['char_f1']:.3f} | {r['exact_match']:.2f} | "
                     + " | ".join(f"{bt.get(t, {}).get('char_f1', 0):.3f}" for t in types) + " | "
                     + " | ".join(f"{bt[t]['key_fact_rate']:.2f} ({round(bt[t]['key_fact_rate'] * bt[t]['questions'])}"
                                  f"/{bt[t]['questions']})" if t in bt else "-" for t in facts)
                     + f" | {r['distinct_2']:.3f} | {r['answers_with_fffd']} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", default="out/tiny-sft", help="the SFT out_dir every run starts from")
    p.add_argument("--pairs", default="data/pairs", help="its preference pairs (data/prepare_pairs.py --on_policy)")
    p.add_argument("--sft_data", default="data/sft", help="the SFT folder whose held-out questions are asked")
    p.add_argument("--runs", nargs="+", default=["sft", "beta=0.1", "beta=0.5"])
    p.add_argument("--questions", type=int, default=200, help="dev questions to answer")
    p.add_argument("--skip", type=int, default=100, help="the scored questions (evaluations.py --questions) left out")
    p.add_argument("--work", help="where the runs go (default: a temporary folder)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if not (Path(args.sft) / "best.pt").is_file():
        raise UserError(f"{args.sft}: no best.pt (run the demo first: python demo.py)")
    questions = held_out_questions(args.sft_data, args.questions, skip=args.skip)
    print(f"{len(questions)} questions (held-out, after the first {args.skip})")
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(spec, args, Path(args.work or tmp), questions) for spec in args.runs]
    print(table(results))
    for r in results:
        print(f"\n{r['run']}:")
        for q, a in zip(r["questions"], r["answers"]):
            print(f"  问: {q}  答: {' / '.join(a.splitlines())}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    run_cli(main)
