"""
Tokenize data/<dataset>/docs.jsonl for pretraining, every document followed by
<|endoftext|>, split train/val by document (seeded: no document is half in each):

  train.bin, val.bin          GPT-2 ids (uint16): vocab='gpt2' and vocab='trimmed' read these
  vocab.json                  the vocabulary trimmed to the GPT-2 ids this corpus uses (plus the
                              byte tokens, <|endoftext|> and the chat template's tokens), and the
                              characters of the corpus (the decoding constraint's)
  bpe-8192.json               a byte-level BPE of 8,192 tokens trained on the train documents only
  train.bpe-8192.bin, val…    the same text in that BPE's ids: vocab='bpe' reads these
  meta.json                   token, document and character counts per split and vocabulary

  python data/prepare.py fortunes-zh
  python data/prepare.py fortunes-zh --bpe_vocab_size 4096 8192 16384   # several BPEs side by side
  python data/prepare.py --docs path/to/docs.jsonl --out_dir path/to/folder
"""
import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tqdm import tqdm  # noqa: E402

from data_utils import UserError, atomic_write, read_jsonl, run_cli, write_json  # noqa: E402
from miniglm.tokenizer import GPT2, VOCAB_SHA256, bpe_file, train_bpe, trimmed_vocabulary  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent


def load_texts(docs_path, strict=False):
    if not Path(docs_path).exists():
        raise UserError(f"{docs_path} not found: run data/fetch_data.py first")
    records, bad = read_jsonl(docs_path, strict=strict)
    texts = []
    for lineno, r in records:
        if isinstance(r, dict) and isinstance(r.get("text"), str) and r["text"].strip():
            texts.append(r["text"])
        elif strict:
            raise UserError(f"{docs_path}:{lineno}: expected an object with a non-empty \"text\" string")
        else:
            bad.append(f"{docs_path}:{lineno}")
    if bad:
        print(f"skipped {len(bad)} malformed document(s), first: {bad[0]}")
    return texts


def tokenize(texts, tok, num_threads, chunk=2048):
    """tok's token ids of every document (as its token files store them), <|endoftext|>
    appended; tiktoken batches run in parallel threads (its Rust core releases the GIL)."""
    out = []
    with tqdm(total=len(texts), desc=f"tokenizing ({tok.tag or 'gpt2'})", unit="doc") as bar:
        for i in range(0, len(texts), chunk):
            for ids in tok.enc.encode_ordinary_batch(texts[i:i + chunk], num_threads=num_threads):
                out.append(ids + [tok.eot])
            bar.update(len(texts[i:i + chunk]))
    return out


def split_by_document(n_docs, val_fraction, seed):
    """Indices of train and val documents: a seeded shuffle, at least one val document."""
    order = np.random.default_rng(seed).permutation(n_docs)
    n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def write_tokens(path, docs):
    arr = np.fromiter((t for d in docs for t in d), dtype=np.uint16, count=sum(map(len, docs)))
    atomic_write(path, lambda f: f.write(arr.tobytes()))
    return len(arr)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", default="fortunes-zh", help="folder under data/ holding docs.jsonl")
    parser.add_argument("--docs", help="docs.jsonl path (default data/<dataset>/docs.jsonl)")
    parser.add_argument("--out_dir", help="output folder (default: the folder of docs.jsonl)")
    parser.add_argument("--val_fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--num_threads", type=int, default=os.cpu_count())
    parser.add_argument("--strict", action="store_true", help="fail on the first malformed document")
    parser.add_argument("--bpe_vocab_size", type=int, nargs="*", default=[8192],
                        help="train a byte-level BPE of each size on the train documents (none: no BPE)")
    args = parser.parse_args()

    docs_path = Path(args.docs or DATA_DIR / args.dataset / "docs.jsonl")
    out_dir = Path(args.out_dir or docs_path.parent)
    texts = load_texts(docs_path, args.strict)
    if len(texts) < 2:
        raise UserError(f"{docs_path}: need at least 2 documents to split train/val, found {len(texts)}")
    ids = tokenize(texts, GPT2, args.num_threads)
    train_idx, val_idx = split_by_document(len(ids), args.val_fraction, args.seed)
    n_train = write_tokens(out_dir / "train.bin", [ids[i] for i in train_idx])
    n_val = write_tokens(out_dir / "val.bin", [ids[i] for i in val_idx])
    train_chars, val_chars = sum(len(texts[i]) for i in train_idx), sum(len(texts[i]) for i in val_idx)
    vocabularies = {"gpt2": {"name": "gpt2", "train_tokens": n_train, "val_tokens": n_val,
                             "val_tokens_per_char": n_val / val_chars}}
    for size in args.bpe_vocab_size:
        # trained on the train documents only: nothing of the val text leaks into the vocabulary
        bpe = train_bpe([texts[i] for i in train_idx], size)
        write_json(bpe_file(out_dir, size), bpe.state())
        bpe_ids = tokenize(texts, bpe, args.num_threads)
        n = {split: write_tokens(bpe.token_file(out_dir, split), [bpe_ids[i] for i in idx])
             for split, idx in (("train", train_idx), ("val", val_idx))}
        vocabularies[bpe.tag] = {"name": bpe.name, "sha256": bpe.sha256, "vocab_size": bpe.vocab_size,
                                 "train_tokens": n["train"], "val_tokens": n["val"],
                                 "val_tokens_per_char": n["val"] / val_chars}
        print(f"{bpe_file(out_dir, size).name}: {bpe.n_tokens - 1:,} ranks trained on the train documents; "
              f"train {n['train']:,} tokens, val {n['val']:,} tokens ({n['val'] / val_chars:.3f} per character; "
              f"GPT-2: {n_val / val_chars:.3f})")
    # the whole corpus's vocabulary (train and val): a trimmed model can then read val.bin
    # token for token, so its bits per character compare with the full vocabulary's
    vocab = trimmed_vocabulary(np.unique(np.concatenate([np.asarray(d, dtype=np.int64) for d in ids])))
    chars = "".join(sorted(set().union(*map(set, texts))))
    write_json(out_dir / "vocab.json", {"tokenizer": vocab.name, "gpt2_ids": vocab.state(), "chars": chars})
    fetch_meta = docs_path.with_name("docs.meta.json")
    write_json(out_dir / "meta.json", {
        "source": str(docs_path), "docs_sha256": hashlib.sha256(docs_path.read_bytes()).hexdigest(),
        "train_tokens": n_train, "val_tokens": n_val,
        "train_documents": len(train_idx), "val_documents": len(val_idx),
        # characters (not counting the <|endoftext|> separators): bits per character = nats / chars / ln 2
        "train_chars": train_chars, "val_chars": val_chars,
        "trimmed_vocab_tokens": vocab.n_tokens, "distinct_chars": len(chars), "vocabularies": vocabularies,
        "fetch": json.loads(fetch_meta.read_text(encoding="utf-8")) if fetch_meta.exists() else None,
        "val_fraction": args.val_fraction, "seed": args.seed,
        "tokenizer": "gpt2", "tokenizer_sha256": VOCAB_SHA256, "dtype": "uint16", "eot": GPT2.eot,
    })
    print(f"train.bin: {n_train:,} tokens ({len(train_idx):,} docs), val.bin: {n_val:,} tokens "
          f"({len(val_idx):,} docs) in {out_dir}; trimmed vocabulary {vocab.n_tokens:,} tokens "
          f"(padded {vocab.vocab_size:,}), {len(chars):,} distinct characters")


if __name__ == "__main__":
    run_cli(main)
