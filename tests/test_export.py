"""export_hf.py: a checkpoint as a Hugging Face model folder, loaded by transformers'
AutoModelForCausalLM and AutoTokenizer, computing what the project computes."""
import pytest
import torch

from conftest import run_script
from miniglm.chat_template import render_prompt
from miniglm.checkpoint import load_model
from miniglm.generation import generate

pytestmark = pytest.mark.slow  # every test here trains, exports or runs end to end

TEXTS = ["床前明月光，疑是地上霜。", "龘靐齉 are rare characters", "Hello world, it's 12:45 o'clock!!",
         "emoji 🙂🐉👩‍👩‍👧 and ñ ü ß", "\t  spaces \n\n 问:你好\n答:"]
PROMPTS = ["问:《静夜思》的作者是谁?\n答:", "问:请背诵《春晓》。\n答:", "床前明月光，"]


@pytest.fixture(scope="module", params=["gpt2", "bpe"])
def exported(request, vocab_runs, tmp_path_factory):
    src, dest = vocab_runs[request.param] / "sft", tmp_path_factory.mktemp(f"hf-{request.param}")
    run_script("export_hf.py", f"--out_dir={src}", f"--dest={dest}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(dest).eval()
    # the BPE run has rotary positions (as the demo): GPT-NeoX's architecture carries them
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "bpe": "GPTNeoXForCausalLM"}[request.param]
    return load_model(src), hf, AutoTokenizer.from_pretrained(dest)


def test_tokenizer_gives_the_projects_ids(exported):
    (_, tok, _), _, hf_tok = exported
    for text in TEXTS:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text) and hf_tok.decode(ids) == text
    assert hf_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [tok.eot, tok.im_start,
                                                                                            tok.im_end]


def test_logits_and_greedy_generation_equal_the_projects(exported):
    (model, tok, _), hf, _ = exported
    for prompt in PROMPTS:
        idx = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            ours, theirs = model(idx)[0][0, -1], hf(idx).logits[0, -1]
        assert (ours - theirs).abs().max() < 1e-4
        want = generate(model, idx, 24, temperature=0, stop_token=tok.stop_ids)
        assert torch.equal(hf.generate(idx, max_new_tokens=24, do_sample=False), want)


def test_chat_template_writes_the_projects_prompt(exported):
    (_, tok, _), _, hf_tok = exported
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好!"}]
    text = hf_tok.apply_chat_template(history + [{"role": "user", "content": "《静夜思》的作者是谁?"}],
                                      add_generation_prompt=True, tokenize=False)
    assert text == tok.decode(render_prompt(tok, history, "《静夜思》的作者是谁?"))


def test_a_trimmed_vocabulary_is_refused_in_one_line(tiny_runs, tmp_path):
    proc = run_script("export_hf.py", f"--out_dir={tiny_runs[1]}", f"--dest={tmp_path / 'x'}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "cannot be written as a Hugging Face tokenizer exactly" in proc.stderr and "vocab='bpe'" in proc.stderr
    assert not (tmp_path / "x").exists()
