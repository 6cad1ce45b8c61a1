"""
Evaluate a checkpoint: pretraining val loss and perplexity, SFT answer-token loss, and on
the held-out SFT questions, generated answers scored against the references at the
character level (exact match, F1, ROUGE-L, BLEU-4) plus distinct-1/2. Prints a table
and writes JSON.

  python evaluations.py --out_dir=out/tiny-sft
  python evaluations.py --out_dir=out/tiny-sft --compare=out/tiny-pretrain   # side by side
"""
import argparse
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import find_checkpoint, load_model
from data_utils import SFTData, pick_device, read_jsonl, run_cli, write_json
from sample import answer


# ------------------------------------------------------------------ metrics (character level)
def _chars(text):
    return [c for c in text if not c.isspace()]


def exact_match(pred, ref):
    return float(_chars(pred) == _chars(ref))


def char_f1(pred, ref):
    """SQuAD-style F1 over characters (the usual token F1, with characters as tokens)."""
    p, r = _chars(pred), _chars(ref)
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred, ref):
    """ROUGE-L F1: longest common subsequence of characters."""
    p, r = _chars(pred), _chars(ref)
    lcs = lcs_length(p, r)
    if not lcs:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def _ngrams(chars, n):
    return Counter(tuple(chars[i:i + n]) for i in range(len(chars) - n + 1))


def corpus_bleu(preds, refs, max_n=4):
    """Corpus BLEU-4 on characters (Papineni et al.): clipped n-gram precisions summed over
    the corpus, their geometric mean, times the brevity penalty. 0 if any precision is 0."""
    matched, total = [0] * max_n, [0] * max_n
    pred_len = ref_len = 0
    for pred, ref in zip(preds, refs):
        p, r = _chars(pred), _chars(ref)
        pred_len, ref_len = pred_len + len(p), ref_len + len(r)
        for n in range(1, max_n + 1):
            pn, rn = _ngrams(p, n), _ngrams(r, n)
            matched[n - 1] += sum((pn & rn).values())
            total[n - 1] += max(len(p) - n + 1, 0)
    if min(matched) == 0 or pred_len == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / max_n
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return brevity * math.exp(log_precision)


def distinct_n(texts, n):
    """Unique n-grams over all n-grams of the generated texts: low = repetitive output."""
    grams = Counter()
    for t in texts:
        grams.update(_ngrams(_chars(t), n))
    return len(grams) / max(1, sum(grams.values()))


# ------------------------------------------------------------------ losses
@torch.no_grad()
def pretrain_loss(model, data_dir, batch_size, max_batches, device):
    """Mean loss over consecutive non-overlapping windows of val.bin (all of it, up to max_batches)."""
    path = Path(data_dir) / "val.bin"
    if not path.exists():
        return None
    T = model.config.block_size
    data = np.fromfile(path, dtype=np.uint16).astype(np.int64)
    starts = list(range(0, len(data) - T - 1, T))[:batch_size * max_batches]
    total, count = 0.0, 0
    for i in tqdm(range(0, len(starts), batch_size), desc="pretrain val loss", leave=False):
        w = torch.from_numpy(np.stack([data[s:s + T + 1] for s in starts[i:i + batch_size]])).to(device)
        _, loss = model(w[:, :-1], w[:, 1:])
        total, count = total + loss.item() * len(w), count + len(w)
    return total / count if count else None


@torch.no_grad()
def sft_loss(model, data_dir, batch_size, max_batches, device):
    """Answer-token loss over the SFT val rows: the mean over every trained token."""
    if not (Path(data_dir) / "sft_val.bin").exists():
        return None
    data = SFTData(data_dir, model.config.block_size)
    total, count = 0.0, 0
    rows = torch.arange(data.num_rows("val"))[:batch_size * max_batches]
    for chunk in tqdm(rows.split(batch_size), desc="SFT answer loss", leave=False):
        b = data.load("val", chunk, device)
        _, loss = model(b["x"], b["y"], b["loss_mask"], b.get("segment_ids"))
        n = int(b["loss_mask"].sum())
        total, count = total + loss.item() * n, count + n
    return total / count if count else None


def held_out_questions(data_dir, limit):
    """Single-turn (question, answer) pairs of the SFT validation split."""
    path = Path(data_dir) / "sft_val.jsonl"
    if not path.exists():
        return []
    records, _ = read_jsonl(path)
    pairs = [(c["messages"][0]["content"], c["messages"][1]["content"]) for _, c in records
             if len(c["messages"]) == 2 and c["messages"][0]["role"] == "user"]
    return pairs[:limit]


def evaluate(path, args, device, questions):
    model, ckpt = load_model(path, device)
    result = {"checkpoint": str(find_checkpoint(path)), "kind": ckpt.get("kind"), "iter": ckpt["iter_num"],
              "params_M": round(model.num_params() / 1e6, 2)}
    loss = pretrain_loss(model, args.pretrain_data, args.batch_size, args.max_batches, device)
    result["pretrain_val_loss"] = loss
    result["pretrain_val_ppl"] = math.exp(loss) if loss is not None else None
    result["sft_answer_loss"] = sft_loss(model, args.sft_data, args.batch_size, args.max_batches, device)
    preds = []
    for q, _ in tqdm(questions, desc=f"answering ({Path(path).name})", leave=False):
        preds.append("".join(answer(model, [], q, max_new_tokens=args.max_new_tokens, temperature=0)))
    refs = [a for _, a in questions]
    if questions:
        result.update(
            exact_match=float(np.mean([exact_match(p, r) for p, r in zip(preds, refs)])),
            char_f1=float(np.mean([char_f1(p, r) for p, r in zip(preds, refs)])),
            rouge_l=float(np.mean([rouge_l(p, r) for p, r in zip(preds, refs)])),
            bleu4=corpus_bleu(preds, refs), distinct_1=distinct_n(preds, 1), distinct_2=distinct_n(preds, 2))
    return result, preds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out/tiny-sft", help="checkpoint (out_dir or .pt) to evaluate")
    p.add_argument("--compare", help="a second checkpoint (e.g. the pretrained one) to put beside it")
    p.add_argument("--pretrain_data", default="data/fortunes-zh", help="folder with val.bin")
    p.add_argument("--sft_data", default="data/sft", help="folder with sft_val.bin and sft_val.jsonl")
    p.add_argument("--questions", type=int, default=50, help="held-out questions to answer")
    p.add_argument("--max_new_tokens", type=int, default=96)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_batches", type=int, default=50)
    p.add_argument("--show", type=int, default=3, help="print this many questions with the answers")
    p.add_argument("--json", help="where to write the results (default <out_dir>/eval.json)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = pick_device(args.device)
    questions = held_out_questions(args.sft_data, args.questions)
    if not questions:
        print(f"note: no held-out questions in {args.sft_data}/sft_val.jsonl; generation metrics skipped")
    runs = {args.out_dir: evaluate(args.out_dir, args, device, questions)}
    if args.compare:
        runs[args.compare] = evaluate(args.compare, args, device, questions)

    names = list(runs)
    metrics = ["kind", "iter", "params_M", "pretrain_val_loss", "pretrain_val_ppl", "sft_answer_loss", "exact_match",
               "char_f1", "rouge_l", "bleu4", "distinct_1", "distinct_2"]
    width = max(22, *(len(n) + 2 for n in names))
    print(f"\n{'metric':<18}" + "".join(f"{n:>{width}}" for n in names))
    for m in metrics:
        cells = [runs[n][0].get(m) for n in names]
        if all(c is None for c in cells):
            continue
        fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
        print(f"{m:<18}" + "".join(f"{fmt(c):>{width}}" for c in cells))
    for i, (q, ref) in enumerate(questions[:args.show]):
        print(f"\n问: {q}\n参考: {ref}")
        for n in names:
            print(f"[{Path(n).name}] 答: {runs[n][1][i]}")
    out = {n: dict(runs[n][0], answers=[{"question": q, "reference": r, "answer": a}
                                        for (q, r), a in zip(questions, runs[n][1])]) for n in names}
    json_path = Path(args.json or (Path(args.out_dir) if Path(args.out_dir).is_dir() else Path(args.out_dir).parent) / "eval.json")
    write_json(json_path, out)
    print(f"\nwrote {json_path}")


if __name__ == "__main__":
    run_cli(main)
