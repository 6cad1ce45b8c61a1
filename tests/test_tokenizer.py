import pytest

from miniglm import tokenizer
from miniglm.chat_template import render_conversation, render_prompt
from miniglm.tokenizer import EOT, GPT2, get_tokenizer

encode, decode = GPT2.encode, GPT2.decode


def test_known_gpt2_ids():
    assert encode("Hello world") == [15496, 995]
    assert encode(" the") == [262]
    assert get_tokenizer().encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert get_tokenizer().n_vocab == 50257


def test_chinese_round_trip():
    for text in ["床前明月光，疑是地上霜。", "问:《静夜思》的作者是谁?\n答:李白。", "混合 text 与 emoji 🙂"]:
        assert decode(encode(text)) == text


def test_literal_endoftext_in_text_is_not_the_special_token():
    assert EOT not in encode("a <|endoftext|> b")


def test_vocab_hash_is_checked(tmp_path, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(tokenizer.VOCAB_FILE.read_bytes()[:-10])
    monkeypatch.setattr(tokenizer, "VOCAB_FILE", bad)
    tokenizer.get_tokenizer.cache_clear()
    try:
        with pytest.raises(ValueError, match="sha256"):
            tokenizer.get_tokenizer()
    finally:
        tokenizer.get_tokenizer.cache_clear()


def spans(ids, mask):
    """The trained text: decode the runs of mask==1."""
    out, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            out.append(decode(cur))
            cur = []
    if cur:
        out.append(decode(cur))
    return out


def test_single_turn_template_and_mask():
    ids, mask = render_conversation(
        GPT2, [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好!"}]
    )
    assert decode(ids) == "问:你好\n答:你好!<|endoftext|>"
    assert spans(ids, mask) == ["你好!<|endoftext|>"]
    assert ids[-1] == EOT and mask[-1] == 1


def test_prompt_is_prefix_of_training_sample():
    conv = [{"role": "user", "content": "床前明月光的下一句?"}, {"role": "assistant", "content": "疑是地上霜"}]
    ids, mask = render_conversation(GPT2, conv)
    prompt = render_prompt(GPT2, [], conv[0]["content"])
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)]) and all(mask[len(prompt) :])
