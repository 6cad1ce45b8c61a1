"""The OpenAI-compatible server: continuous batching (batching.Engine) against one-by-one
generation, and serve.py driven by the official openai client over a real uvicorn server on
127.0.0.1, every loop bounded in requests and time."""
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from conftest import ROOT, free_port, run_script

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def val_questions(data_dir, n):
    from data_utils import read_jsonl
    records, _ = read_jsonl(data_dir / "sft_val.jsonl")
    return [c["messages"][0]["content"] for (_, c), _ in zip(records, range(n))]


def one_by_one(model, tok, meta, question, max_tokens, **decoding):
    """What sample.py --chat prints for question: generation.answer, alone."""
    from miniglm.generation import DEFAULT_DECODING, answer, model_constraint, model_template
    return "".join(answer(model, tok, [], question, constraint=model_constraint(tok, meta),
                          template=model_template(meta), max_new_tokens=max_tokens,
                          **dict(DEFAULT_DECODING, **decoding)))


@pytest.mark.parametrize("run", ["trimmed", "bpe"])
def test_engine_answers_equal_one_by_one_whatever_joins_when(run, tiny_runs, vocab_runs):
    """Requests join a running batch at different steps (one per step, some sampled with a
    seed, some greedy without penalties, one cancelled): each answer equals its one-by-one run."""
    from miniglm.batching import Engine, Job
    from miniglm.chat_template import render_prompt
    from miniglm.checkpoint import load_model
    from miniglm.generation import DEFAULT_DECODING, GREEDY, model_constraint
    out = tiny_runs[1] if run == "trimmed" else vocab_runs["bpe"] / "sft"
    data = tiny_runs[0].parent / "sft-data" if run == "trimmed" else vocab_runs["bpe"] / "sft-data"
    model, tok, meta = load_model(out)
    torch.manual_seed(0)
    engine = Engine(model, tok, max_batch=4, max_queue=16)
    questions = val_questions(data, 7)
    settings = [{}, {}, dict(temperature=0.8, top_k=20), GREEDY, {}, dict(temperature=1.0, top_p=0.9), {}]
    results, jobs = {}, []
    for i, (q, extra) in enumerate(zip(questions, settings)):
        texts = results.setdefault(i, [])
        emit = lambda event, texts=texts: texts.append(event)  # noqa: E731
        constraint = model_constraint(tok, meta).with_chars(q)
        jobs.append(Job(render_prompt(tok, [], q), 10, dict(DEFAULT_DECODING, **extra), emit, seed=100 + i,
                        constraint=constraint))
        engine.submit(jobs[-1])
        engine.step()  # the others decode one token; this one joins
        if i == 3:
            jobs[1].cancel()
    for _ in range(100):
        if not any(engine.load()):
            break
        engine.step()
    assert engine.load() == (0, 0) and engine.finished["cancelled"] == 1
    assert engine.steps and engine.row_steps / engine.steps > 1.5  # they really decoded together
    for i, (q, extra) in enumerate(zip(questions, settings)):
        if i == 1:
            continue
        events = results[i]
        assert events[-1][0] == "done" and all(e[0] == "text" for e in events[:-1])
        text = "".join(e[1] for e in events[:-1])
        assert text == one_by_one(model, tok, meta, q, 10, seed=100 + i, **extra), (i, q)


@pytest.fixture(scope="module")
def server(tiny_runs):
    """serve.py's app on a real uvicorn server in a thread: the tiny SFT model and its
    pretrained base, an API key, a small body limit."""
    import uvicorn

    from serve import load_models, make_app
    models = load_models([tiny_runs[1], tiny_runs[0]], max_batch=4, max_queue=4)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(make_app(models, "test-key", max_body=4096), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield models, f"http://127.0.0.1:{port}/v1"
    srv.should_exit = True
    thread.join(timeout=10)


def client(url, key="test-key"):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30)


def test_chat_streamed_equals_unstreamed_equals_sample(server, tiny_runs, tiny_sft_data):
    models, url = server
    c, sft = client(url), models["sft"]
    q = val_questions(tiny_sft_data, 1)[0]
    full = c.chat.completions.create(model="sft", messages=[{"role": "user", "content": q}], temperature=0,
                                     max_tokens=10)
    streamed = c.chat.completions.create(model="sft", messages=[{"role": "user", "content": q}], temperature=0,
                                         max_tokens=10, stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert full.choices[0].message.content == text != ""
    assert full.choices[0].message.content == one_by_one(sft.model, sft.tok, meta_of(tiny_runs[1]), q, 10)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens <= 10
    from miniglm.chat_template import render_prompt
    assert full.usage.prompt_tokens == len(render_prompt(sft.tok, [], q))
    # sample.py itself, as a user runs it
    proc = run_script("sample.py", f"--out_dir={tiny_runs[1]}", "--chat", f"--start={q}", "--max_new_tokens=10",
                      "--device=cpu")
    assert proc.stdout.strip() == "答:" + full.choices[0].message.content


def meta_of(out_dir):
    from miniglm.checkpoint import load_model
    return load_model(out_dir)[2]


def test_completions_streamed_and_not_and_their_limits(server, tiny_runs):
    from miniglm.generation import WRITING, stream_text
    models, url = server
    c, pre = client(url), models["pre"]
    kw = dict(model="pre", prompt="床前明月光", temperature=0, max_tokens=12)
    full = c.completions.create(**kw)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stream=True))
    ids = pre.tok.encode("床前明月光")
    alone = "".join(stream_text(pre.model, pre.tok, ids, max_new_tokens=12, stop_at_eot=True,
                                constraint=pre.constraint.with_chars("床前明月光"), **dict(WRITING, temperature=0)))
    assert full.choices[0].text == streamed == alone
    assert full.object == "text_completion" and full.usage.prompt_tokens == len(ids)
    # max_tokens ends the text with "length"; ignore_eos writes on past the end token
    long = c.completions.create(model="pre", prompt="床", max_tokens=5, extra_body={"ignore_eos": True})
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 5
    # a stop string cuts the text before it, also when streamed
    cut = full.choices[0].text[2:4]
    stopped = c.completions.create(**kw, stop=[cut])
    assert stopped.choices[0].text == full.choices[0].text[:full.choices[0].text.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"
    assert "".join(ch.choices[0].text for ch in c.completions.create(**kw, stop=cut, stream=True)) \
        == stopped.choices[0].text
    # max_tokens past the context is capped: the answer fills the context at most
    capped = c.completions.create(model="pre", prompt="床", max_tokens=10_000, extra_body={"ignore_eos": True})
    assert capped.usage.total_tokens == pre.model.context_size


def test_bad_requests_get_openai_errors_and_the_server_serves_on(server):
    models, url = server
    c = client(url)
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "你好"}])
    bad = [dict(messages=[{"role": "wizard", "content": "你好"}]), dict(messages=[]),
           dict(messages="你好"), dict(messages=[{"role": "user", "content": "你好"}], max_tokens=-1),
           dict(messages=[{"role": "user", "content": "好" * 200}])]
    params = []
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="sft", **kwargs)
        params.append(e.value.body["param"])
    assert params == ["messages[0].role", "messages", "messages", "max_tokens", "messages"]
    context = models["sft"].model.context_size
    with pytest.raises(openai.BadRequestError, match=rf"the prompt is \d+ tokens; .* context of {context} tokens"):
        c.chat.completions.create(model="sft", messages=[{"role": "user", "content": "好" * 200}])
    headers = {"Authorization": "Bearer test-key", "Content-Type": "application/json"}
    raw = [b'{"model": "sft", "messages": [', '{"model": "sft", "prompt": "\xff"}'.encode("latin-1"),
           b'{"model": "sft", "prompt": "\\ud800"}', json.dumps({"model": "sft", "prompt": "x" * 5000}).encode()]
    statuses = [httpx.post(f"{url}/completions", content=body, headers=headers, timeout=30) for body in raw]
    assert [r.status_code for r in statuses] == [400, 400, 400, 413]
    assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in statuses)
    assert "not valid JSON" in statuses[0].json()["error"]["message"]
    assert "not UTF-8" in statuses[1].json()["error"]["message"]
    assert "surrogate" in statuses[2].json()["error"]["message"]
    assert httpx.get(f"{url}/nowhere", headers=headers).json()["error"]["message"].startswith("GET /v1/nowhere")
    # an unknown field is ignored, as vLLM does; the server still answers after all of the above
    ok = c.chat.completions.create(model="sft", messages=[{"role": "system", "content": "诗"},
                                                          {"role": "user", "content": "你好"}],
                                   max_tokens=4, extra_body={"frobnicate": 1})
    assert ok.choices[0].finish_reason in ("stop", "length") and [m.id for m in c.models.list()] == ["sft", "pre"]


def test_full_batch_answers_429_and_a_cancelled_stream_frees_its_row(tiny_runs):
    """One row and no queue: while a stream holds the row, another request gets 429; once
    the client closes that stream, the row is freed at the next step and served again."""
    import uvicorn

    from serve import load_models, make_app
    models = load_models([tiny_runs[0]], max_batch=1, max_queue=0)
    engine, model = models["pre"].engine, models["pre"].model
    slow = model.decode_ragged
    model.decode_ragged = lambda idx, cache: (time.sleep(0.05), slow(idx, cache))[1]  # a big model's pace
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(make_app(models), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        while not srv.started:
            time.sleep(0.05)
        c = client(f"http://127.0.0.1:{port}/v1", key="none")
        stream = c.completions.create(model="pre", prompt="床", max_tokens=60, stream=True,
                                      extra_body={"ignore_eos": True})  # 60 steps: 3 s at this pace
        next(iter(stream))
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model="pre", prompt="月", max_tokens=2)
        stream.close()
        deadline, answer = time.time() + 10, None
        while answer is None and time.time() < deadline:
            try:
                answer = c.completions.create(model="pre", prompt="月", max_tokens=2)
            except openai.RateLimitError:
                time.sleep(0.1)
        assert answer is not None and engine.finished["cancelled"] == 1 and engine.load() == (0, 0)
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.mark.slow
def test_serve_cli_answers_the_client_with_a_key_from_the_environment(tiny_runs):
    port = free_port()
    env = dict(os.environ, MINIGLM_API_KEY="k3y")
    proc = subprocess.Popen([sys.executable, "serve.py", f"--out_dir={tiny_runs[1]}", f"--port={port}",
                             "--device=cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        c = client(f"http://127.0.0.1:{port}/v1", key="k3y")
        deadline = time.time() + 60
        while True:
            try:
                models = c.models.list()
                break
            except openai.APIConnectionError:
                assert time.time() < deadline and proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        assert [m.id for m in models] == ["sft"]
        reply = c.chat.completions.create(model="sft", messages=[{"role": "user", "content": "你好"}], max_tokens=5)
        assert reply.choices[0].message.role == "assistant"
        with pytest.raises(openai.AuthenticationError):
            client(f"http://127.0.0.1:{port}/v1", key="wrong").models.list()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    missing = run_script("serve.py", "--out_dir=no/such/run", check=False)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [
        "error: no/such/run: checkpoint not found (train a model first)"]
