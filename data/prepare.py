"""
Tokenize data/<dataset>/docs.jsonl with GPT-2 BPE into train.bin / val.bin (uint16 GPT-2
token ids, every document followed by <|endoftext|>), meta.json, and vocab.json: the
vocabulary trimmed to the GPT-2 ids this corpus uses (plus the byte tokens, <|endoftext|>
and the chat template's tokens) and the characters it contains. A config with
vocab="trimmed" trains on that vocabulary; the .bin files stay GPT-2 ids either way. The
split is by document with a fixed seed, so no document is half in train and half in val.

  python data/prepare.py fortunes-zh
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
from tokenizer import EOT, VOCAB_SHA256, get_tokenizer, trimmed_vocabulary  # noqa: E402

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


def tokenize(texts, num_threads, chunk=2048):
    """Token ids of every document, <|endoftext|> appended; tiktoken batches run in
    parallel threads (its Rust core releases the GIL)."""
    enc = get_tokenizer()
    out = []
    with tqdm(total=len(texts), desc="tokenizing", unit="doc") as bar:
        for i in range(0, len(texts), chunk):
            for ids in enc.encode_ordinary_batch(texts[i:i + chunk], num_threads=num_threads):
                out.append(ids + [EOT])
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
    args = parser.parse_args()

    docs_path = Path(args.docs or DATA_DIR / args.dataset / "docs.jsonl")
    out_dir = Path(args.out_dir or docs_path.parent)
    texts = load_texts(docs_path, args.strict)
    if len(texts) < 2:
        raise UserError(f"{docs_path}: need at least 2 documents to split train/val, found {len(texts)}")
    ids = tokenize(texts, args.num_threads)
    train_idx, val_idx = split_by_document(len(ids), args.val_fraction, args.seed)
    n_train = write_tokens(out_dir / "train.bin", [ids[i] for i in train_idx])
    n_val = write_tokens(out_dir / "val.bin", [ids[i] for i in val_idx])
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
        "train_chars": sum(len(texts[i]) for i in train_idx), "val_chars": sum(len(texts[i]) for i in val_idx),
        "trimmed_vocab_tokens": vocab.n_tokens, "distinct_chars": len(chars),
        "fetch": json.loads(fetch_meta.read_text(encoding="utf-8")) if fetch_meta.exists() else None,
        "val_fraction": args.val_fraction, "seed": args.seed,
        "tokenizer": "gpt2", "tokenizer_sha256": VOCAB_SHA256, "dtype": "uint16", "eot": EOT,
    })
    print(f"train.bin: {n_train:,} tokens ({len(train_idx):,} docs), val.bin: {n_val:,} tokens "
          f"({len(val_idx):,} docs) in {out_dir}; trimmed vocabulary {vocab.n_tokens:,} tokens "
          f"(padded {vocab.vocab_size:,}), {len(chars):,} distinct characters")


if __name__ == "__main__":
    run_cli(main)
