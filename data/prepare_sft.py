"""
SFT data: conversations → rows of block_size token ids (sft_{train,val}.bin, uint16) with a
0/1 loss mask per token (sft_{train,val}_mask.bin, uint8; 1 = answer token or end token)
and meta.json. The chat templates live in miniglm/chat_template.py: 问:{q}\\n答:{a}<|endoftext|> (default)
or ChatML (--template chatml); the one used is recorded in meta.json. A sample longer than
block_size keeps its answer: the oldest turns go first, then the question from the left,
then the answer from the right (each kind of cut counted).

  python data/prepare_sft.py                       # the default set, built from real data (see README)
  python data/prepare_sft.py --input qa.jsonl chats.json notes.txt --out_dir data/my-sft
  python data/prepare_sft.py --pack --show 2       # packed rows; print the mask of 2 samples
  python data/prepare_sft.py --vocab out/tiny-pretrain  # ids in that model's (trimmed) vocabulary

The ids are in the vocabulary of the model to be fine-tuned (--vocab: a checkpoint, an
out_dir, a data folder with vocab.json (trimmed) or a trained BPE's bpe-N.json; default
full GPT-2), recorded in meta.json; train.py refuses SFT data tokenized for another vocabulary.

Input formats (data/sft_formats.py): 问/答 text blocks, qa, alpaca, ChatGLM3, GLM-4 and
ShareGPT records, detected per record or forced with --format.
"""
import argparse
import bisect
import codecs
import json
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.sft_formats import FORMATS, read_records  # noqa: E402
from data_utils import UserError, atomic_write, read_jsonl, run_cli, write_json  # noqa: E402
from miniglm.chat_template import TEMPLATES, join_segments, message_segments  # noqa: E402
from miniglm.choices import TYPES, build_items, choice_file, half_lines, held_out_poems  # noqa: E402
from miniglm.metrics import held_out_questions  # noqa: E402
from miniglm.tokenizer import GPT2, load_vocab_file, tokenizer_from_state  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent
SCORED_QUESTIONS = 100  # the held-out questions evaluations.py answers (demo.py: --questions=100)
DEV_QUESTIONS = 64  # the ones after them: GRPO's dev questions (grpo_dev_questions) and choices_dev.jsonl


# ------------------------------------------------------------------ the default data set
def poem_conversations(poem, rng, all_next_lines=True):
    """Questions about one poem, answered from its text. all_next_lines adds a 下一句 question
    for every other pair of half-lines too, marked train_only (the held-out questions stay
    the same set); they drill copying the question's line into the answer."""
    title, author, lines = poem["title"], poem["author"], poem["lines"]
    body = "\n".join(lines)
    qa = [(f"请背诵《{title}》。", body)]
    if author:
        qa += [(f"《{title}》的作者是谁?", f"《{title}》的作者是{author}。"),
               (f"请写出{author}的《{title}》。", body)]
    half = half_lines(lines)
    next_line = lambda i: (f"“{half[i]}”的下一句是什么?", f"“{half[i]}”的下一句是“{half[i + 1]}”。")  # noqa: E731
    asked = sorted(rng.sample(range(max(0, len(half) - 1)), max(0, min(3, len(half) - 1))))
    chat = lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}  # noqa: E731
    convs = [chat(q, a) for q, a in qa + [next_line(i) for i in asked]]
    if all_next_lines:
        convs += [{**chat(*next_line(i)), "train_only": True} for i in range(len(half) - 1) if i not in asked]
    if author:  # one two-turn session per poem, so the model sees follow-up questions too
        convs.append({"messages": [{"role": "user", "content": f"《{title}》是谁写的?"},
                                   {"role": "assistant", "content": f"是{author}写的。"},
                                   {"role": "user", "content": "请背诵这首诗。"},
                                   {"role": "assistant", "content": body}]})
    return convs


def chatterbot_conversations():
    """PyPI chatterbot-corpus (BSD): Chinese dialogues, alternate turns user/assistant."""
    try:
        import chatterbot_corpus
        import yaml
    except ImportError:
        return []
    convs = []
    for path in sorted((Path(chatterbot_corpus.__file__).parent / "data" / "chinese").glob("*.yml")):
        for turns in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t).strip() for t in turns if str(t).strip()]
            if len(turns) >= 2:
                roles = ["user", "assistant"] * len(turns)
                convs.append(
                    {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns[: len(turns) // 2 * 2])]}
                )
    return convs


def default_groups(poems_paths, seed, max_poems=None, all_next_lines=True):
    """Groups of conversations for the default set: one group per poem (so a held-out poem
    has none of its questions in training) and one per dialogue. max_poems caps each file."""
    rng = random.Random(seed)
    poems = read_poems(poems_paths, rng, max_poems)
    groups = [poem_conversations(p, rng, all_next_lines) for p in poems]
    dialogues = chatterbot_conversations()
    sources = [poems_paths] if isinstance(poems_paths, (str, Path)) else poems_paths
    print(f"default SFT set: {len(poems):,} poems from {', '.join(map(str, sources))}, "
          f"{len(dialogues):,} chatterbot-corpus dialogues")
    return groups + [[d] for d in dialogues]


def read_poems(poems_paths, rng, max_poems=None):
    """The poems (documents with title and lines) of one or more docs.jsonl files, each once."""
    poems, seen = [], set()
    for path in [poems_paths] if isinstance(poems_paths, (str, Path)) else poems_paths:
        if not Path(path).exists():
            raise UserError(f"{path} not found: run data/fetch_data.py fortunes-zh (or embedded) first")
        records, _ = read_jsonl(path)
        found = [r for _, r in records if r.get("lines") and r.get("title")]
        if not found:
            raise UserError(f"{path}: no poems (documents with title and lines) to build questions from")
        if max_poems and len(found) > max_poems:  # e.g. 91k chinese-poetry poems would make ~1.3M samples
            found = rng.sample(found, max_poems)
        # the same poem in two collections (唐诗三百首 is in both) must not straddle train and val
        for p in found:
            key = (p["title"], p.get("author"), tuple(p["lines"]))
            if key not in seen:
                seen.add(key)
                poems.append(p)
    return poems


def write_choice_sets(out_dir, poems_paths, seed, dev_questions=DEV_QUESTIONS):
    """The choice questions of the held-out split (miniglm/choices.py): choices_dev.jsonl from the
    dev questions (the held-out ones after the first SCORED_QUESTIONS, as GRPO's), choices_test.jsonl
    from all the others but those asked in dev too. The distractors come from every poem of poems_paths."""
    poems = read_poems(poems_paths, random.Random(seed))
    held_out = held_out_questions(out_dir, 10**9)
    dev = held_out[SCORED_QUESTIONS:SCORED_QUESTIONS + dev_questions]
    asked_in_dev = {q for q, _ in dev}  # (a question asked twice, in dev and elsewhere, is dev's)
    test = [(q, a) for q, a in held_out if q not in asked_in_dev]
    questions = {"dev": dev, "test": test}
    line_poems = held_out_poems(held_out, poems)
    records, _ = read_jsonl(Path(out_dir) / "sft_train.jsonl")
    trained = {m["content"] for _, c in records for m in c["messages"] if m["role"] == "user"}
    for split, qs in questions.items():
        items = build_items(qs, poems, seed, line_poems, trained)
        if not items:  # (a small set: no dev questions past the scored ones)
            choice_file(out_dir, split).unlink(missing_ok=True)
            print(f"no {split} choice questions: {len(qs)} held-out questions for them")
            continue
        records = [json.dumps(item, ensure_ascii=False) + "\n" for item in items]
        atomic_write(choice_file(out_dir, split), lambda f: f.writelines(records), mode="w")
        counts = ", ".join(f"{kind} {sum(it['type'] == kind for it in items)}" for kind in TYPES)
        print(f"{choice_file(out_dir, split)}: {len(items)} choice questions ({counts}) from {len(qs)} held-out ones")


# ------------------------------------------------------------------ tokens, rows, files
CUTS = (
    "truncated",
    "cut_oldest_turns",
    "dropped_turns",
    "cut_question_left",
    "cut_answer_right",
    "cut_answer_max_tokens",
    "cut_right",
    "skipped_no_trained_token",
)


def tokenize(tok, conv, block_size, stats, template="qa", max_answer_tokens=None):
    """(ids, mask, conv) of a conversation that fits block_size, or None (counted) when
    nothing is left to train on (mask[1:] all 0). A sample that is too long keeps its
    answer: cut the oldest whole turns first, then the last question from the left, then
    the answer from the right; each kind of cut is counted in stats."""
    segs = message_segments(tok, conv["messages"], conv.get("tools"), template)
    cuts = fit_segments(tok, segs, block_size, max_answer_tokens)
    ids, mask = join_segments(segs)
    if len(ids) > block_size:  # what no cut above could fit (e.g. a huge system message)
        ids, mask = ids[:block_size], mask[:block_size]
        cuts["cut_right"] = 1
    for cut, n in cuts.items():
        stats[cut] += n
    stats["truncated"] += bool(cuts)
    if not any(mask[1:]):
        stats["skipped_no_trained_token"] += 1
        return None
    return ids, mask, conv


def fit_segments(tok, segs, block_size, max_answer_tokens=None):
    """Shorten the message segments in place until they fit block_size; returns the cuts
    made (a Counter: 1 per kind, and the number of dropped turns). An answer that was cut
    no longer trains its end token: it did not end there."""
    cuts = Counter()
    size = lambda: sum(len(s["head"]) + len(s["body"]) + len(s["tail"]) for s in segs)  # noqa: E731
    is_answer = lambda s: s["role"] == "assistant" and not s["tool"]  # noqa: E731
    for a in filter(is_answer, segs):
        if max_answer_tokens and len(a["body"]) > max_answer_tokens:
            cut_answer(tok, a, max_answer_tokens)
            cuts["cut_answer_max_tokens"] = 1
    # 1. the oldest whole turns (a turn starts at a user message; the system message stays)
    while size() > block_size:
        starts = [i for i, s in enumerate(segs) if s["role"] == "user"]
        if len(starts) < 2:
            break
        del segs[starts[0] : starts[1]]
        cuts["cut_oldest_turns"] = 1
        cuts["dropped_turns"] += 1
    last_q = max((i for i, s in enumerate(segs) if s["role"] == "user"), default=None)
    last_a = max((i for i, s in enumerate(segs) if is_answer(s)), default=None)
    if size() <= block_size or last_q is None or last_a is None or last_a < last_q:
        return cuts
    q, a = segs[last_q], segs[last_a]
    # 2. the question from the left, down to what the answer leaves it: the answer may claim
    # max_answer_tokens (default half the row) before the question has to give way
    fixed = size() - len(q["body"]) - len(a["body"])
    answer_share = min(len(a["body"]), max_answer_tokens or block_size // 2)
    keep_q = max(min(len(q["body"]), block_size - fixed - answer_share), len(q["body"]) - (size() - block_size), 0)
    if keep_q < len(q["body"]):
        cut = len(q["body"]) - keep_q
        while cut < len(q["body"]) and not starts_character(tok, q["body"][cut]):
            cut += 1  # never start on the middle of a character
        q["body"] = q["body"][cut:]
        cuts["cut_question_left"] = 1
    # 3. the answer from the right
    if size() > block_size:
        keep_a = len(a["body"]) - (size() - block_size)
        if keep_a > 0:
            cut_answer(tok, a, keep_a)
            cuts["cut_answer_right"] = 1
    return cuts


def starts_character(tok, token):
    piece = tok.token_bytes[token]
    return not piece or not 0x80 <= piece[0] < 0xC0


def cut_answer(tok, seg, n):
    """Keep the first n tokens of an answer, fewer if a character would be left half-written."""
    body = seg["body"][:n]
    while body:
        try:
            tok.decode_bytes(body).decode("utf-8")
            break
        except UnicodeDecodeError:
            body = body[:-1]
    seg["body"] = body
    seg["tail_mask"] = [0] * len(seg["tail_mask"])


def to_rows(samples, block_size, pack, pad_id):
    """Arrays (ids, mask, segment ids or None), each [rows, block_size]. Padding: one
    sample per row, padded with <|endoftext|> (mask 0). Packing: best-fit decreasing, i.e.
    longest samples first, each into the fullest row it still fits; segment ids 1, 2, ...
    tell the samples of a row apart."""
    if not pack:
        rows = [(ids, mask, [1] * len(ids)) for ids, mask in samples]
    else:
        rows, free = [], []  # free: sorted (space left, row index)
        for ids, mask in sorted(samples, key=lambda s: -len(s[0])):
            i = bisect.bisect_left(free, (len(ids), -1))
            if i == len(free):
                rows.append(([], [], []))
                space, r = block_size, len(rows) - 1
            else:
                space, r = free.pop(i)
            row_ids, row_mask, seg = rows[r]
            rows[r] = (row_ids + ids, row_mask + mask, seg + [len(set(seg)) + 1] * len(ids))
            if space - len(ids) > 0:
                bisect.insort(free, (space - len(ids), r))
    n = len(rows)
    ids_arr = np.full((n, block_size), pad_id, dtype=np.uint16)
    mask_arr = np.zeros((n, block_size), dtype=np.uint8)
    seg_arr = np.zeros((n, block_size), dtype=np.uint16)
    for i, (ids, mask, seg) in enumerate(rows):
        ids_arr[i, : len(ids)], mask_arr[i, : len(mask)], seg_arr[i, : len(seg)] = ids, mask, seg
    return ids_arr, mask_arr, (seg_arr if pack else None)


def show_samples(tok, ids, mask, n):
    """Each sample as text with its trained spans in ⟦…⟧, then each token: its id, the
    text it completes (a Chinese character often takes 2-3 byte tokens: the last one shows
    the character, the others '·'), and its training target (-100 where masked)."""
    for r in range(min(n, len(ids))):
        used = int(np.nonzero(ids[r] != tok.eot)[0].max()) + 2 if (ids[r] != tok.eot).any() else 1
        used = min(used, len(ids[r]))
        print(f"--- sample {r}: {marked_text(tok, ids[r, :used], mask[r, :used])}")
        print("   pos |    id | text       | target (the next id, or -100 where masked)")
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for t in range(used - 1):
            piece = decoder.decode(tok.decode_bytes([int(ids[r, t])]))
            target = int(ids[r, t + 1]) if mask[r, t + 1] else -100
            print(f"{t:6d} | {int(ids[r, t]):5d} | {repr(piece) if piece else '·':10} | {target}")


def marked_text(tok, ids, mask):
    """The sample's text with each run of trained tokens (mask 1) in ⟦…⟧."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            text = tok.decode(ids[start:i])
            out.append(f"⟦{text}⟧" if mask[start] else text)
            start = i
    return "".join(out)


def vocabulary(source):
    """The tokenizer to write ids for: 'gpt2', a trained BPE's bpe-N.json, or a checkpoint /
    out_dir / data folder (its vocab.json: the trimmed vocabulary)."""
    if source == "gpt2":
        return GPT2
    path = Path(source)
    if path.is_dir() and (path / "vocab.json").exists():
        return load_vocab_file(path / "vocab.json")[0]
    if path.suffix == ".json" and path.is_file():
        try:
            return tokenizer_from_state(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a vocabulary written by data/prepare.py ({e})") from None
    from miniglm.checkpoint import checkpoint_tokenizer, find_checkpoint, load_checkpoint

    return checkpoint_tokenizer(load_checkpoint(find_checkpoint(path)))


def parse_args():
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", help="SFT files (.jsonl, .json, .txt); default: the built-in set")
    parser.add_argument("--format", default="auto", choices=FORMATS)
    parser.add_argument(
        "--poems",
        nargs="+",
        help="documents with poems for the default set (one or more docs.jsonl; "
        "default: data/fortunes-zh's, else data/embedded's)",
    )
    parser.add_argument(
        "--all_next_lines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="default set: a 下一句 question for every pair of half-lines of a training poem, not "
        "only 3 (it drills copying the question's line: dev char F1 +0.03 at 200 iterations)",
    )
    parser.add_argument("--max_poems", type=int, help="use a seeded random subset of this many poems of each file")
    parser.add_argument("--out_dir", default=str(DATA_DIR / "sft"))
    parser.add_argument("--block_size", type=int, default=256, help="tokens per row (the model sees block_size-1)")
    parser.add_argument("--pack", action="store_true", help="several samples per row instead of padding")
    parser.add_argument(
        "--template",
        default="qa",
        choices=TEMPLATES,
        help="chat template: qa = 问:…\\n答:…<|endoftext|> (default), chatml = <|im_start|>role\\n…<|im_end|>",
    )
    parser.add_argument(
        "--max_answer_tokens",
        type=int,
        help="cut every answer to at most this many tokens (default: whole answers, cut only to fit the row)",
    )
    parser.add_argument("--val_fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--strict", action="store_true", help="fail on the first malformed record")
    parser.add_argument("--show", type=int, default=0, metavar="N", help="print the tokens and targets of N samples")
    parser.add_argument(
        "--vocab",
        default="gpt2",
        help="the model's vocabulary: 'gpt2', a checkpoint or out_dir "
        "(the usual choice), a data folder with vocab.json (trimmed) "
        "or a bpe-N.json",
    )
    args = parser.parse_args()
    if not 2 <= args.block_size <= 65536:
        raise UserError(f"--block_size must be between 2 and 65536, got {args.block_size}")
    return args


def read_groups(args, ignored):
    """(groups of conversations that go to the same split, malformed records) from --input, or the
    default set from --poems."""
    bad = []
    if args.input:
        groups = []
        for path in args.input:
            convs, bad_here = read_records(path, args.format, args.strict, ignored)
            groups += [[c] for c in convs]
            bad += bad_here
        if bad:
            print(f"skipped {len(bad)} malformed record(s); first: {bad[0]}")
        for key, (n, first) in sorted(ignored.items()):
            print(f"ignored message key {key!r} in {n:,} message(s), first at {first}")
        return groups, bad
    if not args.poems:
        fortunes = DATA_DIR / "fortunes-zh" / "docs.jsonl"
        if fortunes.exists() or not (DATA_DIR / "embedded").exists():
            args.poems = [str(fortunes)]
        else:
            args.poems = [str(DATA_DIR / "embedded" / "docs.jsonl")]
    return default_groups(args.poems, args.seed, args.max_poems, args.all_next_lines), bad


def tokenized_groups(tok, groups, args, stats):
    """Each group's samples, tokenized; a record with nothing left to train on is dropped, and so
    is a group left empty (so that neither split gets one)."""
    kept = []
    for convs in groups:
        samples = [tokenize(tok, c, args.block_size, stats, args.template, args.max_answer_tokens) for c in convs]
        samples = [sample for sample in samples if sample]
        if samples:
            kept.append(samples)
    return kept


def split_groups(groups, args):
    """{'val': samples, 'train': samples}: whole groups, a seeded val_fraction of them held out
    (without their train-only samples: the 下一句 drill)."""
    if len(groups) < 2:
        raise UserError(f"need at least 2 usable records to split train/val, found {len(groups)}")
    order = list(range(len(groups)))
    random.Random(args.seed).shuffle(order)
    n_val = min(max(1, round(len(groups) * args.val_fraction)), len(groups) - 1)
    return {
        "val": [s for g in order[:n_val] for s in groups[g] if not s[2].get("train_only")],
        "train": [s for g in order[n_val:] for s in groups[g]],
    }


def write_split(out_dir, split, samples, tok, args, meta):
    """sft_{split}.bin, _mask.bin (and _seg.bin when packed) and .jsonl; its counts into meta."""
    ids, mask, seg = to_rows([(i, m) for i, m, _ in samples], args.block_size, args.pack, tok.eot)
    atomic_write(out_dir / f"sft_{split}.bin", lambda f: f.write(ids.tobytes()))
    atomic_write(out_dir / f"sft_{split}_mask.bin", lambda f: f.write(mask.tobytes()))
    if seg is not None:
        atomic_write(out_dir / f"sft_{split}_seg.bin", lambda f: f.write(seg.tobytes()))
    else:
        (out_dir / f"sft_{split}_seg.bin").unlink(missing_ok=True)
    records = [json.dumps(c, ensure_ascii=False) + "\n" for _, _, c in samples]
    atomic_write(out_dir / f"sft_{split}.jsonl", lambda f: f.writelines(records), mode="w")
    meta[f"{split}_samples"], meta[f"{split}_rows"] = len(samples), len(ids)
    meta[f"{split}_mask_share"] = float(mask.mean())
    meta[f"{split}_trained_tokens"] = int(mask.sum())
    print(f"{split}: {len(samples):,} samples in {len(ids):,} rows of {args.block_size} tokens, "
          f"{mask.mean() * 100:.1f}% of tokens trained")
    if split == "train" and args.show:
        show_samples(tok, ids, mask, args.show)


def main():
    args = parse_args()
    ignored = {}
    groups, bad = read_groups(args, ignored)
    # tokenize first, so that records with nothing left to train on never reach either split
    tok = vocabulary(args.vocab)
    stats = dict.fromkeys(CUTS, 0)
    groups = tokenized_groups(tok, groups, args, stats)
    splits = split_groups(groups, args)
    out_dir = Path(args.out_dir)
    text = "".join(m["content"] for g in groups for _, _, c in g for m in c["messages"])
    meta = {
        "block_size": args.block_size,
        "packed": args.pack,
        "template": args.template,
        "tokenizer": tok.kind,
        "tokenizer_sha256": tok.sha256,
        "max_answer_tokens": args.max_answer_tokens,
        "vocab": tok.name,
        "malformed_records": len(bad),
        "ignored_message_keys": {k: n for k, (n, _) in sorted(ignored.items())},
        "seed": args.seed,
        "source": args.input or args.poems,
        "chars": "".join(sorted(set(text))),
    }
    for split, samples in splits.items():
        write_split(out_dir, split, samples, tok, args, meta)
    meta.update(stats)
    write_json(out_dir / "meta.json", meta)
    if not args.input:  # the default set's facts as choice questions
        write_choice_sets(out_dir, args.poems, args.seed)
    print(
        f"truncated {stats['truncated']} (oldest turns {stats['cut_oldest_turns']}: {stats['dropped_turns']} turns; "
        f"question from the left {stats['cut_question_left']}; answer from the right {stats['cut_answer_right']}; "
        f"answer over --max_answer_tokens {stats['cut_answer_max_tokens']}; other {stats['cut_right']}), "
        f"skipped (no trained token) {stats['skipped_no_trained_token']}; wrote {out_dir}"
    )


if __name__ == "__main__":
    run_cli(main)
