import json

import numpy as np
import pytest
import torch

import train
from conftest import TINY, load_script, make_sft_data, read_log, run_script
from data import sft_formats
from data_utils import SFTData, UserError
from miniglm.chat_template import render_conversation
from miniglm.checkpoint import load_checkpoint
from miniglm.tokenizer import EOT, GPT2
from model import GPT, GPTConfig
from test_tokenizer import spans

decode = GPT2.decode

prepare_sft = load_script("data/prepare_sft.py")


def test_multi_turn_session_trains_every_answer():
    ids, mask = render_conversation(GPT2, [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}])
    assert decode(ids) == "问:q1\n答:a1<|endoftext|>问:q2\n答:a2<|endoftext|>"
    assert spans(ids, mask) == ["a1<|endoftext|>", "a2<|endoftext|>"]


def test_system_tools_observation_and_loss_flags():
    tools = [{"name": "天气", "parameters": {"city": "string"}}]
    ids, mask = render_conversation(GPT2, [
        {"role": "system", "content": "你是助手"},
        {"role": "user", "content": "北京天气?"},
        {"role": "assistant", "tool": "天气", "content": '{"city": "北京"}'},
        {"role": "observation", "content": '{"temp": 25}'},
        {"role": "assistant", "content": "25度", "loss": False},
        {"role": "user", "content": "谢谢", "loss": True},
        {"role": "assistant", "content": "不客气"}], tools=tools)
    text = decode(ids)
    assert text.startswith('系统:你是助手\n工具:[{"name": "天气", "parameters": {"city": "string"}}]\n问:北京天气?\n')
    assert '答:调用:天气\n{"city": "北京"}<|endoftext|>结果:{"temp": 25}\n答:25度<|endoftext|>' in text
    assert spans(ids, mask) == ['调用:天气\n{"city": "北京"}<|endoftext|>', "谢谢", "不客气<|endoftext|>"]


CANONICAL = {
    "messages": [{"role": "user", "content": "《静夜思》的作者是谁?"}, {"role": "assistant", "content": "李白。"}],
    "tools": None,
}


@pytest.mark.parametrize(
    "record",
    [
        {"question": "《静夜思》的作者是谁?", "answer": "李白。"},
        {"instruction": "《静夜思》的作者是谁?", "input": "", "output": "李白。"},
        {
            "conversations": [
                {"role": "user", "content": "《静夜思》的作者是谁?"},
                {"role": "assistant", "content": "李白。"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "《静夜思》的作者是谁?"},
                {"role": "assistant", "content": "李白。"},
            ]
        },
        {"conversations": [{"from": "human", "value": "《静夜思》的作者是谁?"}, {"from": "gpt", "value": "李白。"}]},
    ],
)
def test_every_format_parses_to_the_same_conversation(record):
    assert sft_formats.to_conversation(record) == CANONICAL


def test_text_blocks_parse_to_the_same_conversation():
    [(line, conv)] = sft_formats.parse_text_blocks("问:《静夜思》的作者是谁?\n答:李白。\n")
    assert line == 1 and conv == CANONICAL
    [(_, poem)] = sft_formats.parse_text_blocks("问:请背诵《静夜思》\n答:床前明月光，\n疑是地上霜。")
    assert poem["messages"][1]["content"] == "床前明月光，\n疑是地上霜。"


def test_sharegpt_system_and_tool_roles():
    conv = sft_formats.to_conversation(
        {
            "system": "S",
            "tools": '[{"name": "f"}]',
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "function_call", "value": '{"name": "f", "arguments": "{}"}'},
                {"from": "observation", "value": "r"},
                {"from": "gpt", "value": "a"},
            ],
        }
    )
    assert [m["role"] for m in conv["messages"]] == ["system", "user", "assistant", "observation", "assistant"]
    assert conv["messages"][2]["tool"] == "f" and conv["tools"] == [{"name": "f"}]


def glm_render(record):
    conv = sft_formats.to_conversation(record)
    ids, mask = render_conversation(GPT2, conv["messages"], conv["tools"])
    return decode(ids), spans(ids, mask)


def test_chatglm3_tool_turn_is_a_trained_call_and_a_masked_observation():
    turns = [
        {"role": "system", "content": "你是助手"},
        {"role": "user", "content": "北京天气?"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": {"temp": 25}},
        {"role": "assistant", "content": "25度"},
    ]
    text, trained = glm_render({"tools": [{"name": "get_weather"}], "conversations": turns})
    assert text == (
        '系统:你是助手\n工具:[{"name": "get_weather"}]\n问:北京天气?\n'
        '答:调用:get_weather\n{"city": "北京"}<|endoftext|>结果:{"temp": 25}\n答:25度<|endoftext|>'
    )
    assert trained == ['调用:get_weather\n{"city": "北京"}<|endoftext|>', "25度<|endoftext|>"]
    # the turn's loss flag holds for both halves: the call and the observation
    _, trained = glm_render({"conversations": turns[:2] + [dict(turns[2], loss=False)] + turns[3:]})
    assert trained == ["25度<|endoftext|>"]
    _, trained = glm_render({"conversations": turns[:2] + [dict(turns[2], loss=True)] + turns[3:]})
    assert trained == ['调用:get_weather\n{"city": "北京"}<|endoftext|>', '{"temp": 25}', "25度<|endoftext|>"]
    with pytest.raises(sft_formats.BadRecord, match="tool turn needs the tool's 'name'"):
        sft_formats.to_conversation({"conversations": [turns[1], {"role": "tool", "parameters": {}}, turns[3]]})


@pytest.mark.parametrize(
    "turns, problem",
    [
        ([{"role": "system", "content": "A"}, {"role": "system", "content": "B"}], "2 system messages"),
        (
            [
                {"role": "user", "content": "q0"},
                {"role": "assistant", "content": "a0"},
                {"role": "system", "content": "S"},
            ],
            "system message comes after a user turn",
        ),
    ],
)
def test_one_system_message_before_the_first_user_turn(turns, problem):
    record = {"conversations": turns + [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(sft_formats.BadRecord, match=problem):
        sft_formats.to_conversation(record)


def test_glm4_system_tools_render_like_top_level_tools_and_unused_keys_are_reported(tmp_path):
    tools = [{"name": "get_weather", "parameters": {"city": "string"}}]
    qa = [{"role": "user", "content": "北京天气?"}, {"role": "assistant", "content": "晴"}]
    on_system = {"messages": [{"role": "system", "content": "你是助手", "tools": tools}] + qa}
    top_level = {"messages": [{"role": "system", "content": "你是助手"}] + qa, "tools": tools}
    assert glm_render(on_system) == glm_render(top_level) and "get_weather" in glm_render(on_system)[0]
    f = tmp_path / "glm4.jsonl"
    odd = {
        "messages": [
            {"role": "user", "content": "q", "lang": "zh"},
            {"role": "assistant", "content": "a", "lang": "zh", "score": 5},
        ]
    }
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [on_system, odd, odd]) + "\n", encoding="utf-8")
    out = run_script("data/prepare_sft.py", "--input", f, "--out_dir", tmp_path / "o").stdout
    assert f"ignored message key 'lang' in 4 message(s), first at {f}:2" in out
    assert f"ignored message key 'score' in 2 message(s), first at {f}:2" in out
    assert "'tools'" not in out
    assert json.loads((tmp_path / "o" / "meta.json").read_text())["ignored_message_keys"] == {"lang": 4, "score": 2}


def test_malformed_records_report_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(
        "\n".join(
            [
                json.dumps({"question": "q", "answer": "a"}),
                "{broken",
                json.dumps({"question": "q"}),
                json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
                json.dumps({"question": "q", "answer": " "}),
                json.dumps({"question": "q2", "answer": "a2"}),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    convs, bad = sft_formats.read_records(f, "auto", strict=False)
    assert len(convs) == 2
    assert [b.split(": ", 1)[0] for b in bad] == [f"{f}:2", f"{f}:3", f"{f}:4", f"{f}:5"]
    assert "unknown role 'wizard'" in bad[2] and "empty answer" in bad[3]
    with pytest.raises(UserError, match=f"{f}:2: bad JSON"):
        sft_formats.read_records(f, "auto", strict=True)
    proc = run_script("data/prepare_sft.py", "--input", f, "--strict", "--out_dir", tmp_path / "o", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {f}:2: bad JSON") and "Traceback" not in proc.stderr


def fitted(conv, block_size, **kw):
    stats = dict.fromkeys(prepare_sft.CUTS, 0)
    ids, mask, _ = prepare_sft.tokenize(GPT2, conv, block_size, stats, **kw)
    assert len(ids) <= block_size
    return decode(ids), spans(ids, mask), {k: v for k, v in stats.items() if v}


def qa(*turns):
    return {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]}


def test_truncation_keeps_the_answer():
    # a long question is cut from the left; the answer stays whole, end token and all
    text, trained, cuts = fitted(qa("长" * 40 + "的问题?", "答案是这个。"), 32)
    assert trained == ["答案是这个。<|endoftext|>"] and text.startswith("问:长") and "的问题?\n答:" in text
    assert "\ufffd" not in text and cuts == {"truncated": 1, "cut_question_left": 1}
    # a long answer is cut from the right, on a character boundary; its end token is not trained
    text, trained, cuts = fitted(qa("问题?", "很长的答案" * 20), 32)
    assert text.startswith("问:问题?\n答:很长的答案") and text.endswith("<|endoftext|>") and "\ufffd" not in text
    assert trained[0].startswith("很长的答案") and "<|endoftext|>" not in trained[0]
    assert cuts == {"truncated": 1, "cut_answer_right": 1}
    # both long: the question gives way only down to half the row, then the answer is cut
    text, trained, cuts = fitted(qa("长" * 60, "很长的答案" * 30), 64)
    assert 20 <= len(GPT2.encode(text.split("\n答:")[0])) <= 34 and len(GPT2.encode(trained[0])) >= 28
    assert cuts == {"truncated": 1, "cut_question_left": 1, "cut_answer_right": 1}


def test_truncation_drops_the_oldest_turns_first():
    conv = qa("第一个问题" * 3, "第一个回答" * 3, "第二个问题", "第二个回答", "第三个问题", "第三个回答")
    last_two = len(render_conversation(GPT2, conv["messages"][2:])[0])
    text, trained, cuts = fitted(conv, last_two + 5)
    assert text == "问:第二个问题\n答:第二个回答<|endoftext|>问:第三个问题\n答:第三个回答<|endoftext|>"
    assert trained == ["第二个回答<|endoftext|>", "第三个回答<|endoftext|>"]
    assert cuts == {"truncated": 1, "cut_oldest_turns": 1, "dropped_turns": 1}
    system = {"messages": [{"role": "system", "content": "你是诗人"}] + conv["messages"]}
    text, _, cuts = fitted(system, last_two)
    assert text.startswith("系统:你是诗人\n问:第三个问题") and cuts["dropped_turns"] == 2


@pytest.mark.slow
def test_max_answer_tokens_cuts_every_answer(tmp_path):
    text, trained, cuts = fitted(qa("问题?", "床前明月光，疑是地上霜。"), 256, max_answer_tokens=8)
    assert len(GPT2.encode(trained[0])) <= 8 and "床前明月光".startswith(trained[0][:2]) and "\ufffd" not in text
    assert cuts == {"truncated": 1, "cut_answer_max_tokens": 1}
    # end to end: the counts land in meta.json, no sample is lost to a long question
    f = tmp_path / "qa.jsonl"
    rows = [
        {"question": "短问题", "answer": "短答案"},
        {"question": "长" * 40, "answer": "答"},
        {"question": "问", "answer": "很长的答案" * 20},
        {"question": "再问", "answer": "再答"},
    ]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = run_script(
        "data/prepare_sft.py", "--input", f, "--out_dir", tmp_path / "o", "--block_size", "32", "--val_fraction", "0.25"
    ).stdout
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["truncated"] == 2 and meta["cut_question_left"] == 1 and meta["cut_answer_right"] == 1
    assert meta["skipped_no_trained_token"] == 0 and meta["train_samples"] + meta["val_samples"] == 4
    assert "question from the left 1; answer from the right 1" in out
    run_script("data/prepare_sft.py", "--input", f, "--out_dir", tmp_path / "m", "--max_answer_tokens", "3")
    assert json.loads((tmp_path / "m" / "meta.json").read_text())["cut_answer_max_tokens"] >= 2


def test_packing_is_best_fit_decreasing_and_keeps_every_sample_whole():
    samples = [([n] * n, [0] * (n // 2) + [1] * (n - n // 2)) for n in (10, 60, 30, 50, 20, 40)]
    ids, mask, seg = prepare_sft.to_rows(samples, 70, pack=True, pad_id=0)
    assert ids.shape == (3, 70) and (seg > 0).all()  # 210 tokens in 3 full rows (in order: 4 rows)
    found = sorted(
        (ids[r][seg[r] == s].tolist(), mask[r][seg[r] == s].tolist()) for r in range(3) for s in set(seg[r].tolist())
    )
    assert found == sorted(samples)
    ids, mask, seg = prepare_sft.to_rows(samples, 70, pack=False, pad_id=0)
    assert ids.shape == (6, 70) and seg is None


def test_sft_batch_alignment_and_show(sft_dir):
    data = SFTData(sft_dir, block_size=64, tok=GPT2)
    b = data.get_batch("train", 8, torch.Generator().manual_seed(0))
    ids = np.fromfile(sft_dir / "sft_train.bin", dtype=np.uint16).reshape(-1, 65)
    mask = np.fromfile(sft_dir / "sft_train_mask.bin", dtype=np.uint8).reshape(-1, 65)
    row = int(data.sample_rows("train", 8, torch.Generator().manual_seed(0))[0])
    assert b["x"][0].tolist() == ids[row, :-1].tolist() and b["y"][0].tolist() == ids[row, 1:].tolist()
    assert b["loss_mask"][0].tolist() == mask[row, 1:].tolist()
    # a trained target is an answer token or the end token, never template or padding
    trained_targets = b["y"][b["loss_mask"].bool()]
    assert (trained_targets != EOT).any() and decode(trained_targets.tolist()).count("问:") == 0
    meta = json.loads((sft_dir / "meta.json").read_text())
    assert meta["train_samples"] > 2000 and meta["val_samples"] > 200


def test_show_prints_each_token_and_its_target(tmp_path, corpus_docs):
    out = make_sft_data(corpus_docs, tmp_path, "--show", "6", "--block_size", "128").stdout
    samples = ["--- sample" + s for s in out[out.index("--- sample 0") :].split("--- sample")[1:]]
    tables = [[line for line in s.splitlines()[2:] if line.count("|") == 3] for s in samples]
    targets = [[line.rsplit("|", 1)[1].strip() for line in t] for t in tables]
    # a sample whose answer fits the row: masked question, then the trained end token (a cut
    # answer does not train its end token)
    whole = [t for t in targets if "50256" in t]
    assert whole and all("-100" in t and t.index("50256") > t.index("-100") for t in whole)
    # readable for Chinese: the text with its trained span marked, whole characters in the table
    assert samples[0].startswith("--- sample 0: 问:") and "\n答:⟦" in out and out.count("<|endoftext|>⟧") >= 1
    texts = [line.split("|")[2].strip() for t in tables for line in t]
    assert "'问'" in texts and "·" in texts and "b'\\x" not in out


def test_default_set_splits_by_poem(sft_dir):
    val = [json.loads(line) for line in (sft_dir / "sft_val.jsonl").read_text().splitlines()]
    trn = [json.loads(line) for line in (sft_dir / "sft_train.jsonl").read_text().splitlines()]

    def poems(convs):  # (title question, poem text) of the recitation questions
        return {
            (c["messages"][0]["content"], c["messages"][1]["content"])
            for c in convs
            if c["messages"][0]["content"].startswith("请背诵《")
        }

    assert poems(val) and poems(trn) and not (poems(val) & poems(trn))


@pytest.mark.slow
def test_packing_changes_efficiency_not_the_loss(tmp_path, corpus_docs):
    """The summed answer loss over all samples is the same packed or padded."""
    for mode in ("pad", "pack"):
        run_script(
            "data/prepare_sft.py",
            "--poems",
            corpus_docs,
            "--max_poems",
            "400",
            "--out_dir",
            tmp_path / mode,
            "--block_size",
            "128",
            *(["--pack"] if mode == "pack" else []),
        )
    pad_meta = json.loads((tmp_path / "pad" / "meta.json").read_text())
    pack_meta = json.loads((tmp_path / "pack" / "meta.json").read_text())
    assert pack_meta["val_rows"] < pad_meta["val_rows"] and pack_meta["val_mask_share"] > pad_meta["val_mask_share"]
    assert pack_meta["val_trained_tokens"] == pad_meta["val_trained_tokens"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128)).eval()
    totals = {}
    for mode in ("pad", "pack"):
        data = SFTData(tmp_path / mode, block_size=128, tok=GPT2)
        loss_sum, count = 0.0, 0
        for rows in torch.arange(data.num_rows("val")).split(16):  # full logits of all rows would be GBs
            b = data.load("val", rows, "cpu")
            with torch.no_grad():
                logits, _ = model(b["x"], segment_ids=b.get("segment_ids"))
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), b["y"], reduction="none")
            loss_sum += (losses * b["loss_mask"]).sum().item()
            count += int(b["loss_mask"].sum())
        totals[mode] = (loss_sum, count)
    assert totals["pad"][1] == totals["pack"][1]
    assert abs(totals["pad"][0] - totals["pack"][0]) < 1e-3 * totals["pad"][0]


@pytest.mark.slow
def test_tiny_sft_lowers_answer_val_loss(tmp_path, sft_dir):
    train.main(
        [
            *TINY,
            "--block_size=64",
            f"--data_dir={sft_dir}",
            f"--out_dir={tmp_path}",
            "--max_iters=60",
            "--eval_interval=30",
            "--batch_size=8",
        ]
    )
    evals = read_log(tmp_path, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 3.0
    assert load_checkpoint(tmp_path / "ckpt.pt")["kind"] == "sft"


def test_poem_questions_handle_short_poems():
    import random

    for lines in (["。"], ["一句"], ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]):
        convs = prepare_sft.poem_conversations({"title": "题", "author": "某", "lines": lines}, random.Random(0))
        assert convs[0]["messages"][1]["content"] == "\n".join(lines)
    nexts = [c for c in convs if "下一句" in c["messages"][0]["content"]]
    assert len(nexts) == 3 and all(c["messages"][1]["content"].count("”的下一句是“") == 1 for c in nexts)


def test_every_next_line_is_drilled_in_training_only():
    import random

    poem = {
        "title": "题",
        "author": "某",
        "lines": [
            "一二三四五，六七八九十。",
            "甲乙丙丁戊，己庚辛壬癸。",
            "子丑寅卯辰，巳午未申酉。",
            "春夏秋冬月，东南西北风。",
        ],
    }
    few = prepare_sft.poem_conversations(poem, random.Random(3), all_next_lines=False)
    every = prepare_sft.poem_conversations(poem, random.Random(3))
    asked = lambda convs: [c["messages"][0]["content"] for c in convs if "下一句" in c["messages"][0]["content"]]  # noqa: E731
    assert len(asked(few)) == 3 and sorted(asked(every)) == sorted(
        f"“{h}”的下一句是什么?" for h in prepare_sft.half_lines(poem["lines"])[:-1]
    )
    assert [c for c in every if not c.get("train_only")] == few  # the same questions, and the rng used alike
    assert all("下一句" in c["messages"][0]["content"] for c in every if c.get("train_only"))


@pytest.mark.slow
def test_the_drill_leaves_the_held_out_questions_alone(tmp_path, corpus_docs):
    make_sft_data(corpus_docs, tmp_path / "drilled")  # the default
    make_sft_data(corpus_docs, tmp_path / "plain", "--no-all_next_lines")
    drilled, plain = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("drilled", "plain"))
    assert drilled["train_samples"] > 1.3 * plain["train_samples"]
    for name in ("sft_val.jsonl", "sft_val.bin", "sft_val_mask.bin"):
        assert (tmp_path / "drilled" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


@pytest.mark.slow
def test_strict_stops_at_the_first_bad_record_in_file_order(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"question": "一", "answer": "二"}\n{"question": "没有答案"}\nnot json\n', encoding="utf-8")
    proc = run_script("data/prepare_sft.py", "--input", f, "--out_dir", tmp_path / "o", "--strict", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {f}:2: ")
    t = tmp_path / "d.txt"
    t.write_bytes(
        "问:一\n答:二\n\n没有标记\n\n问:三\n答:\xff四\n".encode("utf-8").replace("\xff".encode("utf-8"), b"\xff")
    )
    proc = run_script("data/prepare_sft.py", "--input", t, "--out_dir", tmp_path / "o", "--strict", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {t}:4: ")


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_bytes_that_are_not_utf8_are_reported_with_line_and_column(tmp_path, suffix):
    rows = (
        [
            '{"question": "一", "answer": "二"}',
            '{"question": "坏", "answer": "X"}',
            '{"question": "三", "answer": "四"}',
        ]
        if suffix == ".jsonl"
        else ["问:一\n答:二", "问:坏\n答:X", "问:三\n答:四"]
    )
    data = ("\r\n\r\n" if suffix == ".txt" else "\r\n").join(rows).encode("utf-8").replace(b"X", b"\xe4\xb8")
    f = tmp_path / f"d{suffix}"
    f.write_bytes(b"\xef\xbb\xbf" + data + b"\r\n")  # a BOM and CRLF line ends are fine
    line = 2 if suffix == ".jsonl" else 5
    column = len('{"question": "坏", "answer": "') + 1 if suffix == ".jsonl" else 3
    proc = run_script("data/prepare_sft.py", "--input", f, "--out_dir", tmp_path / "o", "--val_fraction", "0.5")
    assert "Traceback" not in proc.stderr and "skipped 1 malformed record(s)" in proc.stdout
    assert f"{f}:{line}: not UTF-8 (byte 0xe4 at column {column})" in proc.stdout
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["train_samples"] + meta["val_samples"] == 2
    strict = run_script("data/prepare_sft.py", "--input", f, "--out_dir", tmp_path / "o", "--strict", check=False)
    assert (
        strict.returncode == 1
        and strict.stderr.strip() == f"error: {f}:{line}: not UTF-8 (byte 0xe4 at column {column})"
    )
    # fetch_data's local documents behave the same (.txt as is; .jsonl as {"text": ...} lines)
    if suffix == ".jsonl":
        f = tmp_path / "docs.jsonl"
        f.write_bytes(b'{"text": "one"}\n{"text": "t\xe4\xb8"}\n')
        line, column = 2, len('{"text": "t') + 1
    local = run_script(
        "data/fetch_data.py", "local", "--input", f, "--out_dir", tmp_path / "l", "--strict", check=False
    )
    assert (
        local.returncode == 1 and local.stderr.strip() == f"error: {f}:{line}: not UTF-8 (byte 0xe4 at column {column})"
    )
    loose = run_script("data/fetch_data.py", "local", "--input", f, "--out_dir", tmp_path / "l")
    assert "skipped 1 malformed record(s)" in loose.stdout and "not UTF-8" in loose.stdout
