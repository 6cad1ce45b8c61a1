"""Clean Chinese from a small model: the trimmed vocabulary, decoding that only writes
real characters, bits per character, the run report, simplified chinese-poetry."""
import json
import math

import numpy as np
import pytest
import torch

import train
from conftest import SHARED_POETRY, TINY, read_log, run_script
from data_utils import UserError
from miniglm.chat_template import render_prompt
from miniglm.checkpoint import load_checkpoint, load_model
from miniglm.constraint import make_constraint
from miniglm.generation import answer, answer_batch, generate, model_constraint, stream_text
from miniglm.tokenizer import EOT, GPT2, GPT2Tokenizer, load_vocab_file, trimmed_vocabulary
from model import GPT, GPTConfig


@pytest.fixture(scope="module")
def trimmed(pretrain_dir):
    return load_vocab_file(pretrain_dir / "vocab.json")


# ------------------------------------------------------------------ the trimmed vocabulary
def test_trimmed_vocabulary_is_the_corpus_ids_plus_bytes_eot_and_template(pretrain_dir, trimmed):
    tok, chars = trimmed
    ids = np.concatenate([np.fromfile(pretrain_dir / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    used = set(np.unique(ids).tolist())
    assert used <= set(tok.gpt2_ids.tolist())
    extra = set(tok.gpt2_ids.tolist()) - used
    template = {i for piece in ("问:", "答:", "系统:", "结果:", "工具:", "调用:", "\n", "system\n", "user\n",
                                "assistant\n", "tool\n") for i in GPT2.encode(piece)}
    assert extra <= set(range(256)) | template  # GPT-2's first 256 ids are its byte tokens
    assert tok.vocab_size % 64 == 0 and tok.n_tokens + 2 <= tok.vocab_size < tok.n_tokens + 2 + 64  # + ChatML slots
    # classical Chinese in GPT-2's BPE: mostly byte tokens, a few hundred distinct ids
    assert 300 < tok.n_tokens < 8000 and tok.vocab_size < GPT2.vocab_size / 5
    assert tok.gpt2_ids[tok.eot] == EOT
    assert "床" in chars and "明" in chars and len(chars) == len(set(chars))


@pytest.mark.parametrize(
    "text",
    [
        "床前明月光，疑是地上霜。",
        "龘靐齉 absent characters",
        "English words, numbers 12345",
        "emoji 🙂🐉👩‍👩‍👧 and ñ ü ß",
        "<|endoftext|> is only text",
        "\t  spaces \n\n",
    ],
)
def test_any_text_round_trips_through_a_trimmed_vocabulary(trimmed, text):
    tok, _ = trimmed
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.n_tokens for i in ids) and tok.eot not in ids
    # tokens the vocabulary keeps are the same tokens; the others became their bytes
    assert len(ids) >= len(GPT2.encode(text))


def test_tiny_vocabulary_writes_unknown_tokens_as_bytes():
    tok = trimmed_vocabulary(GPT2.encode("床前明月光"))
    assert tok.encode("床前明月光") == tok.from_gpt2(GPT2.encode("床前明月光")).tolist()
    hello = tok.encode("hello")  # not in the vocabulary: five byte tokens
    assert len(hello) == 5 and tok.decode(hello) == "hello"
    assert GPT2Tokenizer(tok.state()) == tok and GPT2Tokenizer(tok.state()).name == tok.name


def test_trimmed_checkpoint_keeps_its_mapping_through_sft(tiny_runs, trimmed):
    pre, sft = tiny_runs
    tok, chars = trimmed
    a, b = load_checkpoint(pre / "best.pt"), load_checkpoint(sft / "best.pt")
    assert a["vocab"] == b["vocab"] == tok.state()
    assert a["model_args"]["vocab_size"] == b["model_args"]["vocab_size"] == tok.vocab_size
    assert set(a["chars"]) == set(chars) and set(b["chars"]) >= set(a["chars"])
    _, sft_tok, _ = load_model(sft)
    assert sft_tok == tok


@pytest.mark.slow
def test_sft_data_for_another_vocabulary_is_a_clear_error(tiny_runs, sft_dir, tmp_path):
    pre, _ = tiny_runs
    with pytest.raises(UserError, match="tokenized for the vocabulary gpt2 but the model uses gpt2-trimmed"):
        train.main(
            [*TINY, f"--data_dir={sft_dir}", f"--out_dir={tmp_path}", f"--init_from={pre / 'best.pt'}", "--max_iters=1"]
        )
    proc = run_script(
        "train.py",
        *TINY,
        f"--data_dir={sft_dir}",
        f"--out_dir={tmp_path}",
        f"--init_from={pre / 'best.pt'}",
        "--max_iters=1",
        check=False,
    )
    assert proc.returncode == 1 and "prepare_sft.py --vocab" in proc.stderr and "Traceback" not in proc.stderr


def test_trimmed_pretrain_learns_and_logs_bits_per_character(tmp_path, pretrain_dir):
    train.main(
        [
            *TINY,
            "--vocab=trimmed",
            f"--data_dir={pretrain_dir}",
            f"--out_dir={tmp_path}",
            "--max_iters=30",
            "--eval_interval=15",
        ]
    )
    evals = read_log(tmp_path, "eval")
    meta = json.loads((pretrain_dir / "meta.json").read_text())
    for e in evals:
        assert math.isclose(e["val_bpc"], e["val_loss"] * meta["val_tokens"] / meta["val_chars"] / math.log(2))
    assert evals[-1]["val_bpc"] < evals[0]["val_bpc"] - 3
    assert load_checkpoint(tmp_path / "best.pt")["model_args"]["vocab_size"] < 8000


# ------------------------------------------------------------------ decoding that writes real characters
def random_model(tok, block_size=64):
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=tok.vocab_size)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("vocab", ["trimmed", "full"])
def test_random_model_at_high_temperature_writes_only_allowed_characters(trimmed, vocab):
    tok, chars = trimmed if vocab == "trimmed" else (GPT2, trimmed[1])
    model = random_model(tok)
    constraint = make_constraint(tok, "chars", chars)
    prompt = tok.encode("问:你好\n答:")
    g = torch.Generator().manual_seed(3)
    new = generate(model, torch.tensor([prompt]), 2000, temperature=1.5, generator=g, constraint=constraint)[
        0, len(prompt) :
    ]
    text = tok.decode_bytes(t for t in new.tolist() if t not in tok.stop_ids)  # an end token comes between characters
    state = b""
    for t in new.tolist():
        state = constraint.step(state, t)
        assert state is not None
    whole = text[: len(text) - len(state)]
    decoded = whole.decode("utf-8")  # strict: raises on invalid UTF-8
    assert len(decoded) > 300 and set(decoded) <= set(chars)
    # unconstrained, the same model writes broken bytes: the test can fail
    raw = generate(model, torch.tensor([prompt]), 300, temperature=1.5, generator=torch.Generator().manual_seed(3))
    assert "\ufffd" in tok.decode(raw[0, len(prompt) :].tolist())
    # and the streamed text has no U+FFFD either, even when max_new_tokens cuts a character
    for n in (1, 2, 3, 7, 50):
        streamed = "".join(
            stream_text(model, tok, prompt, max_new_tokens=n, temperature=1.5, seed=n, constraint=constraint)
        )
        assert "\ufffd" not in streamed and set(streamed) <= set(chars) | set("<|endoftext|>")


def test_utf8_mode_allows_any_valid_character():
    tok = GPT2
    model = random_model(tok)
    constraint = make_constraint(tok, "utf8")
    prompt = tok.encode("hello")
    text = "".join(stream_text(model, tok, prompt, max_new_tokens=400, temperature=1.5, seed=1, constraint=constraint))
    assert text and "\ufffd" not in text
    assert make_constraint(tok, "off") is None
    with pytest.raises(ValueError, match="constraint must be one of"):
        make_constraint(tok, "maybe")


def test_constrained_greedy_equals_unconstrained_where_that_was_valid(tiny_runs):
    """At every step where the model's own greedy choice is allowed, the constrained decoder
    takes it; a text that was valid all along is therefore unchanged."""
    model, tok, ckpt = load_model(tiny_runs[1])
    checked = 0
    for question in ("《静夜思》的作者是谁?", "请背诵《春晓》。", "你好"):
        constraint = model_constraint(tok, ckpt).with_chars(question)
        prompt = render_prompt(tok, [], question)
        out = generate(model, torch.tensor([prompt]), 45, temperature=0, constraint=constraint)[0].tolist()
        state = b""
        for pos in range(len(prompt), len(out)):
            with torch.no_grad():
                logits, _ = model(
                    torch.tensor([out[max(0, pos - model.config.block_size) : pos]]), last_logits_only=True
                )
            free = int(logits[0, -1].argmax())
            if constraint.step(state, free) is not None:
                assert out[pos] == free
                checked += 1
            else:
                assert out[pos] != free
            state = constraint.step(state, out[pos])
            assert state is not None
    assert checked >= 30
    # a text that is valid unconstrained comes out the same (the model's favourite answers)
    constraint = model_constraint(tok, ckpt)
    for question in ("你好", "《静夜思》的作者是谁?"):
        prompt = render_prompt(tok, [], question)
        free = generate(model, torch.tensor([prompt]), 12, temperature=0)[0].tolist()
        state = b""
        for t in free[len(prompt) :]:
            state = state if state is None else constraint.with_chars(question).step(state, t)
        if state == b"":
            kept = generate(
                model, torch.tensor([prompt]), 12, temperature=0, constraint=constraint.with_chars(question)
            )
            assert kept[0].tolist() == free


def test_kv_cache_equals_recompute_with_the_constraint(trimmed):
    tok, chars = trimmed
    model = random_model(tok, block_size=48)
    constraint = make_constraint(tok, "chars", chars)
    idx = torch.tensor([tok.encode("问:床前明月光\n答:")] * 2)
    out = [
        generate(
            model,
            idx,
            80,
            temperature=1.2,
            top_k=200,
            use_cache=cache,
            constraint=constraint,
            generator=torch.Generator().manual_seed(5),
        )
        for cache in (True, False)
    ]
    assert torch.equal(out[0], out[1])  # 80 new tokens run past block_size 48: cropping too
    # left-padded rows (batched generation): the cache path still equals recomputation
    short, long = tok.encode("问:你\n答:"), tok.encode("问:床前明月\n答:")
    padded = torch.tensor([[tok.eot] * (len(long) - len(short)) + short, long])
    pad = torch.tensor([len(long) - len(short), 0])
    out = [
        generate(
            model,
            padded,
            30,
            temperature=1.2,
            use_cache=cache,
            constraint=constraint,
            pad=pad,
            generator=torch.Generator().manual_seed(5),
        )
        for cache in (True, False)
    ]
    assert torch.equal(out[0], out[1])


def test_answers_never_end_inside_a_character(tiny_runs):
    _, sft = tiny_runs
    model, tok, ckpt = load_model(sft)
    constraint = model_constraint(tok, ckpt)
    for n in range(1, 12):
        text = "".join(
            answer(
                model, tok, [], "请背诵《静夜思》。", constraint=constraint, max_new_tokens=n, temperature=1.0, seed=n
            )
        )
        assert "\ufffd" not in text


@pytest.mark.slow
def test_sample_cli_constraint_flag(tiny_runs):
    pre, _ = tiny_runs
    on = run_script("sample.py", f"--out_dir={pre}", "--start=《静夜思》", "--max_new_tokens=60", "--temperature=1.5")
    assert "\ufffd" not in on.stdout
    off = run_script(
        "sample.py",
        f"--out_dir={pre}",
        "--start=《静夜思》",
        "--max_new_tokens=60",
        "--temperature=1.5",
        "--constrain=off",
    )
    assert off.stdout != on.stdout


# ------------------------------------------------------------------ bits per character, report, demo
@pytest.mark.slow
def test_eval_reports_bits_per_character_and_writes_the_report(tiny_runs, pretrain_dir, tiny_sft_data, tmp_path):
    pre, sft = tiny_runs
    run_script(
        "evaluations.py",
        f"--out_dir={sft}",
        f"--compare={pre}",
        f"--pretrain_data={pretrain_dir}",
        f"--sft_data={tiny_sft_data}",
        "--questions=4",
        "--max_new_tokens=12",
        "--max_batches=100",
        f"--json={tmp_path / 'e.json'}",
        f"--report={tmp_path / 'report.md'}",
    )
    res = json.loads((tmp_path / "e.json").read_text())
    meta = json.loads((pretrain_dir / "meta.json").read_text())
    val = np.fromfile(pretrain_dir / "val.bin", dtype=np.uint16)
    chars = sum(len(t) for t in GPT2.decode(val).split("<|endoftext|>"))
    assert chars == meta["val_chars"]
    for run in res.values():
        assert math.isclose(run["pretrain_val_bpc"], run["pretrain_val_loss"] * len(val) / chars / math.log(2))
        assert run["answers_with_fffd"] == 0 and all("\ufffd" not in a["answer"] for a in run["answers"])
        assert sum(t["questions"] for t in run["by_type"].values()) == 4
    report = (tmp_path / "report.md").read_text()
    for needle in (
        "## Runs",
        "tokens trained",
        "training wall time",
        "![loss](loss.png)",
        "pretrain_val_bpc",
        "## Sampled answers",
        "n_layer = 2",
        "gpt2-trimmed",
    ):
        assert needle in report
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG") and (tmp_path / "curves.png").exists()


@pytest.mark.slow
def test_eval_takes_the_data_folders_the_checkpoints_were_trained_on(tiny_runs, pretrain_dir, tiny_sft_data, tmp_path):
    """No data flags: the SFT folder from the run's config, the pretraining one from the
    checkpoint it started from (the bug: a run on data/sft-241 was scored against data/sft)."""
    pre, sft = tiny_runs
    proc = run_script(
        "evaluations.py",
        f"--out_dir={sft}",
        "--questions=2",
        "--max_new_tokens=4",
        "--max_batches=2",
        f"--json={tmp_path / 'e.json'}",
        "--report=none",
    )
    assert f"data: pretraining {pretrain_dir}, SFT {tiny_sft_data}" in proc.stdout
    run = json.loads((tmp_path / "e.json").read_text())[str(sft)]
    assert run["pretrain_val_bpc"] is not None and run["sft_answer_loss"] is not None and len(run["answers"]) == 2
    proc = run_script(
        "evaluations.py",
        f"--out_dir={sft}",
        f"--sft_data={tmp_path}",
        "--questions=2",
        "--report=none",
        "--max_new_tokens=4",
        "--max_batches=2",
        f"--json={tmp_path / 'e.json'}",
    )  # a flag still wins
    assert f"SFT {tmp_path}\n" in proc.stdout and "no held-out questions" in proc.stdout


# ------------------------------------------------------------------ chinese-poetry in simplified characters
@pytest.mark.slow
def test_chinese_poetry_is_converted_to_simplified(tmp_path):
    if not SHARED_POETRY.exists():
        pytest.skip("no ../shared/data/chinese-poetry mirror beside the checkout")
    args = ["data/fetch_data.py", "chinese-poetry", "--mirror", SHARED_POETRY, "--collections", "tang"]
    run_script(*args, "--out_dir", tmp_path / "s")
    run_script(*args, "--out_dir", tmp_path / "t", "--keep_traditional")
    simple, trad = ((tmp_path / d / "docs.jsonl").read_text(encoding="utf-8") for d in ("s", "t"))
    assert "函谷壮皇居" in simple and "函谷壯皇居" not in simple
    assert "函谷壯皇居" in trad
    assert json.loads((tmp_path / "s" / "docs.meta.json").read_text())["conversion"].startswith("OpenCC")
    assert json.loads((tmp_path / "t" / "docs.meta.json").read_text())["conversion"] is None
    run_script("data/prepare.py", "--docs", tmp_path / "s" / "docs.jsonl", "--num_threads", "2")
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["fetch"]["conversion"].startswith("OpenCC")


# ------------------------------------------------------------------ batched generation
@pytest.mark.parametrize("mode,decode", [("chars", "eager"), ("off", "eager"), ("chars", "static")])
def test_batched_greedy_answers_equal_one_by_one(tiny_runs, tiny_sft_data, mode, decode):
    from miniglm.metrics import held_out_questions

    model, tok, ckpt = load_model(tiny_runs[1])
    constraint = model_constraint(tok, ckpt, mode)
    questions = [q for q, _ in held_out_questions(tiny_sft_data, 14) if len(tok.encode(q)) < 36][:12] + [
        "你好",
        "龘靐齉是什么?",
    ]
    one = [
        "".join(answer(model, tok, [], q, constraint=constraint, max_new_tokens=20, temperature=0)) for q in questions
    ]
    assert len({len(tok.encode(q)) for q in questions}) > 3  # prompts of many lengths: real left padding
    model.decode_mode = decode  # static: rows stay in a fixed-shape batch, and the answers are the same
    assert answer_batch(model, tok, questions, constraint=constraint, max_new_tokens=20, batch_size=5) == one
