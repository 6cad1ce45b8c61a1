"""The trained vocabulary: a byte-level BPE learned from the data folder's train split
(rustbpe), encoded by tiktoken, carried by data folders and checkpoints."""
import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, load_script, run_script
from data_utils import PretrainData, UserError
from miniglm.checkpoint import load_checkpoint, load_model
from miniglm.generation import answer, model_constraint
from miniglm.tokenizer import GPT2, bpe_file, data_vocabulary, tokenizer_from_state, train_bpe

prepare = load_script("data/prepare.py")


@pytest.fixture(scope="module")
def bpe(pretrain_dir):
    return data_vocabulary(pretrain_dir, "bpe", 8192)


@pytest.mark.parametrize(
    "text",
    [
        "床前明月光，疑是地上霜。",
        "龘靐齉 absent characters",
        "English words, numbers 12345",
        "emoji 🙂🐉👩‍👩‍👧 and ñ ü ß",
        "<|im_start|>user\n<|im_end|><|endoftext|>",
        "\t  spaces \n\n",
    ],
)
def test_any_text_round_trips_and_never_encodes_to_a_special_token(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(0 <= i < bpe.eot for i in ids)  # ordinary tokens only: no <|endoftext|>, <|im_start|>, <|im_end|>


def test_characters_never_seen_fall_back_to_bytes(bpe, pretrain_dir):
    chars = json.loads((pretrain_dir / "vocab.json").read_text(encoding="utf-8"))["chars"]
    unseen = next(c for c in "𪚥齾靐齉🐉" if c not in chars)
    ids = bpe.encode(unseen)
    assert bpe.decode(ids) == unseen and len(ids) > 1  # pieces of its UTF-8 bytes (ranks 0-255 are the bytes)
    assert b"".join(bpe.token_bytes[i] for i in ids) == unseen.encode()
    assert len(bpe.encode("床前明月光")) < len("床前明月光")  # a common line merges into fewer tokens


def test_specials_follow_the_ranks_and_fill_the_vocabulary(bpe):
    assert (bpe.eot, bpe.im_start, bpe.im_end) == (bpe.n_tokens - 1, bpe.n_tokens, bpe.n_tokens + 1)
    assert bpe.vocab_size == 8192 == bpe.n_tokens + 2  # 8,189 ranks + the three special tokens, no padding
    assert bpe.decode([bpe.eot, bpe.im_start, bpe.im_end]) == "<|endoftext|><|im_start|><|im_end|>"
    assert tokenizer_from_state(json.loads(json.dumps(bpe.state()))) == bpe


def test_bpe_spends_fewer_tokens_per_character_than_gpt2(pretrain_dir):
    vocabs = json.loads((pretrain_dir / "meta.json").read_text())["vocabularies"]
    gpt2, bpe = vocabs["gpt2"]["val_tokens_per_char"], vocabs["bpe-8192"]["val_tokens_per_char"]
    assert gpt2 > 1.5 and bpe < gpt2 / 2  # GPT-2: 2-3 byte tokens for most Chinese characters


@pytest.mark.slow
def test_training_is_deterministic_across_processes_and_text_order(corpus_docs):
    texts = [json.loads(line)["text"] for line in corpus_docs.read_text(encoding="utf-8").splitlines()][:800]
    names = {train_bpe(texts, 1024).name, train_bpe(random.Random(0).sample(texts, len(texts)), 1024).name}
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from miniglm.tokenizer import train_bpe; "
        f"texts = [json.loads(l)['text'] for l in open({str(corpus_docs)!r}, encoding='utf-8')][:800]; "
        f"print(train_bpe(texts, 1024).name)"
    )
    for _ in range(2):  # a fresh process: another hash seed
        names.add(
            subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        )
    assert len(names) == 1, names


def test_bpe_is_trained_on_the_train_split_only(tmp_path, corpus_docs):
    """A phrase that only the val documents hold never becomes a token; the stored BPE is
    exactly the one trained on the train documents."""
    docs = [json.loads(line) for line in corpus_docs.read_text(encoding="utf-8").splitlines()][:400]
    _, val_idx = prepare.split_by_document(len(docs), 0.05, 1337)
    planted = "甲乙丙丁戊己庚辛壬癸"
    for i in val_idx:
        docs[i] = {"text": planted * 50}
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8"
    )
    run_script("data/prepare.py", "--docs", tmp_path / "docs.jsonl", "--bpe_vocab_size", "1024", "--num_threads", "2")
    stored = tokenizer_from_state(json.loads(bpe_file(tmp_path, 1024).read_text(encoding="utf-8")))
    train_idx = [i for i in range(len(docs)) if i not in set(val_idx.tolist())]
    assert stored == train_bpe([docs[i]["text"] for i in train_idx], 1024)
    assert stored != train_bpe([d["text"] for d in docs], 1024)
    assert not any(
        t.decode("utf-8", "ignore") and set(t.decode("utf-8", "ignore")) <= set(planted) and len(t) > 3
        for t in stored.token_bytes
    )  # no merge of two planted characters
    val = np.fromfile(tmp_path / "val.bpe-1024.bin", dtype=np.uint16)
    assert stored.decode(val).count(planted) == 50 * len(val_idx)  # the val text itself is all there


def test_a_data_folder_holds_each_vocabularys_files_side_by_side(pretrain_dir, bpe):
    """GPT-2 ids in train.bin, the BPE's in train.bpe-8192.bin: the same documents, each
    decoded by its own vocabulary."""
    gpt2 = GPT2.decode(np.fromfile(pretrain_dir / "val.bin", dtype=np.uint16))
    mine = bpe.decode(np.fromfile(pretrain_dir / "val.bpe-8192.bin", dtype=np.uint16))
    assert gpt2 == mine and mine.count("<|endoftext|>") > 10
    data = PretrainData(pretrain_dir, 64, bpe)
    assert data.files["val"].name == "val.bpe-8192.bin" and int(data.tokens("val").max()) <= bpe.eot


@pytest.mark.slow
def test_a_model_refuses_another_corpus_bpe(tmp_path, pretrain_dir, bpe):
    other = tmp_path / "other"
    other.mkdir()
    docs = [{"text": f"第{i}篇：" + "天地玄黄宇宙洪荒" * (i % 7 + 1)} for i in range(60)]
    (other / "docs.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    run_script("data/prepare.py", "--docs", other / "docs.jsonl", "--num_threads", "2")
    with pytest.raises(UserError, match="was written with the BPE bpe-8192-.* but the model uses bpe-8192-"):
        PretrainData(other, 16, bpe)
    proc = run_script("train.py", f"--data_dir={tmp_path}", "--vocab=bpe", "--vocab_size=4096", check=False)
    assert proc.returncode == 1 and "bpe-4096.json not found" in proc.stderr and "--bpe_vocab_size 4096" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("vocab", ["gpt2", "bpe"])
def test_each_vocabulary_through_sample_and_evaluations(vocab_runs, pretrain_dir, vocab, tmp_path):
    out = vocab_runs[vocab]
    pre, sft = load_checkpoint(out / "pre" / "best.pt"), load_checkpoint(out / "sft" / "best.pt")
    assert pre["vocab"] == sft["vocab"] and pre["config"]["vocab"] == vocab
    tok = load_model(out / "sft")[1]
    assert tok.kind == vocab and sft["tokenizer_sha256"] == tok.sha256
    text = run_script("sample.py", f"--out_dir={out / 'pre'}", "--start=《静夜思》", "--max_new_tokens=12").stdout
    assert text.startswith("《静夜思》") and "\ufffd" not in text
    chat = run_script("sample.py", f"--out_dir={out / 'sft'}", "--chat", "--start=你好", "--max_new_tokens=8").stdout
    assert chat.startswith("答:") and "\ufffd" not in chat
    run_script(
        "evaluations.py",
        f"--out_dir={out / 'sft'}",
        f"--pretrain_data={pretrain_dir}",
        "--max_batches=100",
        f"--sft_data={out / 'sft-data'}",
        "--questions=3",
        "--max_new_tokens=8",
        f"--json={tmp_path / 'e.json'}",
        "--report=none",
    )
    res = json.loads((tmp_path / "e.json").read_text())[str(out / "sft")]
    assert res["vocab"] == tok.name and res["answers_with_fffd"] == 0 and len(res["answers"]) == 3
    meta = json.loads((pretrain_dir / "meta.json").read_text())
    n_val = meta["vocabularies"]["gpt2" if vocab == "gpt2" else "bpe-8192"]["val_tokens"]
    assert math.isclose(res["pretrain_val_bpc"], res["pretrain_val_loss"] * n_val / meta["val_chars"] / math.log(2))
    model, tok, ckpt = load_model(out / "sft")
    for n in range(1, 8):  # whole characters only, whatever a token holds
        assert "\ufffd" not in "".join(
            answer(
                model,
                tok,
                [],
                "请背诵《静夜思》。",
                constraint=model_constraint(tok, ckpt),
                max_new_tokens=n,
                temperature=1.0,
                seed=n,
            )
        )
