"""
Look inside the model, on request only: one forward pass that keeps the attention probabilities
of every layer and head, the residual stream after each block and the final logits; and the
views drawn from them (visualize.py draws their figures, sample_gradio.py's Inside tab shows them):

  token_probabilities  each token of an answer with the probability the model gave it, and the
                       top-5 alternatives at its position
  attention_view       the layer x head grid of attention maps over the tokens
  logit_lens           the final LayerNorm and the output layer applied to each layer's residual
                       stream (nostalgebraist, 2020): the top token, and the rank of the text's
                       next token, per layer and position
  head_scores          per head, a previous-token and an induction score on repeated random tokens
                       (Olsson et al., 2022, "In-context learning and induction heads")

Training and decoding never come here: attention runs its fused kernel (SDPA) unless
CausalSelfAttention.keep_probs is set, as forward_inside does for one pass. A P-Tuning prefix's
virtual tokens are keys every query sees: the attention maps show them as the first columns.
"""
import codecs

import torch

from miniglm.chat_template import render_prompt
from miniglm.generation import DEFAULT_DECODING, answer_batch, model_constraint

TOP_K = 5


def token_texts(tok, ids):
    """Each token's text; a token that only starts a character (a Chinese character can take
    2-3 byte tokens) shows '·', and the one that completes it the character."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [decoder.decode(token_bytes(tok, i)) or "·" for i in ids]


def token_bytes(tok, i):
    """A token's bytes; the padding slots past the vocabulary have none."""
    i = int(i)
    return tok.decode_bytes([i]) if i < len(tok.token_bytes) or i in tok.stop_ids or i == tok.im_start else b""


def alternative_text(tok, i):
    """One token shown alone: its text, or its bytes where it is part of a character."""
    piece = token_bytes(tok, i)
    try:
        return piece.decode("utf-8") or f"[{int(i)}]"
    except UnicodeDecodeError:
        return "".join(f"<{b:02x}>" for b in piece)


def text_ids(tok, question, answer, template):
    """(ids, where the answer starts): a fine-tuned model's prompt in its template and the answer
    after it (then the end token), or for a pretrained model (template None) the text alone."""
    if template is None:
        return tok.encode(question + answer), 1
    prompt = render_prompt(tok, [], question, template)
    return prompt + tok.encode(answer) + [tok.eot if template == "qa" else tok.im_end], len(prompt)


@torch.no_grad()
def forward_inside(model, ids):
    """One forward pass of ids (a list of T tokens) that keeps what happens inside:
    logits (T, vocab); attention (layers, heads, T, P + T): each query's weights over the P
    virtual tokens of a P-Tuning prefix (0 without one), then the text's tokens; residual
    (layers + 1, T, C): the stream after the embedding, then after each block."""
    device = model.lm_head.weight.device
    blocks = list(model.transformer.h)
    streams = []
    keep = lambda module, args, output: streams.append(output[0])  # noqa: E731  (batch row 0: (T, C))
    hooks = [model.transformer.drop.register_forward_hook(keep)] + [b.register_forward_hook(keep) for b in blocks]
    was_training = model.training
    model.eval()
    for b in blocks:
        b.attn.keep_probs = True
    try:
        logits, _ = model(torch.tensor([ids], device=device))  # (1, T, vocab)
        attention = torch.stack([b.attn.probs[0] for b in blocks])  # (layers, heads, T, P + T)
    finally:
        for h in hooks:
            h.remove()
        for b in blocks:
            b.attn.keep_probs, b.attn.probs = False, None
        model.train(was_training)
    return {"logits": logits[0].float(), "attention": attention.float(), "residual": torch.stack(streams).float(),
            "prefix": model.prefix.n if model.prefix is not None else 0}


def token_probabilities(tok, ids, logits, start, k=TOP_K):
    """For each token from start on: its text, the probability the model gave it at its
    position, and the top-k alternatives there [(text, probability)]."""
    probs = logits.softmax(dim=-1)  # (T, vocab)
    texts = token_texts(tok, ids)
    rows = []
    for t in range(max(start, 1), len(ids)):
        p = probs[t - 1]  # (vocab,): the distribution that predicted token t
        top = p.topk(k)
        rows.append({"token": texts[t], "id": int(ids[t]), "prob": p[ids[t]].item(),
                     "top": [(alternative_text(tok, i), v.item()) for v, i in zip(top.values, top.indices)]})
    return rows


def attention_view(tok, ids, inside):
    """The attention maps (layers, heads, T, P + T) as a list, and the labels of the queries and keys."""
    texts = token_texts(tok, ids)
    prefix = [f"[v{i}]" for i in range(inside["prefix"])]  # P-Tuning's virtual tokens
    return {"maps": inside["attention"].tolist(), "queries": texts, "keys": prefix + texts}


@torch.no_grad()
def lens_logits(model, residual):
    """The logits each layer's residual stream (layers + 1, T, C) would give if the model stopped
    there: the final LayerNorm and the output layer applied to it."""
    return model.lm_head(model.transformer.ln_f(residual.to(model.lm_head.weight.dtype))).float()


def logit_lens(model, tok, ids, inside):
    """Per layer (0 = the embedding) and position: the top token and its probability, and the rank
    (0 = top) and probability of the text's next token there."""
    logits = lens_logits(model, inside["residual"])  # (layers + 1, T, vocab)
    probs = logits.softmax(dim=-1)
    top = probs.max(dim=-1)  # values, indices: (layers + 1, T)
    nxt = torch.tensor(list(ids[1:]) + [ids[-1]], device=logits.device)  # the next token (the last: itself)
    nxt_logit = logits.gather(-1, nxt.expand(logits.size(0), -1)[..., None])  # (layers + 1, T, 1)
    rank = (logits > nxt_logit).sum(dim=-1)  # (layers + 1, T)
    return {
        "tokens": token_texts(tok, ids),
        "top": [[alternative_text(tok, i) for i in row] for row in top.indices.tolist()],
        "top_prob": top.values.tolist(),
        "next_rank": rank.tolist(),
        "next_prob": probs.gather(-1, nxt.expand(logits.size(0), -1)[..., None])[..., 0].tolist(),
    }


def own_answer(model, tok, ckpt, question, max_new_tokens=48):
    """The model's own answer to a question, with the default decoding ("" for a pretrained model,
    whose text is the question alone)."""
    template = ckpt.get("template")
    if template is None:
        return ""
    room = model.context_size - len(render_prompt(tok, [], question, template)) - 1  # (the end token after it)
    if room < 1:
        raise ValueError(f"the question does not leave the model's {model.context_size}-token context room to answer")
    return answer_batch(model, tok, [question], constraint=model_constraint(tok, ckpt), template=template,
                        max_new_tokens=min(max_new_tokens, room), **DEFAULT_DECODING)[0]


def look(model, tok, question, answer, template):
    """All three views of one text: {"ids", "start", "tokens" (token_probabilities), "attention",
    "lens"}."""
    ids, start = text_ids(tok, question, answer, template)
    cut = max(0, len(ids) - model.context_size)  # a text longer than the context keeps its end
    ids, start = ids[cut:], max(1, start - cut)
    inside = forward_inside(model, ids)
    return {"ids": ids, "start": start, "tokens": token_probabilities(tok, ids, inside["logits"], start),
            "attention": attention_view(tok, ids, inside), "lens": logit_lens(model, tok, ids, inside)}


@torch.no_grad()
def head_scores(model, n_tokens=None, rows=16, seed=0, texts=()):
    """Per layer and head (lists of lists): the previous-token score, the mean attention of each
    token to the one before it, and the induction score, the mean attention of each token of a
    repeated half to the token after its earlier occurrence; on rows sequences of n_tokens
    random tokens of the model's vocabulary, each repeated once (half the context by default,
    at most 50). "uniform": what a head that spread its attention evenly would score. With texts
    (lists of ids of real text), "previous_token_text": the previous-token score on them."""
    n = n_tokens or min(50, model.context_size // 2)
    vocab = model.lm_head.weight.size(0)
    g = torch.Generator().manual_seed(seed)
    previous, induction = 0, 0
    for _ in range(rows):
        half = torch.randint(0, vocab, (n,), generator=g).tolist()
        attention = forward_inside(model, half + half)["attention"]  # (layers, heads, 2n, P + 2n)
        p = attention.size(-1) - 2 * n  # the prefix's columns come first
        t = torch.arange(1, 2 * n)
        previous = previous + attention[:, :, t, p + t - 1].mean(dim=-1)
        t = torch.arange(n, 2 * n)  # the repeat: token t is token t - n again, followed before by t - n + 1
        induction = induction + attention[:, :, t, p + t - n + 1].mean(dim=-1)
    keys = lambda t: t + 1 + p  # noqa: E731  (the keys query t sees)
    uniform = {"previous_token": sum(1 / keys(t) for t in range(1, 2 * n)) / (2 * n - 1),
               "induction": sum(1 / keys(t) for t in range(n, 2 * n)) / n}
    scores = {"previous_token": (previous / rows).tolist(), "induction": (induction / rows).tolist(), "tokens": n,
              "rows": rows, "uniform": uniform}
    if texts:
        on_text = 0
        for ids in texts:
            attention = forward_inside(model, ids)["attention"]
            t = torch.arange(1, len(ids))
            on_text = on_text + attention[:, :, t, attention.size(-1) - len(ids) + t - 1].mean(dim=-1)
        scores["previous_token_text"] = (on_text / len(texts)).tolist()
        uniform["previous_token_text"] = sum(sum(1 / (t + 1) for t in range(1, len(ids))) / (len(ids) - 1)
                                             for ids in texts) / len(texts)
    return scores
