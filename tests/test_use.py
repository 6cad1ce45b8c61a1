"""What users touch: sampling, chat, the Gradio page, evaluations, plots, the demo."""
import json
import math
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from conftest import ROOT, free_port, run_script
from miniglm.chat_template import render_prompt
from miniglm.checkpoint import load_model
from miniglm.generation import DEFAULT_DECODING, answer, chat_prompt, generate, model_constraint, stream_text
from miniglm.metrics import char_f1, corpus_bleu, corpus_chrf, distinct_n, exact_match, rouge_l
from miniglm.tokenizer import GPT2
from model import GPT, GPTConfig
from sample_gradio import Models, NotServed, dialogue, generation_settings, message_text


def test_metrics_match_hand_computed_values():
    assert exact_match("李 白", "李白") == 1.0 and exact_match("李白。", "李白") == 0.0
    assert math.isclose(char_f1("李白写的", "李白"), 2 * 0.5 * 1.0 / 1.5)
    assert char_f1("杜甫", "李白") == 0.0
    assert math.isclose(rouge_l("床前明月光", "床前看月光"), 0.8)  # LCS 床前月光 = 4 of 5 and 5
    # sacrebleu, tokenize='zh': every Chinese character is a token, spaces do not matter, 0-100
    assert math.isclose(corpus_bleu(["床前明月光"], ["床前明月霜"]), 100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    assert math.isclose(corpus_bleu(["床前明月"], ["床前明月光疑是地上"]), 100 * math.exp(1 - 9 / 4))  # brevity only
    assert math.isclose(corpus_bleu(["床前明月光"], ["床前 明月光"]), 100) and corpus_bleu(["李白"], ["杜甫"]) == 0.0
    assert corpus_chrf(["床前明月光"], ["床前明月光"]) == 100.0 and corpus_chrf(["李白"], ["杜甫"]) == 0.0
    assert 40 < corpus_chrf(["床前明月光"], ["床前明月霜"]) < 70
    assert math.isclose(distinct_n(["AAB"], 1), 2 / 3) and distinct_n(["AAB"], 2) == 1.0


def test_streaming_equals_non_streaming():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    ids = GPT2.encode("问:床前明月光\n答:")
    streamed = "".join(stream_text(model, GPT2, ids, max_new_tokens=40, temperature=1.0, top_k=100, seed=7))
    g = torch.Generator().manual_seed(7)
    full = generate(model, torch.tensor([ids]), 40, temperature=1.0, top_k=100, generator=g)
    assert streamed == GPT2.decode(full[0, len(ids):].tolist())
    assert "".join(stream_text(model, GPT2, ids, max_new_tokens=40, temperature=1.0, top_k=100, seed=8)) != streamed


def test_chat_history_is_trimmed_from_the_left():
    history = []
    for i in range(6):
        history += [
            {"role": "user", "content": f"第{i}个问题" * 3},
            {"role": "assistant", "content": f"第{i}个回答" * 3},
        ]
    ids, kept = chat_prompt(GPT2, history, "最后的问题", block_size=160, max_new_tokens=32)
    assert len(ids) <= 160 - 32 and 0 < len(kept) < len(history) and len(kept) % 2 == 0
    assert kept == history[-len(kept) :]  # the latest turns survive
    assert ids == render_prompt(GPT2, kept, "最后的问题")
    with pytest.raises(ValueError, match="does not fit"):
        chat_prompt(GPT2, [], "长" * 200, block_size=160, max_new_tokens=32)


@pytest.mark.slow
def test_sample_cli(tiny_runs):
    pre, sft = tiny_runs
    out = run_script("sample.py", f"--out_dir={pre}", "--start=《静夜思》", "--num_samples=2", "--max_new_tokens=10")
    assert out.stdout.count("《静夜思》") == 2 and "-" * 40 in out.stdout
    chat = run_script("sample.py", f"--out_dir={pre}", "--chat", "--start=你好", "--max_new_tokens=10")
    assert "not fine-tuned" in chat.stderr and chat.stdout.startswith("答:")
    prompt = sft / "prompt.txt"
    prompt.write_text("《静夜思》的作者是谁?", encoding="utf-8")
    chat = run_script("sample.py", f"--out_dir={sft}", "--chat", f"--start=FILE:{prompt}", "--max_new_tokens=10")
    # no warning for a fine-tuned model: stderr holds only which weights were opened
    assert chat.stderr.splitlines() == [f"weights: {load_model(sft)[2]['weights']}"] and chat.stdout.startswith("答:")
    greedy = [
        run_script(
            "sample.py",
            f"--out_dir={sft}",
            "--chat",
            "--start=你好",
            "--temperature=0",
            "--max_new_tokens=12",
            f"--decode={mode}",
        ).stdout
        for mode in ("eager", "static")
    ]
    assert greedy[0] == greedy[1] and len(greedy[0]) > 3
    missing = run_script("sample.py", f"--out_dir={sft / 'nope'}", check=False)
    assert missing.returncode == 1 and "checkpoint not found" in missing.stderr and "Traceback" not in missing.stderr


def test_interactive_chat_keeps_history_and_resets(tiny_runs):
    _, sft = tiny_runs
    proc = subprocess.run(
        [sys.executable, "sample.py", f"--out_dir={sft}", "--chat", "--max_new_tokens=8"],
        cwd=ROOT,
        input="你好\n/reset\n再见\n/exit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("答: ") == 2 and "(history cleared)" in proc.stdout


@pytest.mark.slow
def test_evaluations_end_to_end(tiny_runs, pretrain_dir, tiny_sft_data, tmp_path):
    pre, sft = tiny_runs
    out = run_script(
        "evaluations.py",
        f"--out_dir={sft}",
        f"--compare={pre}",
        f"--pretrain_data={pretrain_dir}",
        f"--sft_data={tiny_sft_data}",
        "--questions=3",
        "--max_new_tokens=8",
        "--max_batches=2",
        f"--json={tmp_path / 'e.json'}",
    ).stdout
    assert "sft_answer_loss" in out and "rouge_l" in out and "问:" in out
    res = json.loads((tmp_path / "e.json").read_text())
    a, b = res[str(sft)], res[str(pre)]
    assert a["kind"] == "sft" and b["kind"] == "pretrain" and len(a["answers"]) == 3
    assert a["sft_answer_loss"] < b["sft_answer_loss"]  # fine-tuning lowered the answer loss
    assert math.isclose(a["pretrain_val_ppl"], math.exp(a["pretrain_val_loss"]))
    assert all(0 <= a[k] <= 1 for k in ("exact_match", "char_f1", "rouge_l", "distinct_1", "distinct_2"))
    assert all(0 <= a[k] <= 100 for k in ("bleu", "chrf"))
    # what the models know: the held-out choice questions, the SFT model in its template, the pretrained in plain text
    items = len((tiny_sft_data / "choices_test.jsonl").read_text().splitlines())
    assert a["choices"]["items"] == b["choices"]["items"] == items > 10
    assert (a["choices"]["form"], b["choices"]["form"]) == ("qa", "plain")
    assert "choice questions" in out and "acc_norm" in out
    report = (sft / "report.md").read_text()
    assert "## What the model knows" in report and "## Inside the model" in report
    for i in (1, 2):  # the three views inside each model, beside the report
        assert all((sft / f"inside-{i}-{view}.png").is_file() for view in ("tokens", "attention", "lens"))


@pytest.mark.slow
def test_plots_written_from_real_logs(tiny_runs, tmp_path):
    pre, sft = tiny_runs
    run_script("visualize.py", "--runs", pre, sft, "--out_dir", tmp_path, "--log_y")
    for name in ("loss.png", "curves.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    bad = run_script("visualize.py", "--runs", tmp_path, check=False)
    assert bad.returncode == 1 and "no log.jsonl" in bad.stderr


def post_raw_json(port, api_name, data):
    """Call the page's API as a browser does, with ASCII-escaped JSON, and return the final outputs."""
    url = f"http://127.0.0.1:{port}/gradio_api/call/{api_name}"
    request = urllib.request.Request(url, json.dumps({"data": data}).encode(), {"Content-Type": "application/json"})
    event = json.loads(urllib.request.urlopen(request, timeout=60).read())["event_id"]
    stream = urllib.request.urlopen(f"{url}/{event}", timeout=120).read().decode()
    assert "event: complete" in stream, stream
    return json.loads([line[5:] for line in stream.splitlines() if line.startswith("data:")][-1])


@pytest.mark.slow
def test_gradio_app_serves_and_streams_answers(tiny_runs, sft_dir):
    from gradio_client import Client

    pre, sft = tiny_runs
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "sample_gradio.py",
            f"--out_dir={sft}",
            f"--sft_data={sft_dir}",
            "--port",
            str(port),
            "--device=cpu",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(0.5)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        job = client.submit("《静夜思》的作者是谁?", [], str(sft), 0.0, 0, 1.0, 16, "chars", api_name="/chat")
        updates = [out for out in job]
        history, box = job.result()
        assert box == "" and [message_text(m) for m in history][0] == "《静夜思》的作者是谁?"
        reply = history[-1]
        assert reply["role"] == "assistant" and message_text(reply)
        assert len(updates) >= 2  # streamed: several partial answers before the last
        model, tok, ckpt = load_model(sft)
        # the penalty slider was left at its default: the page decodes as DEFAULT_DECODING (greedy + penalty)
        expected = (
            "".join(
                answer(
                    model,
                    tok,
                    [],
                    "《静夜思》的作者是谁?",
                    constraint=model_constraint(tok, ckpt),
                    max_new_tokens=16,
                    **DEFAULT_DECODING,
                )
            )
            or "(空回答 / empty answer)"
        )
        assert message_text(reply) == expected
        # a second turn sees the first as history (the page sends its history back)
        history2, _ = client.predict("请背诵这首诗。", history, str(sft), 0.0, 0, 1.0, 16, "chars", api_name="/chat")
        assert len(history2) == 4 and dialogue(history2)[:2] == dialogue(history)
        empty, _ = client.predict("   ", [], str(sft), 0.7, 50, 0.95, 16, "chars", api_name="/chat")
        assert "请输入" in message_text(empty[-1]) and dialogue(empty) == []
        long, _ = client.predict("长" * 600, [], str(sft), 0.7, 50, 0.95, 16, "chars", api_name="/chat")
        assert "太长" in message_text(long[-1])
        # text that is not valid Unicode (a lone surrogate, which JSON lets through) gets a note, not �
        # (gradio_client cannot send one: it encodes its JSON as UTF-8; a browser's JSON.stringify escapes it)
        odd, _ = post_raw_json(port, "chat", ["好\ud800", [], str(sft), 0.0, 0, 1.0, 16, "chars", 1.0])
        assert "the question is not valid Unicode (lone surrogate U+D800" in message_text(odd[-1]) and not dialogue(odd)
        # only the served checkpoints: another real checkpoint, a system file and a missing
        # path all get the same note, which tells nothing about the file system
        notes = []
        for path in (str(pre), "/etc/passwd", "/no/such/file"):
            try:
                out, _ = client.predict("你好", [], path, 0.0, 0, 1.0, 8, "chars", api_name="/chat")
                notes.append(message_text(out[-1]).replace(repr(path), "PATH"))
            except Exception as e:  # gradio's own check of the dropdown's choices
                notes.append(str(e).replace(path, "PATH"))
        assert notes[0] == notes[1] == notes[2] and "not" in notes[0], notes
        assert "root:" not in notes[1]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_gradio_settings_out_of_range_are_named():
    assert generation_settings(0, 0, 1.0, 16, 1.2)["top_k"] is None
    for bad in ((-1, 0, 1.0, 16, 1.2), (0.7, 0, 0.0, 16, 1.2), (0.7, 0, 1.0, 0, 1.2), (0.7, 0, 1.0, 16, 0)):
        with pytest.raises(ValueError, match="temperature >= 0, 0 < top-p <= 1"):
            generation_settings(*bad)
    with pytest.raises(ValueError):
        generation_settings("hot", 0, 1.0, 16, 1.2)


def test_gradio_models_opens_only_allowed_checkpoints_and_keeps_the_most_recent():
    opened = []
    models = Models(["a", "b", "c"], "cpu", max_loaded=2, load=lambda path, device: opened.append(path) or path)
    for path in ["a", "b", "a", "c", "a", "b"]:
        assert models.get(path) == path
    assert opened == ["a", "b", "c", "b"]  # "a" stayed loaded (used recently); "b", then "c", were dropped
    assert list(models.cache) == ["a", "b"]
    for path in ["/etc/passwd", "../a", "a/", None]:
        with pytest.raises(NotServed, match="not one of this page's checkpoints"):
            models.get(path)
    assert opened == ["a", "b", "c", "b"]


@pytest.mark.slow
def test_demo_smoke_runs_every_step_and_leaves_tracked_files_alone(tmp_path):
    tracked = subprocess.run(["git", "ls-files", "-s", "docs"], cwd=ROOT, capture_output=True, text=True).stdout
    before = {p: (ROOT / p).read_bytes() for p in ("docs/loss.png", "docs/curves.png", "docs/gradio.png")}
    proc = run_script("demo.py", "--smoke", "--out", tmp_path / "out", timeout=600)
    assert "all done" in proc.stdout and "Report:" in proc.stdout
    sft = tmp_path / "out" / "tiny-sft"
    assert (
        (sft / "eval.json").exists()
        and (sft / "loss.png").exists()
        and "## Evaluation" in (sft / "report.md").read_text()
    )
    assert {p: (ROOT / p).read_bytes() for p in before} == before
    assert subprocess.run(["git", "ls-files", "-s", "docs"], cwd=ROOT, capture_output=True, text=True).stdout == tracked
    for stage, label in (("dpo", "DPO (sigmoid, beta 0.1)"), ("grpo", "GRPO (8 questions x 8 answers")):
        # the third stage on the same models: --align, its report naming the stage and showing its curves
        proc = run_script(
            "demo.py",
            "--smoke",
            "--out",
            tmp_path / "out",
            "--reuse_pretrain",
            "--reuse_sft",
            f"--align={stage}",
            timeout=600,
        )
        report = (tmp_path / "out" / f"tiny-{stage}" / "report.md").read_text()
        assert "all done" in proc.stdout and f"| stage | {label}" in report and f"![{stage}]({stage}.png)" in report
