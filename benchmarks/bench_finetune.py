"""
Full SFT, LoRA and P-Tuning v2 side by side on one pretrained model, the same SFT set and
the same dev questions: trained parameters, checkpoint size, peak memory, ms per iteration,
the answer-token val loss and char F1 (per question type) on dev questions (the held-out
questions after the first --skip, which evaluations.py scores: those never pick a setting).

  python benchmarks/bench_finetune.py --pretrained=out/tiny-pretrain
  python benchmarks/bench_finetune.py --runs lora lora:learning_rate=1e-2 lora:lora_r=16 ptuning:num_virtual_tokens=32

Each run is "method" (its config/sft_<method>_tiny_cpu.py) or "method:key=value,..."
(train.py overrides); every run trains in its own process, one after another.
"""
import argparse
import json
import os
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
from demo import SFT_CONFIGS, sft_rows  # noqa: E402
from miniglm.checkpoint import load_model  # noqa: E402
from miniglm.generation import DEFAULT_DECODING, answer_batch, model_constraint, model_template  # noqa: E402
from miniglm.metrics import answer_metrics, held_out_questions  # noqa: E402


def sft_data(pretrained, poems, rows, cache):
    """The default SFT set in the pretrained model's vocabulary, in rows of `rows` tokens."""
    out = Path(cache) / f"sft-{rows}"
    if not (out / "sft_train.bin").exists():
        subprocess.run([sys.executable, "data/prepare_sft.py", f"--vocab={pretrained}", "--pack", f"--poems={poems}",
                        f"--block_size={rows}", f"--out_dir={out}"], cwd=ROOT, check=True, capture_output=True)
    return out


def train_run(spec, args, work):
    """Train one run; (name, method, data folder, out_dir, what its output said)."""
    method, _, overrides = spec.partition(":")
    if method not in SFT_CONFIGS:
        raise UserError(f"{spec}: the method must be one of {', '.join(SFT_CONFIGS)}")
    flags = [f"--{kv}" for kv in overrides.split(",") if kv]
    data = sft_data(args.pretrained, args.poems, sft_rows(method, flags), work)
    out = Path(work) / re.sub(r"[^\w.=-]+", "_", spec)
    cmd = [sys.executable, "train.py", SFT_CONFIGS[method], f"--init_from={Path(args.pretrained) / 'best.pt'}",
           f"--data_dir={data}", f"--out_dir={out}", f"--log_interval={args.log_interval}", *flags]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise UserError(f"{spec}: train.py failed: {proc.stderr.strip().splitlines()[-1]}")
    print(f"  trained {spec} in {time.time() - t0:.0f}s", flush=True)
    return spec, method, data, out, proc.stdout


def measure(spec, method, data, out, stdout, args):
    trained = re.search(r"finetune \w+: ([\d,]+) of ([\d,]+) parameters", stdout)
    params = re.search(r"\| ([\d.]+)M parameters", stdout)
    n_trained = int(trained.group(1).replace(",", "")) if trained else round(float(params.group(1)) * 1e6)
    total = int(trained.group(2).replace(",", "")) if trained else n_trained
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["dt_ms"] for r in records if r["kind"] == "train"][1:]  # the first log line has the warm-up in it
    model, tok, meta = load_model(out)
    questions = held_out_questions(data, args.questions, skip=args.skip)
    preds = answer_batch(model, tok, [q for q, _ in questions], constraint=model_constraint(tok, meta),
                         template=model_template(meta), max_new_tokens=96, batch_size=32, **DEFAULT_DECODING)
    scores = answer_metrics(preds, questions)
    return {
        "run": spec,
        "method": method,
        "trained": n_trained,
        "share": n_trained / total,
        "best_kib": os.path.getsize(out / "best.pt") / 1024,
        "ckpt_kib": os.path.getsize(out / "ckpt.pt") / 1024,
        "peak_mib": float(re.search(r"peak memory ([\d,]+) MiB", stdout).group(1).replace(",", "")),
        "ms_iter": statistics.median(steps),
        "val_loss": [r for r in records if r["kind"] == "eval"][-1]["val_loss"],
        "char_f1": scores["char_f1"],
        "by_type": {t: v["char_f1"] for t, v in scores["by_type"].items()},
        "answers": preds[:5],
        "questions": [q for q, _ in questions[:5]],
    }


def table(results):
    types = sorted({t for r in results for t in r["by_type"]})
    head = [
        "run",
        "trained parameters",
        "best.pt / ckpt.pt",
        "peak RSS",
        "ms/iter",
        "answer val loss",
        "dev char F1",
        *types,
    ]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in results:
        lines.append(
            f"| {r['run']} | {r['trained']:,} ({r['share']:.2%}) | {r['best_kib']:,.0f} / {r['ckpt_kib']:,.0f} KiB"
            f" | {r['peak_mib']:,.0f} MiB | {r['ms_iter']:.0f} | {r['val_loss']:.3f} | {r['char_f1']:.3f} | "
            + " | ".join(f"{r['by_type'].get(t, 0):.3f}" for t in types)
            + " |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", default="out/tiny-pretrain", help="the pretrained out_dir every method starts from")
    p.add_argument("--poems", default="data/fortunes-zh/docs.jsonl", help="the documents of the default SFT set")
    p.add_argument("--runs", nargs="+", default=["full", "lora", "ptuning"])
    p.add_argument("--questions", type=int, default=200, help="dev questions to answer")
    p.add_argument("--skip", type=int, default=100, help="the scored questions (evaluations.py --questions) left out")
    p.add_argument("--log_interval", type=int, default=20)
    p.add_argument("--work", help="where the runs go (default: a temporary folder)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if not (Path(args.pretrained) / "best.pt").is_file():
        raise UserError(f"{args.pretrained}: no best.pt (run the demo's pretraining first: python demo.py)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        results = [measure(*train_run(spec, args, work), args) for spec in args.runs]
    print(table(results))
    for r in results:
        print(f"\n{r['run']}:")
        for q, a in zip(r["questions"], r["answers"]):
            print(f"  问: {q}  答: {' / '.join(a.splitlines())}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")


if __name__ == "__main__":
    run_cli(main)
