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
# The ChatML template's markers: special tokens in the first padding slots after the
# vocabulary (50257 and 50258 for full GPT-2). Text never encodes to them.
SPECIALS = ("<|im_start|>", "<|im_end|>")


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
        self.vocab_size = PADDED_VOCAB_SIZE if not self.trimmed else pad64(self.n_tokens + len(SPECIALS))
        self.to_model = np.full(EOT + 1, -1, dtype=np.int64)  # GPT-2 id -> model id (-1: not in it)
        self.to_model[ids] = np.arange(self.n_tokens)
        self.eot = int(self.to_model[EOT])
        self.im_start, self.im_end = self.n_tokens, self.n_tokens + 1  # padding slots, never produced by encode()
        self.stop_ids = (self.eot, self.im_end)  # generation ends at either (问/答 and ChatML answers)
        self._special_text = {self.eot: b"<|endoftext|>", self.im_start: SPECIALS[0].encode(),
                              self.im_end: SPECIALS[1].encode()}
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
        """The text bytes of ids; the special tokens are written as their names."""
        return b"".join(self._special_text.get(int(i)) or self.token_bytes[int(i)] for i in ids)

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
# Chat templates. A conversation is a list of messages {"role", "content", "loss"?, "tool"?}.
# "qa" (问/答, the default):
#   system       系统:{content}[\n工具:{tools as JSON}]\n      masked
#   user         问:{content}\n                               masked
#   assistant    答:{content}<|endoftext|>                    content + end token trained
#   tool call    答:调用:{name}\n{content}<|endoftext|>        (assistant with "tool") trained
#   observation  结果:{content}\n                              masked
# "chatml" (as Qwen uses it): <|im_start|>{role}\n{content}<|im_end|>\n, roles system,
# user, assistant and tool (the observation); on an assistant turn the content and
# <|im_end|> are trained. The markers are special tokens that user text never encodes to.
# A message's "loss": true/false overrides its role's default; the role prefixes and
# separators are never trained. So a single 问/答 turn is exactly
# 问:{q}\n答:{a}<|endoftext|>, with loss only on {a}<|endoftext|>.
ROLES = ("system", "user", "assistant", "observation")
TEMPLATES = ("qa", "chatml")
PREFIX = {"system": "系统:", "user": "问:", "assistant": "答:", "observation": "结果:"}
CHATML_ROLE = {"system": "system", "user": "user", "assistant": "assistant", "observation": "tool"}
TEMPLATE_PIECES = [*PREFIX.values(), "\n", "工具:", "调用:", *(f"{r}\n" for r in CHATML_ROLE.values())]


def check_template(template):
    if template not in TEMPLATES:
        raise ValueError(f"chat template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    return template


def message_segments(tok, messages, tools=None, template="qa"):
    """Each message as a segment {"role", "head", "body", "tail", "tail_mask", "trained"}:
    head = the role marker (never trained), body = the content ids (trained iff "trained"),
    tail = the end marker with its own 0/1 mask. Truncation cuts bodies; joining the
    segments gives render_conversation's ids and mask."""
    check_template(template)
    messages = list(messages)
    if tools:
        tools_text = "工具:" + json.dumps(tools, ensure_ascii=False)
        if messages and messages[0]["role"] == "system":
            first = dict(messages[0])
            first["content"] = (first["content"] + "\n" if first["content"] else "") + tools_text
            messages[0] = first
        else:
            messages.insert(0, {"role": "system", "content": tools_text})
    segments = []
    for m in messages:
        role = m["role"]
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        trained = m.get("loss")
        if trained is None:
            trained = role == "assistant"
        content = m["content"]
        if role == "assistant" and m.get("tool"):
            content = f"调用:{m['tool']}\n{content}"
        if template == "qa":
            head = tok.encode(PREFIX[role])
            tail, tail_mask = ([tok.eot], [int(trained)]) if role == "assistant" else (tok.encode("\n"), [0])
        else:
            head = [tok.im_start] + tok.encode(CHATML_ROLE[role] + "\n")
            tail = [tok.im_end] + tok.encode("\n")
            tail_mask = [int(trained and role == "assistant"), 0]
        segments.append({"role": role, "head": head, "body": tok.encode(content), "tail": tail,
                         "tail_mask": tail_mask, "trained": bool(trained), "tool": bool(m.get("tool"))})
    return segments


def join_segments(segments):
    ids, mask = [], []
    for s in segments:
        ids += s["head"] + s["body"] + s["tail"]
        mask += [0] * len(s["head"]) + [int(s["trained"])] * len(s["body"]) + s["tail_mask"]
    return ids, mask


def render_conversation(tok, messages, tools=None, template="qa"):
    """Token ids (in tok's vocabulary) and the 0/1 loss mask (1 on trained tokens) of a whole session."""
    return join_segments(message_segments(tok, messages, tools, template))


def assistant_head(tok, template="qa"):
    """The ids that open an answer: 答: or <|im_start|>assistant\n."""
    return message_segments(tok, [{"role": "assistant", "content": ""}], template=template)[0]["head"]


def render_prompt(tok, history, question, template="qa"):
    """Ids that ask the model for the next answer: past turns, the question, the answer's head."""
    ids, _ = render_conversation(tok, list(history) + [{"role": "user", "content": question}], template=template)
    return ids + assistant_head(tok, template)


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
    chars None: any character (validity only). The end tokens (<|endoftext|>, <|im_end|>)
    are allowed only between characters, so an answer never ends half-way through one."""

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
        if token in self.tok.stop_ids:
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
