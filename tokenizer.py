"""
The one place where text becomes token ids and back: the GPT-2 BPE tokenizer (loaded
offline from the committed assets/gpt2.tiktoken), the model's vocabulary (all of GPT-2, or
trimmed to the GPT-2 ids a corpus uses), the 问/答 chat template, and the decoding
constraint that keeps generated text valid UTF-8 made of known characters.
"""
import base64
import codecs
import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import tiktoken

VOCAB_FILE = Path(__file__).resolve().parent / "assets" / "gpt2.tiktoken"
# the sha256 tiktoken itself expects for r50k_base, i.e. tiktoken.get_encoding("gpt2")
VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken_ext/openai_public.py: r50k_pat_str (the GPT-2 pre-tokenizer regex)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = 50256  # GPT-2's <|endoftext|>: ends every document and every answer
PADDED_VOCAB_SIZE = 50304  # 50257 rounded up to a multiple of 64 for faster matmuls


@lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2 BPE, identical to tiktoken.get_encoding("gpt2") but with no network access."""
    data = VOCAB_FILE.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise ValueError(f"{VOCAB_FILE}: sha256 {digest} is not the GPT-2 vocabulary ({VOCAB_SHA256})")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)


@lru_cache(maxsize=None)
def _gpt2_token_bytes():
    enc = get_tokenizer()
    return [enc.decode_single_token_bytes(i) for i in range(EOT)] + [b""]  # EOT writes no text


def byte_token_ids():
    """The GPT-2 ids of the 256 single-byte tokens, indexed by byte value."""
    enc = get_tokenizer()
    return [enc.encode_single_token(bytes([b])) for b in range(256)]


def pad64(n):
    return (n + 63) // 64 * 64


class Tokenizer:
    """GPT-2 BPE seen through the model's vocabulary.

    Full (gpt2_ids None): model id = GPT-2 id, 50,257 tokens padded to 50,304.
    Trimmed: model id i = GPT-2 id gpt2_ids[i] (sorted), padded to a multiple of 64. It
    always holds the 256 single-byte tokens and <|endoftext|>, so any text stays encodable
    with nothing lost: a GPT-2 token the vocabulary lacks is written as its byte tokens.
    A small model then spends its output layer on the few thousand tokens its data uses
    instead of 50,304."""

    def __init__(self, gpt2_ids=None):
        self.trimmed = gpt2_ids is not None
        ids = np.arange(EOT + 1) if gpt2_ids is None else np.unique(np.asarray(list(gpt2_ids), dtype=np.int64))
        if self.trimmed:
            if ids.size and (ids[0] < 0 or ids[-1] > EOT):
                raise ValueError(f"vocabulary ids must be GPT-2 ids 0..{EOT}")
            ids = np.union1d(ids, byte_token_ids() + [EOT])
        self.gpt2_ids = ids
        self.n_tokens = len(ids)
        self.vocab_size = PADDED_VOCAB_SIZE if not self.trimmed else pad64(self.n_tokens)
        self.to_model = np.full(EOT + 1, -1, dtype=np.int64)  # GPT-2 id -> model id (-1: not in it)
        self.to_model[ids] = np.arange(self.n_tokens)
        self.eot = int(self.to_model[EOT])
        self._bytes_of_byte = np.array([self.to_model[g] for g in byte_token_ids()])
        all_bytes = _gpt2_token_bytes()
        self.token_bytes = [all_bytes[g] for g in ids.tolist()] + [b""] * (self.vocab_size - self.n_tokens)
        digest = hashlib.sha256(ids.astype("<u4").tobytes()).hexdigest()[:12]
        self.name = "gpt2" if not self.trimmed else f"gpt2-trimmed-{self.n_tokens}-{digest}"

    def __repr__(self):
        return f"Tokenizer({self.name}, {self.vocab_size} slots)"

    def __eq__(self, other):
        return isinstance(other, Tokenizer) and self.name == other.name

    def __hash__(self):
        return hash(self.name)

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

    def encode(self, text: str) -> list[int]:
        # ordinary: a literal "<|endoftext|>" in user text is text, never the special token
        ids = get_tokenizer().encode_ordinary(text)
        return ids if not self.trimmed else self.from_gpt2(ids).tolist()

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.token_bytes[int(i)] if int(i) != self.eot else b"<|endoftext|>" for i in ids)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


GPT2 = Tokenizer()  # the full vocabulary, model id = GPT-2 id


def trimmed_vocabulary(gpt2_ids):
    """The vocabulary a small model is given for a corpus: the GPT-2 ids the corpus uses,
    the template's tokens, the 256 byte tokens and <|endoftext|>."""
    template = {i for piece in TEMPLATE_PIECES for i in GPT2.encode(piece)}
    return Tokenizer(np.union1d(np.asarray(gpt2_ids, dtype=np.int64), sorted(template)))


def tokenizer_from_state(state):
    return GPT2 if state is None else Tokenizer(state)


def load_vocab_file(path):
    """(tokenizer, chars) stored with prepared data (vocab.json)."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    return tokenizer_from_state(d.get("gpt2_ids")), d.get("chars")


# ----------------------------------------------------------------------------------
# Chat template. A conversation is a list of messages {"role", "content", "loss"?}.
#   system       系统:{content}[\n工具:{tools as JSON}]\n      masked
#   user         问:{content}\n                               masked
#   assistant    答:{content}<|endoftext|>                    content + end token trained
#   tool call    答:调用:{name}\n{content}<|endoftext|>        (assistant with "tool") trained
#   observation  结果:{content}\n                              masked
# A message's "loss": true/false overrides its role's default; the role prefixes
# (系统:/问:/答:/结果:) and separators are never trained. So a single turn is exactly
# 问:{q}\n答:{a}<|endoftext|>, with loss only on {a}<|endoftext|>.
ROLES = ("system", "user", "assistant", "observation")
PREFIX = {"system": "系统:", "user": "问:", "assistant": "答:", "observation": "结果:"}
TEMPLATE_PIECES = [*PREFIX.values(), "\n", "工具:", "调用:"]


def render_conversation(tok, messages, tools=None):
    """Token ids (in tok's vocabulary) and the 0/1 loss mask (1 on trained tokens) of a whole session."""
    messages = list(messages)
    if tools:
        tools_text = "工具:" + json.dumps(tools, ensure_ascii=False)
        if messages and messages[0]["role"] == "system":
            first = dict(messages[0])
            first["content"] = (first["content"] + "\n" if first["content"] else "") + tools_text
            messages[0] = first
        else:
            messages.insert(0, {"role": "system", "content": tools_text})
    ids, mask = [], []

    def add(text, trained):
        piece = tok.encode(text)
        ids.extend(piece)
        mask.extend([int(trained)] * len(piece))

    for m in messages:
        role = m["role"]
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        trained = m.get("loss")
        if trained is None:
            trained = role == "assistant"
        add(PREFIX[role], False)
        content = m["content"]
        if role == "assistant" and m.get("tool"):
            content = f"调用:{m['tool']}\n{content}"
        add(content, trained)
        if role == "assistant":
            ids.append(tok.eot)
            mask.append(int(trained))
        else:
            add("\n", False)
    return ids, mask


def render_prompt(tok, history, question):
    """Ids that ask the model for the next answer: past turns, 问:{question}\\n答:"""
    ids, _ = render_conversation(tok, list(history) + [{"role": "user", "content": question}])
    return ids + tok.encode(PREFIX["assistant"])


# ----------------------------------------------------------------------------------
# Decoding that only writes real characters. Byte-level BPE lets a model emit half a
# character, or glue byte pieces into one it never saw; both print as � or garbage.
# The state of a row is the bytes of the character being written (b"" between
# characters). For each state, a boolean mask over the vocabulary says which tokens keep
# the output valid UTF-8 whose characters are all allowed; each state's mask is
# computed the first time it is reached and then cached for the vocabulary.
CONSTRAINTS = ("chars", "utf8", "off")


@lru_cache(maxsize=None)
def _valid_prefix(p):
    """Is p a proper start of some valid UTF-8 character? (Only the byte after the lead
    byte has a restricted range, so trying each value for the next byte is enough.)"""
    lead = p[0]
    n = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
    if len(p) >= n:
        return False
    return any(_decodes(p + bytes([b]) + b"\x80" * (n - len(p) - 1)) for b in range(0x80, 0xC0))


def _decodes(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


class TextConstraint:
    """Which next tokens keep the generated bytes valid UTF-8 made of allowed characters.
    chars None: any character (validity only). EOT is allowed only between characters, so
    an answer never ends half-way through one."""

    def __init__(self, tok, chars=None):
        self.tok = tok
        self.chars = None if chars is None else frozenset(chars)
        self.prefixes = None if chars is None else {
            e[:i] for c in self.chars for e in [c.encode("utf-8")] for i in range(1, len(e))}
        self._masks = {}
        # tokens that may continue a half-written character start with a continuation byte
        self._continuations = [i for i, b in enumerate(tok.token_bytes) if b and 0x80 <= b[0] < 0xC0]

    def with_chars(self, text):
        """This constraint, also allowing the characters of text (a prompt)."""
        if self.chars is None or set(text) <= self.chars:
            return self
        return _cached_constraint(self.tok, self.chars | frozenset(text))

    def step(self, state, token):
        """The state after token, or None if the token is not allowed in state."""
        if token == self.tok.eot:
            return b"" if state == b"" else None
        piece = self.tok.token_bytes[token]
        if not piece:  # a padding slot: no text
            return None
        buf = state + piece
        try:
            text, used = codecs.utf_8_decode(buf, "strict", False)
        except UnicodeDecodeError:
            return None
        if self.chars is not None and not self.chars.issuperset(text):
            return None
        rest = buf[used:]
        if rest and not (rest in self.prefixes if self.prefixes is not None else _valid_prefix(rest)):
            return None
        return rest

    def mask(self, state):
        """Bool numpy array over the vocabulary: the tokens allowed in state."""
        if state not in self._masks:
            m = np.zeros(self.tok.vocab_size, dtype=bool)
            for t in (range(self.tok.vocab_size) if state == b"" else self._continuations):
                m[t] = self.step(state, t) is not None
            self._masks[state] = m
        return self._masks[state]


@lru_cache(maxsize=16)
def _cached_constraint(tok, chars):
    return TextConstraint(tok, chars)


def make_constraint(tok, mode="chars", chars=None):
    """The decoding constraint for a model: 'chars' = valid UTF-8 made of the characters
    of the training text (validity only where they are unknown), 'utf8' = valid UTF-8,
    'off' = raw tokens (shows what byte-level BPE does)."""
    if mode not in CONSTRAINTS:
        raise ValueError(f"constraint must be one of {', '.join(CONSTRAINTS)}, got {mode!r}")
    if mode == "off":
        return None
    return _cached_constraint(tok, frozenset(chars) if mode == "chars" and chars else None)
