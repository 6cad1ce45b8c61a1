"""GGUF export (export_gguf.py), checked by llama.cpp itself through llama-cpp-python when it is
installed (pip install -r requirements-gguf.txt: it compiles llama.cpp), and always by the gguf
package's reader: keys, shapes, tokenizer, chat template. Both export architectures: GPT-NeoX
(rotary positions, the demo's) and GPT-2 (learned positions)."""

import numpy as np
import pytest
import torch

import train
from conftest import TINY, make_sft_data, run_script
from miniglm.chat_template import render_prompt
from miniglm.checkpoint import load_model
from miniglm.export.gguf import open_in_llama_cpp
from miniglm.export.hf import chat_template_jinja
from miniglm.generation import answer, generate, model_template

PROMPTS = ["问:《静夜思》的作者是谁?\n答:", "问:请背诵《春晓》。\n答:", "床前明月光，", "Hello, world! 🙂",
           "问:“白日依山尽”的下一句是什么?\n答:"]
TEXTS = ["床前明月光，疑是地上霜。", "The quick brown fox, 1234!", "emoji 🙂🎉 and 中文", "问:《春晓》的作者是谁?\n答:",
         "系统:你是诗人。\n问:你好\n答:"]
# of the largest |logit|: llama.cpp's GELU is the tanh approximation (model.py's is exact) and its KV
# cache is f16 (measured on the demo's model: 0.07%); q8_0 rounds the weights too (2.4%)
TOLERANCE = {"f32": 2e-3, "q8_0": 5e-2}


@pytest.fixture(scope="module")
def models(vocab_runs, learned_positions_bpe):
    """The BPE SFT model (rotary: GPT-NeoX) and a GPT-2-architecture one (learned positions)."""
    return {"neox": vocab_runs["bpe"] / "sft", "gpt2": learned_positions_bpe}


@pytest.fixture(scope="module", params=["neox", "gpt2"])
def exported(request, models, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"gguf-{request.param}")
    files = {}
    for qtype in ("f32", "q8_0"):
        files[qtype] = out / f"model-{qtype}.gguf"
        run_script(
            "export_hf.py", f"--out_dir={models[request.param]}", f"--gguf={files[qtype]}", f"--gguf_type={qtype}"
        )
    return request.param, models[request.param], files


@pytest.mark.slow
def test_the_file_has_the_keys_shapes_and_tokenizer(exported):
    from gguf import GGUFReader

    arch, run, files = exported
    model, tok, meta = load_model(run)
    name = {"neox": "gptneox", "gpt2": "gpt2"}[arch]
    r = GGUFReader(files["f32"])
    value = lambda key: r.fields[key].contents()  # noqa: E731
    assert value("general.architecture") == name and value(f"{name}.context_length") == model.context_size
    assert (
        value(f"{name}.block_count") == model.config.n_layer
        and value(f"{name}.embedding_length") == model.config.n_embd
    )
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.ggml.bos_token_id") == tok.eot == value("tokenizer.ggml.eos_token_id")
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == model.config.vocab_size and tokens[tok.eot] == "<|endoftext|>"
    assert len(value("tokenizer.ggml.merges")) == tok.eot - 256  # one merge per rank past the bytes
    assert value("tokenizer.chat_template") == chat_template_jinja(meta.get("template") or "qa")
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" in tensors and ("position_embd.weight" in tensors) == (arch == "gpt2")
    assert all(
        f"blk.{i}.{part}.bias" in tensors
        for i in range(model.config.n_layer)
        for part in ("attn_qkv", "attn_output", "ffn_up", "ffn_down", "attn_norm", "ffn_norm")
    )
    emb = tensors["token_embd.weight"]
    assert list(emb.shape) == [model.config.n_embd, model.config.vocab_size]  # (ggml's order: columns first)
    np.testing.assert_array_equal(
        np.asarray(emb.data).reshape(model.config.vocab_size, -1), model.transformer.wte.weight.detach().numpy()
    )
    q8 = {t.name: t.tensor_type.name for t in GGUFReader(files["q8_0"]).tensors}
    assert q8["blk.0.attn_qkv.weight"] == "Q8_0" and q8["blk.0.attn_qkv.bias"] == "F32"
    assert files["q8_0"].stat().st_size < 0.4 * files["f32"].stat().st_size
    modelfile = files["f32"].with_suffix(".Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{files['f32'].name}\n") and 'PARAMETER stop "<|endoftext|>"' in modelfile
    assert "{{ .Content }}<|endoftext|>" in modelfile and 'TEMPLATE """' in modelfile


@pytest.mark.slow
def test_bad_exports_are_one_line(tiny_runs, vocab_runs, models, corpus_docs, tmp_path):
    cases = [
        ([f"--out_dir={tiny_runs[1]}"], "the trimmed vocabulary"),
        ([f"--out_dir={models['neox']}", "--gguf_type=q4_k"], "must be one of f32, f16, q8_0, got 'q4_k'"),
    ]
    pre = vocab_runs["bpe"] / "pre"
    make_sft_data(corpus_docs, tmp_path / "rows", "--vocab", pre, "--block_size", "60")
    for method in ("ptuning", "lora"):
        train.main(
            [
                *TINY,
                f"--data_dir={tmp_path / 'rows'}",
                f"--out_dir={tmp_path / method}",
                "--max_iters=2",
                f"--init_from={pre / 'best.pt'}",
                f"--finetune={method}",
                *(["--num_virtual_tokens=4"] if method == "ptuning" else []),  # (a key of P-Tuning's alone)
            ]
        )
    cases += [
        ([f"--out_dir={tmp_path / 'ptuning'}"], "a P-Tuning v2 prefix has no place in GGUF"),
        ([f"--out_dir={tmp_path / 'lora'}"], "a LoRA adapter; GGUF holds one model: add --merge"),
    ]
    for args, message in cases:
        proc = run_script("export_hf.py", *args, f"--gguf={tmp_path / 'x.gguf'}", check=False)
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "x.gguf").exists()
    run_script("export_hf.py", f"--out_dir={tmp_path / 'lora'}", f"--gguf={tmp_path / 'x.gguf'}", "--merge")
    proc = run_script("export_hf.py", f"--out_dir={models['neox']}", f"--gguf={tmp_path / 'x.gguf'}", check=False)
    assert proc.returncode == 1 and "x.gguf exists: give another --dest, or --force" in proc.stderr
    before = (tmp_path / "x.gguf").read_bytes()
    assert (tmp_path / "x.gguf").read_bytes() == before  # nothing lost


@pytest.fixture(scope="module")
def llama(exported):
    pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python is not installed (pip install -r requirements-gguf.txt compiles llama.cpp)",
    )
    arch, run, files = exported
    model = load_model(run)
    return {q: open_in_llama_cpp(f, model[0].context_size, logits_all=True, seed=0) for q, f in files.items()}, model


@pytest.mark.slow
def test_llama_cpp_tokenizes_as_the_project(llama):
    llms, (model, tok, _) = llama
    for text in TEXTS:
        assert llms["f32"].tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
    # the template's special tokens: one id each, the project's (which its encoder never makes of text)
    for text, want in (("<|endoftext|>", tok.eot), ("<|im_start|>", tok.im_start), ("<|im_end|>", tok.im_end)):
        assert llms["f32"].tokenize(text.encode(), add_bos=False, special=True) == [want]
        assert llms["f32"].detokenize([want], special=True) == text.encode()


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_llama_cpp_logits_and_greedy_tokens(llama, qtype):
    llms, (model, tok, _) = llama
    llm, near_ties = llms[qtype], 0
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        llm.reset()
        llm.eval(ids)
        theirs = torch.tensor(np.asarray(llm.scores[len(ids) - 1]))
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0][0, -1]
        assert (ours - theirs).abs().max() < TOLERANCE[qtype] * max(1.0, ours.abs().max().item()), prompt
        want = generate(model, torch.tensor([ids]), 32, temperature=0)[0, len(ids) :].tolist()
        llm.reset()
        got = []
        for t in llm.generate(ids, temp=0.0, repeat_penalty=1.0, top_k=1):
            got.append(t)
            if len(got) == 32:
                break
        if got != want:  # where they part, the project's top two must be within the tolerance
            k = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
            with torch.no_grad():
                top = model(torch.tensor([ids + want[:k]]))[0][0, -1].topk(2).values
            assert (top[0] - top[1]).item() < 2 * TOLERANCE[qtype] * max(1.0, top.abs().max().item()), (prompt, k)
            near_ties += 1
    print(f"{qtype}: {near_ties} of {len(PROMPTS)} prompts part at a near-tie")


@pytest.mark.slow
def test_llama_cpp_chat_answers_as_sample_py(llama, exported):
    """llama-cpp-python's chat: its Jinja rendering of the GGUF's template gives the project's prompt
    ids, and create_chat_completion's greedy answer is the project's (sample.py --chat's code path,
    generation.answer, greedy without penalties or constraint)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llms, (model, tok, meta) = llama
    llm, question = llms["f32"], "《静夜思》的作者是谁?"
    messages = [{"role": "user", "content": question}]
    prompt = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        add_generation_prompt=True,
    )(messages=messages).prompt
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == render_prompt(
        tok, [], question, model_template(meta)
    )
    ours = "".join(
        answer(model, tok, [], question, max_new_tokens=24, temperature=0, repetition_penalty=1.0, no_repeat_ngram=0)
    )
    theirs = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=24)
    assert theirs["choices"][0]["message"]["content"] == ours


@pytest.mark.parametrize("template", ["qa", "chatml"])
def test_chat_template_and_modelfile_write_the_projects_prompt(template):
    """A unit test of the export modules (the fast tier): the Jinja template that transformers and
    llama.cpp render gives render_prompt's text, for both templates; the Modelfile names the file, its
    stops and the default decoding."""
    from jinja2 import Template

    from miniglm.chat_template import render_prompt
    from miniglm.export.gguf import modelfile
    from miniglm.tokenizer import GPT2
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好!"}]
    messages = history + [{"role": "user", "content": "《静夜思》的作者是谁?"}]
    text = Template(chat_template_jinja(template)).render(messages=messages, add_generation_prompt=True)
    assert text == GPT2.decode(render_prompt(GPT2, history, "《静夜思》的作者是谁?", template))
    lines = modelfile("tiny.gguf", template, 256).splitlines()
    assert lines[0] == "FROM ./tiny.gguf" and 'PARAMETER stop "<|endoftext|>"' in lines
    assert ('PARAMETER stop "<|im_end|>"' in lines) == (template == "chatml")
