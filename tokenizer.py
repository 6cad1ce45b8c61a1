"""
The one place where text becomes token ids: the GPT-2 BPE tokenizer (loaded offline
from the committed assets/gpt2.tiktoken) and the 问/答 chat template used by SFT data
preparation, sampling, the Gradio page and the evaluations.
"""
import base64
import hashlib
import json
from functools import lru_cache
from pathlib import Path

import tiktoken

VOCAB_FILE = Path(__file__).resolve().parent / "assets" / "gpt2.tiktoken"
# the sha256 tiktoken itself expects for r50k_base, i.e. tiktoken.get_encoding("gpt2")
VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken_ext/openai_public.py: r50k_pat_str (the GPT-2 pre-tokenizer regex)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = 50256  # <|endoftext|>: ends every document and every answer
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


def encode(text: str) -> list[int]:
    # ordinary: a literal "<|endoftext|>" in user text is text, never the special token
    return get_tokenizer().encode_ordinary(text)


def decode(ids) -> str:
    return get_tokenizer().decode([int(i) for i in ids if int(i) <= EOT])


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


def render_conversation(messages, tools=None):
    """Token ids and the 0/1 loss mask (1 on trained tokens) of a whole session."""
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
        piece = encode(text)
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
            ids.append(EOT)
            mask.append(int(trained))
        else:
            add("\n", False)
    return ids, mask


def render_prompt(history, question):
    """Ids that ask the model for the next answer: past turns, 问:{question}\\n答:"""
    ids, _ = render_conversation(list(history) + [{"role": "user", "content": question}])
    return ids + encode(PREFIX["assistant"])
