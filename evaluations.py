"""
Evaluate a checkpoint: pretraining val loss, perplexity and bits per character, SFT
answer-token loss, and on the held-out SFT questions, generated answers scored against
the references: character-level exact match, F1 and ROUGE-L (per question type too),
BLEU and chrF by sacrebleu (tokenize='zh', 0-100, comparable with published figures),
plus distinct-1/2 and the number of answers holding U+FFFD; and what the model knows: the
choice questions of choices_test.jsonl scored by log-likelihood (miniglm/choices.py: acc and
acc_norm with 95% intervals, per type). The answers are decoded twice:
with the default decoding (what sample.py and the Gradio page give a user; the top-level
figures) and greedy (under "greedy"). Prints a table, writes JSON and a run report
(report.md with the loss plots) for coursework.

  python evaluations.py --out_dir=out/tiny-sft
  python evaluations.py --out_dir=out/tiny-sft --compare=out/tiny-pretrain   # side by side
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import visualize
from data_utils import PretrainData, SFTData, UserError, pick_device, run_cli, write_json
from miniglm import choices
from miniglm.checkpoint import find_checkpoint, load_model
from miniglm.constraint import CONSTRAINTS
from miniglm.generation import (
    GREEDY,
    add_decoding_flags,
    answer_batch,
    decoding_from_flags,
    model_constraint,
    model_template,
)
from miniglm.metrics import KEY_FACTS, answer_metrics, held_out_questions, question_type
from miniglm.report import GREEDY_METRICS, METRICS, decoding_label, fmt, run_dir, write_report
from model import DECODE_MODES


@torch.no_grad()
def pretrain_loss(model, tok, data_dir, batch_size, max_batches, device):
    """(mean nats per token, bits per character) over consecutive non-overlapping windows of
    the val split (all of it, up to max_batches), in the model's own vocabulary and token
    files. Bits per character = mean nats per token × the val text's tokens / its characters
    / ln 2: the total information over the text per character, which compares across
    vocabularies. (None, None) with a note when data_dir holds no val text for this model."""
    T = model.context_size
    try:
        val = PretrainData(data_dir, T, tok)
    except UserError as e:
        print(f"note: pretraining loss skipped: {e}")
        return None, None
    data = val.tokens("val")
    starts = list(range(0, len(data) - T - 1, T))[:batch_size * max_batches]
    total, count = 0.0, 0
    for i in tqdm(range(0, len(starts), batch_size), desc="pretrain val loss", leave=False):
        w = torch.from_numpy(np.stack([data[s:s + T + 1] for s in starts[i:i + batch_size]])).to(device)
        _, loss = model(w[:, :-1], w[:, 1:])
        total, count = total + loss.item() * len(w), count + len(w)
    if not count:
        return None, None
    nats = total / count
    chars = val.meta.get("val_chars") or len(tok.decode(data[data != tok.eot]))
    return nats, nats * len(data) / chars / math.log(2)


@torch.no_grad()
def sft_loss(model, tok, data_dir, batch_size, max_batches, device):
    """Answer-token loss over the SFT val rows: the mean over every trained token."""
    if not (Path(data_dir) / "sft_val.bin").exists():
        return None
    data = SFTData(data_dir, model.context_size, tok)
    total, count = 0.0, 0
    rows = torch.arange(data.num_rows("val"))[:batch_size * max_batches]
    for chunk in tqdm(rows.split(batch_size), desc="SFT answer loss", leave=False):
        b = data.load("val", chunk, device)
        _, loss = model(b["x"], b["y"], b["loss_mask"], b.get("segment_ids"))
        n = int(b["loss_mask"].sum())
        total, count = total + loss.item() * n, count + n
    return total / count if count else None


def data_dirs(path, depth=4):
    """(pretraining data, SFT data) folders a checkpoint was trained on, read from its own config
    and, up the chain of checkpoints it started from (init_from, an adapter's base), theirs."""
    found = {}
    try:
        where = find_checkpoint(path)
    except UserError:
        return None, None
    for _ in range(depth):
        ckpt = torch.load(where, map_location="cpu", weights_only=True)  # (read only for its config)
        config = ckpt.get("config") or {}
        kind = "sft" if ckpt.get("kind") == "sft" else "pretrain" if ckpt.get("kind") == "pretrain" else None
        if kind and config.get("data_dir"):
            found.setdefault(kind, config["data_dir"])
        parent = (ckpt.get("base") or {}).get("path") or config.get("init_from")
        if not parent or parent in ("scratch", "resume") or not Path(parent).is_file() or len(found) == 2:
            break
        where = Path(parent)
    return found.get("pretrain"), found.get("sft")


def evaluate(path, args, device, questions, decoding):
    """(metrics, default-decoding answers, greedy answers) of one checkpoint."""
    model, tok, ckpt = load_model(path, device, args.decode, args.base)
    adapter = ckpt.get("adapter") or {}
    print(f"weights: {ckpt['weights']}", flush=True)
    result = {
        "checkpoint": str(find_checkpoint(path)),
        "weights": ckpt["weights"],
        "kind": ckpt.get("kind"),
        "iter": ckpt["iter_num"],
        "finetune": adapter.get("method", "full" if ckpt.get("kind") == "sft" else None),
        "adapter": adapter or None,
        "params_M": round(model.num_params() / 1e6, 2),
        "vocab": tok.name,
        "vocab_size": tok.vocab_size,
        "template": model_template(ckpt),
        "decoding": decoding,
        "model_args": ckpt["model_args"],
        "config": ckpt.get("config") or {},
    }
    loss, bpc = pretrain_loss(model, tok, args.pretrain_data, args.batch_size, args.max_batches, device)
    result["pretrain_val_loss"] = loss
    result["pretrain_val_ppl"] = math.exp(loss) if loss is not None else None
    result["pretrain_val_bpc"] = bpc
    result["sft_answer_loss"] = sft_loss(model, tok, args.sft_data, args.batch_size, args.max_batches, device)
    if args.choice_items:  # a pretrained model (no template) is asked in the corpus's plain text
        scored = choices.score(model, tok, args.choice_items, ckpt.get("template"))
        result["choices"] = dict(scored, file=str(args.choice_set))
        print(f"choice questions: {choices.score_line(scored)}", flush=True)
    constraint = model_constraint(tok, ckpt, args.constrain)
    # gen_batch rows at a time, finished rows refilled: the same answers as one by one, faster
    print(f"answering {len(questions)} questions with {Path(path).name} ...", flush=True)

    def ask(decoding):
        return answer_batch(model, tok, [q for q, _ in questions], constraint=constraint,
                            max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch,
                            template=result["template"], seed=args.seed, **decoding)

    preds = ask(decoding)
    greedy = preds if decoding == GREEDY else ask(GREEDY)
    if questions:
        result.update(answer_metrics(preds, questions))
        result["greedy"] = answer_metrics(greedy, questions)
    return result, preds, greedy


def inside_figures(names, runs, questions, args, device, dest):
    """For the first held-out question with a fact (an author, a next line; else the first) and each
    run's own answer to it: the three views inside the model (token probabilities, attention, logit
    lens; miniglm/inside.py) as PNGs in dest, {run: [paths]}, and the question; none without questions."""
    if not questions:
        return {}, None
    asked = next((i for i, (q, _) in enumerate(questions) if question_type(q) in KEY_FACTS), 0)
    figures = {}
    for i, name in enumerate(names):
        model, tok, ckpt = load_model(name, device, base=args.base)
        figures[name] = visualize.inside_figures(model, tok, questions[asked][0], runs[name][1][asked],
                                                 ckpt.get("template"), dest, name=f"inside-{i + 1}")
    return figures, questions[asked][0]


def print_choices(scores, width):
    """The choice questions' table: acc and acc_norm [95% interval], overall and per type."""
    names = list(scores)
    first = scores[names[0]]
    print(f"\nchoice questions ({first['items']} of {first['file']}; chance 0.25): acc [95% interval]")
    print(f"{'':<18}" + "".join(f"{n:>{width}}" for n in names))
    interval = lambda s, key: f"{s[key]:.3f} [{s[key + '_ci'][0]:.2f}, {s[key + '_ci'][1]:.2f}]"  # noqa: E731
    rows = [(key, [interval(scores[n], key) for n in names]) for key in ("acc", "acc_norm")]
    for kind, by_type in first["by_type"].items():
        rows.append((f"{kind} ({by_type['items']})", [interval(scores[n]["by_type"][kind], "acc") for n in names]))
    for label, cells in rows:
        print(f"{label:<18}" + "".join(f"{c:>{width}}" for c in cells))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out/tiny-sft", help="checkpoint (out_dir or .pt) to evaluate")
    p.add_argument("--compare", help="a second checkpoint (e.g. the pretrained one) to put beside it")
    p.add_argument("--base", help="for an adapter (LoRA, P-Tuning): its base checkpoint, if not where it was trained")
    p.add_argument(
        "--pretrain_data",
        help="folder with the val split's tokens (default: the one the checkpoint, or "
        "the one it started from, was trained on)",
    )
    p.add_argument("--sft_data", help="folder with sft_val.bin and sft_val.jsonl (default: the checkpoint's own)")
    p.add_argument("--questions", type=int, default=50, help="held-out questions to answer")
    p.add_argument("--choice_set", default="auto",
                   help="choice questions scored by log-likelihood (miniglm/choices.py): a choices JSONL, "
                        "'auto' = the SFT data's choices_test.jsonl where there is one, or 'none'")
    p.add_argument("--max_new_tokens", type=int, default=96)
    p.add_argument("--batch_size", type=int, default=8, help="rows per batch for the losses")
    p.add_argument("--gen_batch", type=int, default=32, help="questions answered at once (batched generation)")
    p.add_argument("--max_batches", type=int, default=50)
    p.add_argument("--show", type=int, default=3, help="print this many questions with the answers")
    p.add_argument("--json", help="where to write the results (default <out_dir>/eval.json)")
    p.add_argument(
        "--report",
        default="auto",
        help="report.md path (default <out_dir>/report.md, with the loss plots beside it); 'none' to skip",
    )
    p.add_argument("--report_answers", type=int, default=12, help="sampled answers in the report")
    p.add_argument("--constrain", default="chars", choices=CONSTRAINTS, help="decoding constraint (see sample.py)")
    add_decoding_flags(p)
    p.add_argument("--seed", type=int, default=1337, help="for a sampled decoding (temperature > 0)")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--decode",
        default="eager",
        choices=DECODE_MODES,
        help="generation's decode steps (sample.py --help); compiled = CUDA graphs on a GPU",
    )
    args = p.parse_args()
    device = pick_device(args.device)
    decoding = decoding_from_flags(args)
    t0 = time.time()
    pretrain_data, sft_data = data_dirs(args.out_dir)
    args.pretrain_data = args.pretrain_data or pretrain_data or "data/fortunes-zh"
    args.sft_data = args.sft_data or sft_data or "data/sft"
    print(f"data: pretraining {args.pretrain_data}, SFT {args.sft_data}")
    questions = held_out_questions(args.sft_data, args.questions)
    args.choice_items = None
    if args.choice_set == "auto":
        args.choice_set = choices.choice_file(args.sft_data, "test")
        if not args.choice_set.is_file():
            print(f"note: no {args.choice_set} (data/prepare_sft.py writes it for the default set); choice questions "
                  "skipped")
            args.choice_set = "none"
    if args.choice_set != "none":
        args.choice_items = choices.read_choices(args.choice_set)
    if not questions:
        print(f"note: no held-out questions in {args.sft_data}/sft_val.jsonl; generation metrics skipped")
    runs = {args.out_dir: evaluate(args.out_dir, args, device, questions, decoding)}
    if args.compare:
        runs[args.compare] = evaluate(args.compare, args, device, questions, decoding)

    names = list(runs)
    width = max(22, *(len(n) + 2 for n in names))
    print(f"\nanswers decoded with {decoding_label(decoding)} (the default); greedy below")
    print(f"{'metric':<18}" + "".join(f"{n:>{width}}" for n in names))
    rows = [(m, [runs[n][0].get(m) for n in names]) for m in METRICS]
    rows += [(f"greedy {m}", [runs[n][0].get("greedy", {}).get(m) for n in names]) for m in GREEDY_METRICS]
    for m, cells in rows:
        if any(c is not None for c in cells):
            print(f"{m:<18}" + "".join(f"{fmt(c):>{width}}" for c in cells))
    if args.choice_items:
        print_choices({n: runs[n][0]["choices"] for n in names}, width)
    for i, (q, ref) in enumerate(questions[: args.show]):
        short = ref if len(ref) <= 200 else ref[:200] + f"… ({len(ref):,} characters)"  # a whole 古文 is pages
        print(f"\n问: {q}\n参考: {short}")
        for n in names:
            print(f"[{Path(n).name}] 答: {runs[n][1][i]}")
    out = {
        n: dict(
            runs[n][0],
            answers=[
                {"question": q, "reference": r, "answer": a, "greedy_answer": g}
                for (q, r), a, g in zip(questions, runs[n][1], runs[n][2])
            ],
        )
        for n in names
    }
    json_path = Path(args.json or run_dir(args.out_dir) / "eval.json")
    write_json(json_path, out)
    print(f"\nwrote {json_path} ({time.time() - t0:.0f}s)")
    if args.report != "none":
        report = Path(run_dir(args.out_dir) / "report.md" if args.report == "auto" else args.report)
        logged = [run_dir(n) for n in reversed(names) if (run_dir(n) / "log.jsonl").exists()]
        plots = visualize.plot_runs([visualize.read_run(r) for r in logged], report.parent) if logged else []
        inside = inside_figures(names, runs, questions, args, device, report.parent)
        write_report(report, {n: runs[n][:2] for n in names}, questions, plots, decoding, args.constrain,
                     args.report_answers, *inside)
        print(f"wrote {report}")


if __name__ == "__main__":
    run_cli(main)
