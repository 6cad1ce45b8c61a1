"""
Shared plumbing for the scripts: user-facing errors, atomic file writes, the documents
format written by data/fetch_data.py, and the training batches (pretrain windows from a
uint16 memmap; SFT rows with their loss mask).
"""
import codecs
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


class UserError(Exception):
    """Bad input or setup: shown as one line ('error: ...'), never as a traceback."""


def run_cli(main):
    """Run a script's main(), turning UserError (and Ctrl-C) into a one-line message."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def pick_device(name="auto"):
    """'auto' = cuda > mps > cpu; anything else is used as given."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def atomic_write(path, write_fn, mode="wb"):
    """Write through a temp file in the same folder, then rename: a crash never leaves a
    half-written file under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, ensure_ascii=False, indent=2), mode="w")


def read_lines(path, strict=True):
    """Yield (line number, text) of a UTF-8 text file; a BOM and CRLF line ends are
    accepted. A line that is not UTF-8 is a UserError 'file:line: not UTF-8 (byte 0x.. at
    column N)' when strict; otherwise it is listed in the returned list `bad` and yielded
    as (line number, None), so that callers keep their line numbers."""
    bad = []

    def lines():
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                try:
                    yield lineno, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    column = len(raw[:e.start].decode("utf-8")) + 1
                    problem = f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {column})"
                    if strict:
                        raise UserError(problem) from None
                    bad.append(problem)
                    yield lineno, None
    return lines(), bad


def parse_json(text):
    """json.loads, with every way it fails as one ValueError whose message says why: bad
    syntax, nesting too deep for the parser, a number too long to convert; and a value that
    parses but holds text that is not valid Unicode (a lone surrogate from a \\udXXX escape,
    which no file can hold as UTF-8), which json.loads lets through."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"bad JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError("bad JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        raise ValueError(f"bad JSON ({str(e).split(':')[0][:80]})") from None
    problem = invalid_unicode(value)
    if problem:
        raise ValueError(problem)
    return value


def invalid_unicode(value):
    """What is wrong with the first string in a JSON value that is not valid Unicode, or None."""
    try:
        return _invalid_unicode(value, "text")
    except RecursionError:
        return "bad JSON (nested too deeply)"


def _invalid_unicode(value, where):
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            surrogate = ord(value[e.start])
            return f"{where} is not valid Unicode (lone surrogate U+{surrogate:04X} at character {e.start + 1})"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        name = f"{where}[{key}]" if isinstance(key, int) else key if where == "text" else f"{where}.{key}"
        problem = _invalid_unicode(key, "a key") if isinstance(key, str) else None
        if problem or (problem := _invalid_unicode(item, name)):
            return problem
    return None


def read_jsonl(path, strict=True):
    """Yield (line number, record) from a JSONL file, in file order; a line that is not
    UTF-8, not JSON or not valid Unicode (parse_json) is a UserError naming file:line when
    strict, else it is skipped and listed in the returned list `bad`."""
    lines, bad = read_lines(path, strict)

    def records():
        for lineno, line in lines:
            if line is None or not line.strip():
                continue
            try:
                yield lineno, parse_json(line)
            except ValueError as e:
                if strict:
                    raise UserError(f"{path}:{lineno}: {e}") from None
                bad.append(f"{path}:{lineno}: {e}")

    return records(), bad


# ----------------------------------------------------------------------------------
# Batches. Training draws the row choice for a whole iteration (all micro-steps of all
# ranks) from one seeded generator, so the data order does not depend on the number
# of processes, and a resumed run draws exactly what the uninterrupted one would have.


def require_file(path, hint):
    if not Path(path).exists():
        raise UserError(f"{path} not found: {hint}")


class Batches:
    """A data set draws rows (sample_rows) and loads them as tensors (load); training
    splits the two so that one draw serves every micro-step of every process."""

    def get_batch(self, split, batch_size, generator=None, device="cpu"):
        return self.load(split, self.sample_rows(split, batch_size, generator), device)


class PretrainData(Batches):
    """Token ids of the data folder's text in uint16 files, a row a random window of
    block_size + 1 tokens, x = window[:-1], y = window[1:]. {split}.bin hold GPT-2 ids:
    the full and the trimmed vocabulary read those (mapped through a lookup table: a trimmed
    vocabulary holds every id of its corpus); {split}.bpe-N.bin hold the ids of the folder's
    trained BPE (bpe-N.json), which prepare.py trained on the train split only."""

    def __init__(self, data_dir, block_size, tok):
        self.data_dir, self.block_size, self.tok = Path(data_dir), block_size, tok
        meta = self.data_dir / "meta.json"
        self.meta = json.loads(meta.read_text(encoding="utf-8")) if meta.exists() else {}
        self.files = {split: tok.token_file(self.data_dir, split) for split in ("train", "val")}
        for path in self.files.values():
            require_file(
                path, "run data/prepare.py first" + (f" with --bpe_vocab_size {tok.size}" if tok.kind == "bpe" else "")
            )
        vocab_file = self.data_dir / "vocab.json"
        vocab = json.loads(vocab_file.read_text(encoding="utf-8")) if vocab_file.exists() else {}
        self.chars = vocab.get("chars")  # the corpus's characters (prepare.py), for the decoding constraint
        if tok.kind == "trimmed":
            require_file(vocab_file, "re-run data/prepare.py (it writes the corpus's vocabulary)")
            used = vocab["gpt2_ids"]
            missing = int((tok.to_model[np.asarray(used, dtype=np.int64)] < 0).sum()) if used is not None else -1
            if missing:
                raise UserError(
                    f"{self.data_dir} uses {'GPT-2 tokens' if missing < 0 else f'{missing} GPT-2 tokens'} "
                    f"that the model's trimmed vocabulary ({tok.name}) lacks: it was trimmed to another "
                    f"corpus; pretrain with vocab='trimmed' on this data_dir instead"
                )
        if tok.kind == "bpe":
            stored = self.meta.get("vocabularies", {}).get(tok.tag, {}).get("name")
            if stored != tok.name:
                raise UserError(
                    f"{self.files['train']} was written with the BPE {stored} but the model uses {tok.name}: "
                    f"a BPE is trained per corpus; re-run data/prepare.py, or pretrain with vocab='bpe' "
                    f"on this data_dir"
                )
        for split, path in self.files.items():
            if self.num_tokens(split) <= block_size + 1:
                raise UserError(f"{path} holds {self.num_tokens(split)} tokens, too few for block_size {block_size}")

    def bits_per_char(self, split, nats_per_token):
        """Mean nats per token → bits per character of the split's text (None if prepare.py
        did not count its characters). Tokens and characters are counted over the same
        text, so this compares across vocabularies."""
        chars = self.meta.get(f"{split}_chars")
        return nats_per_token * self.num_tokens(split) / chars / math.log(2) if chars else None

    def _memmap(self, split):
        # reopened on every call: a long-lived np.memmap keeps every page it touched
        # mapped, and memory grows over a long run (the leak nanoGPT works around)
        return np.memmap(self.files[split], dtype=np.uint16, mode="r")

    def num_tokens(self, split):
        return os.path.getsize(self.files[split]) // 2

    def tokens(self, split):
        """All of a split's tokens in the model's ids (numpy int64)."""
        return self.tok.from_file_ids(np.fromfile(self.files[split], dtype=np.uint16))

    def sample_rows(self, split, n, generator):
        return torch.randint(self.num_tokens(split) - self.block_size, (n,), generator=generator)

    def load(self, split, rows, device):
        data = self._memmap(split)
        windows = np.stack([data[i : i + self.block_size + 1] for i in rows.tolist()])
        windows = torch.from_numpy(self.tok.from_file_ids(windows))
        return to_device(dict(x=windows[:, :-1], y=windows[:, 1:]), device)


class SFTData(Batches):
    """Rows of block_size token ids in data_dir/sft_{split}.bin (uint16) with a 0/1 mask
    per token in sft_{split}_mask.bin (1 = answer token or end token) and, for packed data,
    segment ids in sft_{split}_seg.bin. x = row[:-1], y = row[1:], loss_mask = mask[1:]:
    the loss on predicting token t+1 counts iff token t+1 is an answer token."""

    def __init__(self, data_dir, block_size, tok):
        self.data_dir = Path(data_dir)
        require_file(self.data_dir / "meta.json", "run data/prepare_sft.py first")
        meta = json.loads((self.data_dir / "meta.json").read_text())
        if "block_size" not in meta:
            raise UserError(
                f"{self.data_dir / 'meta.json'} is not SFT metadata (no block_size); is this a pretraining folder?"
            )
        data_vocab = meta.get("vocab", "gpt2")
        if data_vocab != tok.name:
            raise UserError(
                f"{self.data_dir} was tokenized for the vocabulary {data_vocab} but the model uses "
                f"{tok.name}: re-run data/prepare_sft.py --vocab <the model's checkpoint> "
                f"--out_dir {self.data_dir}"
            )
        if meta["block_size"] > block_size + 1:
            raise UserError(
                f"SFT rows in {data_dir} are {meta['block_size']} tokens but the model takes "
                f"{block_size} (its block_size, less a P-Tuning prefix's positions): re-run "
                f"prepare_sft.py --block_size={block_size + 1} or less"
            )
        self.meta, self.row_len, self.packed = meta, meta["block_size"], meta.get("packed", False)
        self.chars = meta.get("chars")  # the characters of the SFT text (prepare_sft.py)
        for split in ("train", "val"):
            require_file(self.data_dir / f"sft_{split}.bin", "run data/prepare_sft.py first")

    def _arrays(self, split):
        def open_(suffix, dtype):
            return np.memmap(self.data_dir / f"sft_{split}{suffix}.bin", dtype=dtype, mode="r").reshape(
                -1, self.row_len
            )

        ids, mask = open_("", np.uint16), open_("_mask", np.uint8)
        return ids, mask, (open_("_seg", np.uint16) if self.packed else None)

    def num_rows(self, split):
        return os.path.getsize(self.data_dir / f"sft_{split}.bin") // (2 * self.row_len)

    def sample_rows(self, split, n, generator):
        return torch.randint(self.num_rows(split), (n,), generator=generator)

    def load(self, split, rows, device):
        ids, mask, seg = self._arrays(split)
        rows = rows.numpy()
        ids = torch.from_numpy(ids[rows].astype(np.int64))
        mask = torch.from_numpy(mask[rows].astype(np.int64))
        batch = dict(x=ids[:, :-1], y=ids[:, 1:], loss_mask=mask[:, 1:])
        if seg is not None:
            seg = torch.from_numpy(seg[rows].astype(np.int64))
            # a target that starts the next packed sample is not this sample's to predict
            batch["loss_mask"] = batch["loss_mask"] * (seg[:, 1:] == seg[:, :-1])
            batch["segment_ids"] = seg[:, :-1]
        return to_device(batch, device)


def to_device(batch, device):
    if str(device).startswith("cuda"):  # pinned memory lets the copy overlap with compute
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def open_data(data_dir, block_size, tok):
    """SFT data if the folder holds sft_train.bin, else pretraining data; ids in tok's vocabulary.
    (Preference pairs are DPO's data: miniglm/align/dpo.py opens them.)"""
    if (Path(data_dir) / "pairs_train.bin").exists():
        raise UserError(f"{data_dir} holds preference pairs: train on them with --stage=dpo")
    if (Path(data_dir) / "sft_train.bin").exists():
        return SFTData(data_dir, block_size, tok)
    if not (Path(data_dir) / "meta.json").exists():
        raise UserError(
            f"{data_dir}: no prepared data (train.bin from data/prepare.py, or sft_train.bin from data/prepare_sft.py)"
        )
    return PretrainData(data_dir, block_size, tok)
