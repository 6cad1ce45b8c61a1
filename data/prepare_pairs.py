"""
Preference pairs for DPO (train.py stage='dpo'): each pair is two rows of block_size token ids,
the chosen answer's and the rejected one's, after the same prompt, with a 0/1 loss mask on the
answer tokens and the end token (pairs_{train,val}.bin, uint16; pairs_{train,val}_mask.bin;
row 2k chosen, row 2k+1 rejected), the pairs as text (pairs_{train,val}.jsonl) and meta.json.
The chat template is the checkpoint's own.

  python data/prepare_pairs.py --vocab out/tiny-sft --input prefs.jsonl --out_dir data/pairs
  python data/prepare_pairs.py --vocab out/tiny-sft --on_policy --sft_data data/sft --out_dir data/pairs

Input (--input, JSON list or JSONL), trl's preference formats:
  standard        {"prompt": "…", "chosen": "…", "rejected": "…"}
  conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
  implicit prompt {"chosen": [messages], "rejected": [messages]} (minimind's lines): the messages
                  both share are the prompt, the last assistant message of each is its answer.
--on_policy builds pairs from the model itself: for each question of the SFT *train* split (none
whose text is also a held-out question: those stay untouched), chosen is the reference answer
and rejected is the first of the model's own sampled answers whose char F1 against it is below
--max_f1.
A record without a field, with an empty answer, or with chosen = rejected is dropped and counted
(--strict: stop at the first, naming file:line).
"""

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.prepare_sft import fit_segments, to_rows, vocabulary  # noqa: E402
from data_utils import UserError, atomic_write, parse_json, read_jsonl, run_cli, write_json  # noqa: E402
from miniglm.chat_template import join_segments, message_segments, render_prompt  # noqa: E402


def read_preferences(path, strict):
    """(where, record) of a JSONL file or a JSON list."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.suffix == ".json":
        try:
            items = parse_json(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a JSON list of preference records")
        return [(f"{path}:record {i + 1}", r) for i, r in enumerate(items)], []
    records, bad = read_jsonl(path, strict)
    return [(f"{path}:{n}", r) for n, r in records], bad


def as_pair(r):
    """(prompt messages, chosen answer, rejected answer) of one record of trl's formats."""
    if not isinstance(r, dict):
        raise ValueError("not a JSON object")
    for key in ("chosen", "rejected"):
        if key not in r:
            raise ValueError(f"missing {key!r}")
    prompt, chosen, rejected = r.get("prompt"), r["chosen"], r["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):  # standard
        if not isinstance(prompt, str):
            raise ValueError("missing 'prompt' (a string, for string answers)")
        return [{"role": "user", "content": prompt}], chosen, rejected
    if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected):
        raise ValueError("'chosen' and 'rejected' must both be strings or both message lists")
    if prompt is None:  # implicit: the shared leading messages
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("no prompt: 'prompt' missing and no messages shared by 'chosen' and 'rejected'")
    answers = []
    for side in (chosen, rejected):
        if len(side) != 1 or not isinstance(side[-1], dict) or side[-1].get("role") != "assistant":
            raise ValueError("each side must end in one assistant message after the prompt")
        answers.append(side[-1].get("content"))
    return prompt, *answers


def tokenize_pair(tok, prompt, chosen, rejected, block_size, template, stats):
    """(ids, mask) of the chosen and the rejected row. Only the final answer trains (earlier
    assistant turns are prompt); a prompt too long is cut once, for the longer answer, so both
    rows start with the same prompt tokens."""
    history = [dict(m, loss=False) for m in prompt]
    sides = [
        message_segments(tok, history + [{"role": "assistant", "content": a}], template=template)
        for a in (chosen, rejected)
    ]
    longer = max(sides, key=lambda segs: len(join_segments(segs)[0]))
    cuts = fit_segments(tok, longer, block_size)
    rows = []
    for segs in sides:
        if segs is not longer:  # the same prompt as the longer side's, then its own answer
            segs[:-1] = longer[:-1]
            fit_segments(tok, segs, block_size)
        ids, mask = join_segments(segs)
        if len(ids) > block_size or not any(mask[1:]):
            stats["dropped_too_long"] += 1
            return None
        rows.append((ids, mask))
    stats["prompt_cut"] += bool(cuts)
    return rows


def on_policy_records(args, tok):
    """Pairs from the model's own answers to the SFT train split's single-turn questions."""
    from miniglm.align.reference import train_questions
    from miniglm.checkpoint import load_model
    from miniglm.generation import answer_batch, model_constraint, model_template
    from miniglm.metrics import char_f1

    qa = [(rec["source"], q, ref) for q, ref, rec in train_questions(args.sft_data)]
    model, tok, ckpt = load_model(args.vocab)
    constraint, template = model_constraint(tok, ckpt), model_template(ckpt)
    fits = [x for x in qa if len(render_prompt(tok, [], x[1], template)) + args.max_new_tokens <= model.context_size]
    if len(fits) < len(qa):
        print(
            f"on-policy: {len(qa) - len(fits):,} questions leave no room for {args.max_new_tokens} new tokens: skipped"
        )
    random.Random(args.seed).shuffle(fits)
    qa = fits[: args.max_questions]
    out, rejected = [], {}
    for k in range(args.samples):  # sample round k for the questions that have no rejected answer yet
        todo = [x for x in qa if x[0] not in rejected]
        answers = answer_batch(
            model,
            tok,
            [q for _, q, _ in todo],
            constraint=constraint,
            template=template,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed + k,
            temperature=args.temperature,
            batch_size=32,
        )
        for (n, q, ref), a in zip(todo, answers):
            if a.strip() and char_f1(a, ref) < args.max_f1:
                rejected[n] = a
    for n, q, ref in qa:
        if n in rejected:
            out.append((n, {"prompt": q, "chosen": ref, "rejected": rejected[n]}))
    print(f"on-policy: {len(out):,} of {len(qa):,} train questions got a sampled answer under char F1 {args.max_f1}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--vocab", required=True, help="the checkpoint (out_dir or .pt) to align: its vocabulary and template"
    )
    p.add_argument("--input", nargs="+", help="preference files (.jsonl, .json)")
    p.add_argument("--on_policy", action="store_true", help="build pairs from the model's own sampled answers")
    p.add_argument("--sft_data", default="data/sft", help="--on_policy: the SFT folder (its train split only)")
    p.add_argument("--samples", type=int, default=4, help="--on_policy: sampling rounds per question")
    p.add_argument("--max_f1", type=float, default=0.5, help="--on_policy: a rejected answer scores below this")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--max_questions", type=int, default=2000)
    p.add_argument("--block_size", type=int, default=256, help="tokens per row (the model sees block_size-1)")
    p.add_argument("--out_dir", default="data/pairs")
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--strict", action="store_true", help="stop at the first bad record")
    args = p.parse_args()
    if bool(args.input) == args.on_policy:
        raise UserError("give --input FILES or --on_policy (one of the two)")
    from miniglm.checkpoint import find_checkpoint, load_checkpoint
    from miniglm.generation import model_template

    ckpt = load_checkpoint(find_checkpoint(args.vocab))
    tok, template = vocabulary(args.vocab), model_template(ckpt)
    records, bad = (on_policy_records(args, tok), []) if args.on_policy else ([], [])
    for path in args.input or []:
        got, bad_here = read_preferences(path, args.strict)
        records, bad = records + got, bad + bad_here
    stats, pairs, text = Counter(), [], set()
    for where, r in records:
        try:
            prompt, chosen, rejected = as_pair(r)
            if not all(isinstance(a, str) and a.strip() for a in (chosen, rejected)):
                raise ValueError("an empty answer")
            if chosen == rejected:
                raise ValueError("chosen is identical to rejected")
            rows = tokenize_pair(tok, prompt, chosen, rejected, args.block_size, template, stats)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if args.strict:
                raise UserError(f"{where}: {e}") from None
            bad.append(f"{where}: {e}")
            continue
        if rows:
            pairs.append((rows, {"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": where}))
            text.update("".join(m.get("content", "") for m in prompt) + chosen + rejected)
    if bad:
        print(f"dropped {len(bad)} bad record(s); first: {bad[0]}")
    if len(pairs) < 2:
        raise UserError(f"no usable preference pairs ({len(pairs)} of {len(records)} records): need at least 2")
    random.Random(args.seed).shuffle(pairs)
    n_val = min(max(1, round(len(pairs) * args.val_fraction)), len(pairs) - 1)
    out = Path(args.out_dir)
    meta = {
        "pairs": True,
        "block_size": args.block_size,
        "template": template,
        "vocab": tok.name,
        "tokenizer": tok.kind,
        "tokenizer_sha256": tok.sha256,
        "bad_records": len(bad),
        **stats,
        "source": "on-policy: " + str(find_checkpoint(args.vocab)) if args.on_policy else args.input,
        "chars": "".join(sorted(text)),
    }
    for split, chunk in (("val", pairs[:n_val]), ("train", pairs[n_val:])):
        ids, mask, _ = to_rows([row for rows, _ in chunk for row in rows], args.block_size, False, tok.eot)
        atomic_write(out / f"pairs_{split}.bin", lambda f: f.write(ids.astype(np.uint16).tobytes()))
        atomic_write(out / f"pairs_{split}_mask.bin", lambda f: f.write(mask.astype(np.uint8).tobytes()))
        atomic_write(
            out / f"pairs_{split}.jsonl",
            lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for _, r in chunk),
            mode="w",
        )
        meta[f"{split}_pairs"] = len(chunk)
        print(f"{split}: {len(chunk):,} pairs")
    write_json(out / "meta.json", meta)
    print(f"wrote {out} (prompts cut to fit: {stats['prompt_cut']}, too long: {stats['dropped_too_long']})")


if __name__ == "__main__":
    run_cli(main)
