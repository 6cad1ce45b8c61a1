"""
The one place where text becomes token ids and back: the model's vocabulary. Three kinds,
all encoded at run time by tiktoken:

  gpt2     GPT-2's BPE, loaded offline from the committed assets/gpt2.tiktoken: 50,257
           tokens padded to 50,304 (the 45M config)
  trimmed  GPT-2's BPE seen through a vocabulary cut to the GPT-2 ids a corpus uses, plus
           the 256 byte tokens (a GPT-2 token it lacks is written as its bytes)
  bpe      a byte-level BPE trained on a corpus's training split by rustbpe (as nanochat
           does), e.g. 8,192 tokens: ~0.5 tokens per Chinese character where GPT-2 spends ~1.2-2

Every vocabulary holds the 256 single bytes, so any text round-trips, then <|endoftext|>,
then ChatML's <|im_start|> and <|im_end|> in the next two slots. Text is always encoded as
ordinary text: a user who types "<|im_start|>" gets those characters, never the marker.
"""
import base64
import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import tiktoken

from data_utils import UserError, require_file
from miniglm.chat_template import TEMPLATE_PIECES

VOCAB_FILE = Path(__file__).resolve().parent.parent / "assets" / "gpt2.tiktoken"  # (assets/ beside miniglm/)
# the sha256 tiktoken itself expects for r50k_base, i.e. tiktoken.get_encoding("gpt2")
VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken_ext/openai_public.py: r50k_pat_str (the GPT-2 pre-tokenizer regex)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# The trained BPE's pre-tokenizer: GPT-2's pattern. A run of letters, Chinese characters
# included, is one piece that merges may join (疑是地上霜); punctuation stays apart. GPT-4's
# (cl100k) pattern, which glues one punctuation mark to the run after it (，疑是地上霜),
# spends merges on such pairs: the tiny demo ended 0.07 bits/char worse with it
# (benchmarks/README.md), though it spent 1% fewer tokens per character.
BPE_PATTERN = GPT2_PATTERN
EOT = 50256  # GPT-2's <|endoftext|>: ends every document and every answer
SPECIALS = ("<|im_start|>", "<|im_end|>")  # ChatML's markers, in the two slots after <|endoftext|>
VOCABS = ("gpt2", "trimmed", "bpe")


def pad64(n):
    return (n + 63) // 64 * 64


def read_ranks(text):
    """tiktoken's file format, one 'base64(token bytes) rank' per line → {bytes: rank}."""
    ranks = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2 BPE, identical to tiktoken.get_encoding("gpt2") but with no network access."""
    data = VOCAB_FILE.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise ValueError(f"{VOCAB_FILE}: sha256 {digest} is not the GPT-2 vocabulary ({VOCAB_SHA256})")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=read_ranks(data.decode()),
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)


@lru_cache(maxsize=None)
def _gpt2_token_bytes():
    enc = get_tokenizer()
    return [enc.decode_single_token_bytes(i) for i in range(EOT)] + [b""]  # EOT writes no text


def byte_token_ids():
    """The GPT-2 ids of the 256 single-byte tokens, indexed by byte value."""
    enc = get_tokenizer()
    return [enc.encode_single_token(bytes([b])) for b in range(256)]


class Tokenizer:
    """What every vocabulary shares. Model ids 0..n_tokens-2 are ordinary tokens,
    n_tokens-1 is <|endoftext|> (eot), then im_start and im_end; vocab_size pads the rest
    to a multiple of 64 (slots that write no text and are never produced by encode()).
    Subclasses set enc (the tiktoken Encoding), and call _setup."""
    kind = "?"
    tag = ""  # names the data folder's token files: train.bin (GPT-2 ids) or train.{tag}.bin

    def _setup(self, token_bytes, eot, name, sha256):
        self.n_tokens, self.eot, self.name, self.sha256 = len(token_bytes), eot, name, sha256
        self.vocab_size = pad64(self.n_tokens + len(SPECIALS))  # full GPT-2: 50,304
        self.im_start, self.im_end = self.n_tokens, self.n_tokens + 1
        self.stop_ids = (self.eot, self.im_end)  # generation ends at either (问/答 and ChatML answers)
        self._special_text = {self.eot: b"<|endoftext|>", self.im_start: SPECIALS[0].encode(),
                              self.im_end: SPECIALS[1].encode()}
        self.token_bytes = list(token_bytes) + [b""] * (self.vocab_size - self.n_tokens)

    def __repr__(self):
        return f"Tokenizer({self.name}, {self.vocab_size} slots)"

    def __eq__(self, other):
        return isinstance(other, Tokenizer) and self.name == other.name

    def __hash__(self):
        return hash(self.name)

    def encode(self, text: str) -> list[int]:
        # ordinary: a literal "<|endoftext|>" in user text is text, never the special token
        return self.enc.encode_ordinary(text)

    def decode_bytes(self, ids) -> bytes:
        """The text bytes of ids; the special tokens are written as their names."""
        return b"".join(self._special_text.get(int(i)) or self.token_bytes[int(i)] for i in ids)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def from_file_ids(self, ids):
        """Ids as stored in the data folder's token files → model ids (numpy int64)."""
        return np.asarray(ids, dtype=np.int64)

    def token_file(self, data_dir, split):
        return Path(data_dir) / (f"{split}.{self.tag}.bin" if self.tag else f"{split}.bin")


class GPT2Tokenizer(Tokenizer):
    """GPT-2 BPE seen through the model's vocabulary.

    Full (gpt2_ids None): model id = GPT-2 id, 50,257 tokens padded to 50,304.
    Trimmed: model id i = GPT-2 id gpt2_ids[i] (sorted), padded to a multiple of 64. It
    always holds the 256 single-byte tokens and <|endoftext|>, so any text stays encodable
    with nothing lost: a GPT-2 token the vocabulary lacks is written as its byte tokens.
    A small model then spends its output layer on the few thousand tokens its data uses
    instead of 50,304. The data folder's .bin files hold GPT-2 ids either way."""

    def __init__(self, gpt2_ids=None):
        self.trimmed = gpt2_ids is not None
        self.kind = "trimmed" if self.trimmed else "gpt2"
        self.enc, self.pattern = get_tokenizer(), GPT2_PATTERN
        ids = np.arange(EOT + 1) if gpt2_ids is None else np.unique(np.asarray(list(gpt2_ids), dtype=np.int64))
        if self.trimmed:
            if ids.size and (ids[0] < 0 or ids[-1] > EOT):
                raise ValueError(f"vocabulary ids must be GPT-2 ids 0..{EOT}")
            ids = np.union1d(ids, byte_token_ids() + [EOT])
        self.gpt2_ids = ids
        self.to_model = np.full(EOT + 1, -1, dtype=np.int64)  # GPT-2 id -> model id (-1: not in it)
        self.to_model[ids] = np.arange(len(ids))
        self._bytes_of_byte = np.array([self.to_model[g] for g in byte_token_ids()])
        all_bytes = _gpt2_token_bytes()
        digest = hashlib.sha256(ids.astype("<u4").tobytes()).hexdigest()[:12]
        self._setup([all_bytes[g] for g in ids.tolist()], int(self.to_model[EOT]),
                    f"gpt2-trimmed-{len(ids)}-{digest}" if self.trimmed else "gpt2", VOCAB_SHA256)

    def state(self):
        """What a checkpoint or a data folder stores: None for full GPT-2, else the ids."""
        return self.gpt2_ids.tolist() if self.trimmed else None

    def from_gpt2(self, ids):
        """GPT-2 ids → model ids (numpy int64); an id outside the vocabulary becomes its bytes."""
        ids = np.asarray(ids, dtype=np.int64)
        mapped = self.to_model[ids]
        if (mapped >= 0).all():
            return mapped
        all_bytes = _gpt2_token_bytes()
        out = []
        for g, m in zip(ids.tolist(), mapped.tolist()):
            out.extend([m] if m >= 0 else self._bytes_of_byte[list(all_bytes[g])].tolist())
        return np.array(out, dtype=np.int64)

    from_file_ids = from_gpt2

    def encode(self, text: str) -> list[int]:
        ids = self.enc.encode_ordinary(text)
        return ids if not self.trimmed else self.from_gpt2(ids).tolist()


class BPETokenizer(Tokenizer):
    """A byte-level BPE trained on a corpus (train_bpe), encoded by tiktoken from its
    mergeable ranks. Ranks 0-255 are the single bytes (byte fallback: any text round-trips,
    characters never seen in training included); <|endoftext|>, <|im_start|> and
    <|im_end|> follow the last rank. size is the vocabulary asked for (ranks + 3); it names
    the data folder's files: bpe-{size}.json (this tokenizer) and {split}.bpe-{size}.bin."""
    kind = "bpe"

    def __init__(self, ranks_text, size, pattern=BPE_PATTERN):
        ranks = read_ranks(ranks_text)
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)) or any(ranks.get(bytes([b])) != b for b in range(256)):
            raise ValueError("BPE ranks must be 0..n-1 with the 256 single bytes first")
        self.size, self.pattern, self.ranks_text, self.tag = int(size), pattern, ranks_text, f"bpe-{size}"
        self.enc = tiktoken.Encoding(name=self.tag, pat_str=pattern, mergeable_ranks=ranks,
                                     special_tokens={"<|endoftext|>": n, SPECIALS[0]: n + 1, SPECIALS[1]: n + 2})
        token_bytes = [b""] * n
        for token, rank in ranks.items():
            token_bytes[rank] = token
        sha = hashlib.sha256(f"{pattern}\n{ranks_text}".encode()).hexdigest()
        self._setup(token_bytes + [b""], n, f"{self.tag}-{sha[:12]}", sha)

    def state(self):
        return {"kind": "bpe", "size": self.size, "pattern": self.pattern, "ranks": self.ranks_text}


def train_bpe(texts, size):
    """A byte-level BPE of `size` tokens (ranks + the 3 special tokens) trained by rustbpe on
    texts, pre-tokenized with BPE_PATTERN (GPT-2's). Deterministic: the same texts give the same
    ranks (merges are chosen by count, ties by the pair's bytes; the text order does not matter)."""
    import rustbpe
    if not 512 <= size <= 65536:
        raise UserError(f"a BPE vocabulary must have 512 to 65,536 tokens (uint16 token files), got {size}")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), size - 1 - len(SPECIALS), pattern=BPE_PATTERN)
    ranks = sorted((rank, bytes(token)) for token, rank in trainer.get_mergeable_ranks())
    return BPETokenizer("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in ranks), size)


def merge_parts(ranks):
    """{token: (left, right)} for each token of a BPE's ranks ({bytes: rank}) made by a merge, in
    rank order: the two tokens its bytes end in when BPE'd with only the lower ranks (how
    transformers converts tiktoken vocabularies; export_hf's merges)."""
    parts_of = {}
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 1:
            best, i = min((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            parts_of[token] = tuple(parts)
    return parts_of


GPT2 = GPT2Tokenizer()  # the full vocabulary, model id = GPT-2 id


def trimmed_vocabulary(gpt2_ids):
    """The vocabulary a small model is given for a corpus: the GPT-2 ids the corpus uses,
    the template's tokens, the 256 byte tokens and <|endoftext|>."""
    template = {i for piece in TEMPLATE_PIECES for i in GPT2.encode(piece)}
    return GPT2Tokenizer(np.union1d(np.asarray(gpt2_ids, dtype=np.int64), sorted(template)))


def tokenizer_from_state(state):
    """The tokenizer a checkpoint or data folder stored: None (full GPT-2), a list of GPT-2
    ids (trimmed) or a BPE's dict."""
    if state is None:
        return GPT2
    if isinstance(state, dict) and state.get("kind") == "bpe":
        return BPETokenizer(state["ranks"], state["size"], state["pattern"])
    if isinstance(state, list):
        return GPT2Tokenizer(state)
    raise ValueError(f"not a stored vocabulary: {type(state).__name__}")


def load_vocab_file(path):
    """(tokenizer, chars) stored with prepared data (vocab.json: the trimmed vocabulary)."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    return tokenizer_from_state(d.get("gpt2_ids")), d.get("chars")


def bpe_file(data_dir, size):
    return Path(data_dir) / f"bpe-{size}.json"


def data_vocabulary(data_dir, vocab="gpt2", size=8192):
    """The vocabulary a model trained from scratch on data_dir gets (train.py's vocab and
    vocab_size keys): all of GPT-2, GPT-2 trimmed to the corpus, or the corpus's trained BPE."""
    if vocab not in VOCABS:
        raise UserError(f"vocab must be one of {', '.join(VOCABS)}, got {vocab!r}")
    if vocab == "gpt2":
        return GPT2
    if vocab == "trimmed":
        require_file(Path(data_dir) / "vocab.json", "vocab='trimmed' needs it: run data/prepare.py")
        return load_vocab_file(Path(data_dir) / "vocab.json")[0]
    path = bpe_file(data_dir, size)
    require_file(path, f"vocab='bpe' needs it: run data/prepare.py with --bpe_vocab_size {size}")
    return tokenizer_from_state(json.loads(path.read_text(encoding="utf-8")))
