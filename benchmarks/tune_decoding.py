"""
Choose the default decoding (generation.DEFAULT_DECODING) on dev questions: the held-out
SFT questions after the first --skip, which evaluations.py scores, so the scored ones
never pick the settings. Each setting answers the same dev questions (batched, with the
decoding constraint); char F1 (per question type too) and distinct-2 are printed.

  python benchmarks/tune_decoding.py --out_dir=out/tiny-sft --sft_data=data/sft
  python benchmarks/tune_decoding.py --penalties 1.0,1.2,1.5 --ngrams 0,4 --temperatures 0,0.7
"""
import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_utils import UserError, pick_device, run_cli  # noqa: E402
from miniglm.checkpoint import load_model  # noqa: E402
from miniglm.generation import answer_batch, model_constraint, model_template  # noqa: E402
from miniglm.metrics import answer_metrics, held_out_questions  # noqa: E402
from miniglm.report import decoding_label  # noqa: E402


def floats(text):
    return [float(x) for x in text.split(",")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out/tiny-sft")
    p.add_argument("--sft_data", default="data/sft")
    p.add_argument(
        "--skip", type=int, default=100, help="the scored questions (evaluations.py --questions) to leave out"
    )
    p.add_argument("--questions", type=int, default=200, help="dev questions to answer")
    p.add_argument("--penalties", default="1.0,1.1,1.2,1.3,1.5")
    p.add_argument("--ngrams", default="0,3,4")
    p.add_argument("--temperatures", default="0")
    p.add_argument("--max_new_tokens", type=int, default=96)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    questions = held_out_questions(args.sft_data, args.questions, skip=args.skip)
    if not questions:
        raise UserError(f"no dev questions: {args.sft_data}/sft_val.jsonl has none past the first {args.skip}")
    model, tok, ckpt = load_model(args.out_dir, pick_device(args.device))
    constraint, template = model_constraint(tok, ckpt), model_template(ckpt)
    print(
        f"{len(questions)} dev questions (val questions {args.skip + 1}-{args.skip + len(questions)}), {args.out_dir}"
    )
    rows = []
    for temperature, penalty, ngram in itertools.product(
        floats(args.temperatures), floats(args.penalties), [int(n) for n in args.ngrams.split(",")]
    ):
        d = dict(
            temperature=temperature,
            top_k=50 if temperature else None,
            top_p=0.95 if temperature else None,
            repetition_penalty=penalty,
            no_repeat_ngram=ngram,
        )
        t0 = time.time()
        preds = answer_batch(
            model,
            tok,
            [q for q, _ in questions],
            constraint=constraint,
            template=template,
            max_new_tokens=args.max_new_tokens,
            batch_size=32,
            seed=args.seed,
            **d,
        )
        m = answer_metrics(preds, questions)
        types = " ".join(f"{k} {v['char_f1']:.3f}" for k, v in m["by_type"].items())
        rows.append((m["char_f1"], m["distinct_2"], decoding_label(d)))
        print(
            f"{decoding_label(d):<55} char F1 {m['char_f1']:.3f}  distinct-2 {m['distinct_2']:.3f}  "
            f"({types}; {time.time() - t0:.0f}s)",
            flush=True,
        )
    best = max(rows)
    print(f"highest char F1: {best[2]} ({best[0]:.3f}, distinct-2 {best[1]:.3f})")


if __name__ == "__main__":
    run_cli(main)
