"""Answers that do not loop: the repetition penalty and the no-repeat n-gram rule, with
HF transformers' semantics, over each row's answer; greedy unchanged at penalty 1.0."""
import pytest
import torch

from miniglm.checkpoint import load_model
from miniglm.generation import answer, answer_batch, generate, model_constraint, penalize
from miniglm.metrics import held_out_questions
from model import GPT, GPTConfig


def test_penalties_equal_hf_transformers_logits_processors():
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, generator=g) * 3  # positive and negative logits
    written = torch.randint(0, 3, (3, 15), generator=g)  # three distinct tokens: n-grams recur
    rows = [w[:k] for w, k in zip(written.tolist(), (15, 4, 0))]  # rows of different lengths, one empty
    for penalty in (1.0, 1.3, 0.7):
        want = RepetitionPenaltyLogitsProcessor(penalty)(written, logits.clone())
        assert torch.equal(penalize(logits, written.tolist(), penalty), want)
        want = torch.cat([RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([w]), logits[[r]].clone()) if w
                          else logits[[r]] for r, w in enumerate(rows)])
        assert torch.equal(penalize(logits, rows, penalty), want)
    for n in (2, 3):
        want = NoRepeatNGramLogitsProcessor(n)(written, logits.clone())
        got = penalize(logits, written.tolist(), 1.0, n)
        assert (
            torch.equal(got.isinf(), want.isinf())
            and got.isinf().any()
            and torch.equal(got[~got.isinf()], want[~want.isinf()])
        )


def tiny():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=64)).eval()
    with torch.no_grad():  # sharper than at init: greedy choices far from ties
        for p in model.parameters():
            p.mul_(8 if p.dim() > 1 else 1)
    return model


def test_penalty_one_leaves_greedy_as_it_was():
    """Penalty 1.0 and no n-gram rule: the tokens of the plain greedy loop (the argmax of a
    full recompute at every step, cropped past block_size), which is what generation was."""
    model = tiny()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    want = prompt
    with torch.no_grad():
        for _ in range(30):  # past block_size (24) too
            logits, _ = model(want[:, -24:])
            want = torch.cat([want, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generate(model, prompt, 30, temperature=0, repetition_penalty=1.0, no_repeat_ngram=0), want)
    looped = (want[:, 5:, None] == want[:, None, 5:]).sum() > 2 * 30  # this model repeats itself greedily ...
    penalized = generate(model, prompt, 30, temperature=0, repetition_penalty=1.5)
    assert looped and not torch.equal(penalized, want)  # ... and the penalty changes that


def test_no_repeat_ngram_never_repeats_an_ngram_of_the_answer():
    model = tiny()
    prompt = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(2))
    for n in (2, 3):
        out = generate(model, prompt, 18, temperature=0, no_repeat_ngram=n)[:, 4:].tolist()
        for row in out:
            grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
            assert len(grams) == len(set(grams)), (n, row)


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_batched_answers_equal_one_by_one_under_the_penalties(tiny_runs, tiny_sft_data, decode):
    """Rows refilled mid-way carry what they wrote into the penalty, so every answer is the
    one answer() gives alone."""
    model, tok, ckpt = load_model(tiny_runs[1])
    model.decode_mode = decode
    constraint = model_constraint(tok, ckpt)
    questions = [q for q, _ in held_out_questions(tiny_sft_data, 14) if len(tok.encode(q)) < 36][:12] + ["你好"]
    for settings in (dict(repetition_penalty=1.3), dict(repetition_penalty=1.2, no_repeat_ngram=3)):
        one = [
            "".join(answer(model, tok, [], q, constraint=constraint, max_new_tokens=20, temperature=0, **settings))
            for q in questions
        ]
        assert (
            answer_batch(model, tok, questions, constraint=constraint, max_new_tokens=20, batch_size=5, **settings)
            == one
        )
        greedy = answer_batch(model, tok, questions, constraint=constraint, max_new_tokens=20, batch_size=5)
        assert greedy != one  # the settings do change some answers


def test_no_repeat_ngram_never_leaves_a_character_half_written():
    """With GPT-2's byte tokens a repeated character repeats an n-gram: the rule may ban the
    only token that ends the character being written. The constraint wins there."""
    from miniglm.constraint import make_constraint
    from miniglm.tokenizer import GPT2

    tok = GPT2
    pieces = tok.encode("龘")
    assert len(pieces) >= 2  # GPT-2 spells it in byte pieces
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=32, vocab_size=tok.vocab_size)).eval()
    written = pieces + pieces[:-1]  # its last piece would repeat an n-gram of the answer
    constraint = make_constraint(tok, "chars", chars="龘")
    for n in range(2, len(pieces) + 1):
        out = generate(
            model,
            torch.tensor([written]),
            1,
            temperature=0,
            constraint=constraint,
            no_repeat_ngram=n,
            written=[written],
            states=[tok.decode_bytes(pieces[:-1])],
        )
        assert out[0, -1].item() == pieces[-1]
