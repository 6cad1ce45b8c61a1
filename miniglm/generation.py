"""
Generation, the one place for it: the token loop (KV cache, sampling, the decoding
constraint, the repetition penalty) and, on top of it, text: streaming whole characters,
chat prompts in the model's template, answers one by one or many at once.
sample.py, sample_gradio.py, evaluations.py and the benchmarks all call these.
"""
import codecs

import numpy as np
import torch

from data_utils import UserError
from miniglm.chat_template import render_prompt
from miniglm.constraint import make_constraint
from model import KVCache

# What a user gets by default from sample.py --chat, the Gradio page, evaluations.py and
# the demo: greedy, with a repetition penalty and no repeated 3-grams. Chosen on 191 dev
# questions (val questions past the 100 that are scored) with benchmarks/tune_decoding.py:
# char F1 0.295 greedy → 0.354; benchmarks/README.md has the table.
DEFAULT_DECODING = dict(temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.2, no_repeat_ngram=3)
GREEDY = dict(temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0, no_repeat_ngram=0)
# sample.py without --chat writes text on from a prompt: several samples should differ
WRITING = dict(DEFAULT_DECODING, temperature=0.8, top_k=50, top_p=0.95)


def add_decoding_flags(parser):
    """The sampling flags of sample.py and evaluations.py; unset ones take the defaults
    (decoding_from_flags)."""
    parser.add_argument(
        "--temperature", type=float, help="0 = greedy (default: greedy for answers, 0.8 for --start text)"
    )
    parser.add_argument("--top_k", type=int, help="sample among the k likeliest tokens (0 = off)")
    parser.add_argument(
        "--top_p", type=float, help="sample from the smallest set holding this much probability (1 = off)"
    )
    parser.add_argument(
        "--repetition_penalty",
        type=float,
        help=f"as in HF transformers: a token already in the "
        f"answer has its logit divided by this (multiplied if negative); 1 = off (default "
        f"{DEFAULT_DECODING['repetition_penalty']})",
    )
    parser.add_argument(
        "--no_repeat_ngram",
        type=int,
        help=f"never repeat an n-gram of tokens of the answer; 0 = off (default {DEFAULT_DECODING['no_repeat_ngram']})",
    )


def decoding_from_flags(args, base=DEFAULT_DECODING):
    """The decoding settings: base, overridden by the flags given."""
    d = dict(base, **{k: getattr(args, k) for k in base if getattr(args, k, None) is not None})
    if d["temperature"] < 0 or d["repetition_penalty"] <= 0 or d["no_repeat_ngram"] < 0:
        raise UserError("--temperature must be >= 0, --repetition_penalty > 0 and --no_repeat_ngram >= 0")
    d["top_k"] = d["top_k"] or None
    d["top_p"] = d["top_p"] if d["top_p"] is not None and d["top_p"] < 1 else None
    return d


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row from (B, V) logits."""
    if temperature == 0:  # max's index: the first of equal maxima, as argmax's, in a third of argmax's time (CPU)
        return logits.max(dim=-1).indices
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the tokens before it already hold top_p of the mass
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def penalize(logits, written, penalty=1.0, no_repeat_ngram=0):
    """Logits after the penalties over each row's answer so far (written: its token ids),
    with the semantics of HF transformers: a token already in the answer has a positive
    logit divided by penalty and a negative one multiplied by it (repetition_penalty, on
    the answer's tokens only: gathered and scattered back, as HF does); a token that would
    repeat an n-gram of the answer is banned (no_repeat_ngram_size). Penalty 1.0 and
    n-gram 0 leave the logits as they are."""
    if penalty != 1.0 and any(written):
        width = max(map(len, written))  # short rows repeat their last token; empty rows write token 0 back as it was
        ids = torch.tensor([w + w[-1:] * (width - len(w)) if w else [0] * width for w in written], device=logits.device)
        got = logits.gather(1, ids)
        new = torch.where(got > 0, got / penalty, got * penalty)
        if not all(written):
            new = torch.where(torch.tensor([[bool(w)] for w in written], device=logits.device), new, got)
        logits = logits.scatter(1, ids, new)
    if no_repeat_ngram:
        n, banned = no_repeat_ngram, torch.zeros_like(logits, dtype=torch.bool)
        for row, ids in enumerate(written):
            if len(ids) >= n:
                prefix = ids[len(ids) - n + 1 :]
                banned[row, [ids[i + n - 1] for i in range(len(ids) - n + 1) if ids[i : i + n - 1] == prefix]] = True
        logits = logits.masked_fill(banned, float("-inf"))
    return logits


def choose_next(
    logits,
    written,
    rows,
    states,
    temperature=0.0,
    top_k=None,
    top_p=None,
    repetition_penalty=1.0,
    no_repeat_ngram=0,
    generator=None,
):
    """Each row's next token id (B,) from its logits (B, V): the penalties over what it wrote
    (penalize), its decoding constraint (rows: a TextConstraint or None per row, each in its
    state), then sampling. The step that generate_stream and miniglm/batching.py both take."""
    scores = penalize(logits, written, repetition_penalty, no_repeat_ngram)
    if any(c is not None for c in rows):
        allowed = torch.from_numpy(
            np.stack(
                [c.mask(s) if c is not None else np.ones(logits.size(-1), dtype=bool) for c, s in zip(rows, states)]
            )
        ).to(logits.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        # a half-written character may have one way to end, which the n-gram rule can ban
        # (a repeated character is a repeated n-gram of its byte tokens): the constraint wins
        stuck = scores.max(dim=-1).values == float("-inf") if no_repeat_ngram else None
        if stuck is not None and bool(stuck.any()):
            unbanned = penalize(logits, written, repetition_penalty, 0).masked_fill(~allowed, float("-inf"))
            scores = torch.where(stuck[:, None], unbanned, scores)
    return sample_next(scores, temperature, top_k, top_p, generator)


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop_token=None,
                    use_cache=True, generator=None, constraint=None, pad=None, states=None, repetition_penalty=1.0,
                    no_repeat_ngram=0, written=None):
    """Yield the next token ids, shape (B,), one step at a time. temperature 0 = greedy.
    Stops early once every row has produced stop_token (an id, or several: any of them
    ends a row; a finished row then repeats the first). The KV cache path gives the
    same tokens as recomputing the context; past block_size the context is cropped to
    the last block_size tokens, which a cache cannot reuse, so those steps recompute.
    constraint (constraint.TextConstraint, or one per row): each row may only take the
    tokens its state allows (valid UTF-8 of known characters); the rest get probability
    0 before sampling. pad (B,): left-padding of each row's prompt, for a batch of
    prompts of different lengths; each row then gives what it would give alone. states:
    each row's constraint state at the start (default b"": between characters).
    repetition_penalty, no_repeat_ngram: see penalize(), over the tokens each row writes
    here plus written (per row: what it wrote before, when an answer is resumed)."""
    block = model.context_size
    cache = None
    B = idx.size(0)
    static = use_cache and model.decode_mode in ("static", "compiled")
    if static:  # a fixed shape: rows stay in the batch, and decode_step needs every row's padding
        step = model.compiled_decode_step() if model.decode_mode == "compiled" else model.decode_step
        pad_rows = pad if pad is not None else torch.zeros(B, dtype=torch.long, device=idx.device)
    states = list(states) if states is not None else [b""] * B  # the prompt ends between characters
    rows = list(constraint) if isinstance(constraint, (list, tuple)) else [constraint] * B
    written = [list(w) for w in written] if written is not None else [[] for _ in range(B)]
    if pad is not None and idx.size(1) + max_new_tokens > block:
        raise ValueError(f"batched generation needs prompt + new tokens within block_size {block}")
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    if stop_token is not None:
        stops = torch.tensor([stop_token] if isinstance(stop_token, int) else list(stop_token), device=idx.device)
        stop_token = int(stops[0])
    active = torch.arange(B, device=idx.device)  # batched (pad given): finished rows leave the batch
    for _ in range(max_new_tokens):
        if use_cache and idx.size(1) <= block:
            if cache is None or cache.length != idx.size(1) - 1:  # (re)fill from the prompt
                cache = (
                    model.static_cache(B)
                    if static
                    else KVCache(model.config, idx.size(0), idx.device, model.lm_head.weight.dtype)
                )
                logits, _ = model(idx, kv_cache=cache, last_logits_only=True, pad=pad)
                slot = torch.tensor([cache.length], device=idx.device) if static else None
            elif static:
                if model.decode_mode == "compiled" and idx.is_cuda:
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are no longer needed
                last = idx[:, -1:].clone(memory_format=torch.contiguous_format)  # fixed strides: no recompiles
                logits = step(last, slot, pad_rows)[:, None, :]
                cache.length += 1
                slot += 1
            else:
                logits, _ = model(idx[:, -1:], kv_cache=cache, last_logits_only=True, pad=pad)
        else:
            logits, _ = model(idx[:, -block:], last_logits_only=True, pad=pad)
        next_id = choose_next(logits[:, -1, :], written, rows, states, temperature, top_k, top_p,
                              repetition_penalty, no_repeat_ngram, generator)  # (B,)
        if constraint is not None:
            states = [c.step(s, t) if c is not None else b"" for c, s, t in zip(rows, states, next_id.tolist())]
        if stop_token is not None:
            next_id = torch.where(done, torch.full_like(next_id, stop_token), next_id)
            done |= torch.isin(next_id, stops)
        for w, t in zip(written, next_id.tolist()):
            w.append(t)
        idx = torch.cat((idx, next_id[:, None]), dim=1)
        if active.numel() < B:  # every row is reported; finished ones repeat stop_token
            yield torch.full((B,), stop_token, dtype=next_id.dtype, device=next_id.device).index_copy(
                0, active, next_id
            )
        else:
            yield next_id
        if stop_token is not None and bool(done.all()):
            return
        if pad is not None and stop_token is not None and not static and bool(done.any()):
            # a finished row would only burn compute until the longest answer ends: drop it
            keep = ~done
            active, idx, pad, done = active[keep], idx[keep], pad[keep], done[keep]
            kept = keep.tolist()
            states, rows, written = ([x for x, k in zip(xs, kept) if k] for xs in (states, rows, written))
            if cache is not None:
                cache.k, cache.v = [k[keep] for k in cache.k], [v[keep] for v in cache.v]


@torch.no_grad()
def generate(model, idx, max_new_tokens, **kwargs):
    """idx (B, T) → (B, T + new tokens), as generate_stream produces them."""
    new = list(generate_stream(model, idx, max_new_tokens, **kwargs))
    return torch.cat([idx] + [t[:, None] for t in new], dim=1)


# ---------------------------------------------------------------------------- text
def text_decoder(constraint):
    """An incremental UTF-8 decoder for generated bytes: it holds back a partial character
    until it is complete. Under a constraint the bytes are valid by construction."""
    return codecs.getincrementaldecoder("utf-8")(errors="strict" if constraint else "replace")


def text_tail(decoder, constraint):
    """What is left in the decoder when generation stops. A constrained decoder only ever
    holds part of a character (cut at max_new_tokens): dropped, never printed as �."""
    return "" if constraint else decoder.decode(b"", final=True)


def stream_text(model, tok, ids, max_new_tokens=256, seed=None, stop_at_eot=False, constraint=None, **sampling):
    """Yield text pieces as tokens are generated after the prompt ids. A Chinese character
    is often split over two or three tokens: the incremental UTF-8 decoder holds a partial
    character back until it is complete, so every piece is whole characters. With a
    constraint (constraint.make_constraint) the bytes are always valid UTF-8 and a character
    left half-written at max_new_tokens is dropped; without one, bad bytes print as �.
    sampling: temperature, top_k, top_p, repetition_penalty, no_repeat_ngram, use_cache."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    decoder = text_decoder(constraint)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    for token in generate_stream(
        model,
        idx,
        max_new_tokens,
        stop_token=tok.stop_ids if stop_at_eot else None,
        generator=generator,
        constraint=constraint,
        **sampling,
    ):
        t = int(token[0])
        if t in tok.stop_ids and stop_at_eot:
            break
        piece = decoder.decode(tok.decode_bytes([t]))
        if piece:
            yield piece
    tail = text_tail(decoder, constraint)
    if tail:
        yield tail


def model_constraint(tok, ckpt, mode="chars"):
    """The decoding constraint for a loaded model: the characters of its training text."""
    return make_constraint(tok, mode, ckpt.get("chars"))


def model_template(ckpt):
    """The chat template a model was fine-tuned with (recorded by train.py from the SFT
    data's meta.json); 问/答 for pretrained models and older checkpoints."""
    return ckpt.get("template") or "qa"


def chat_prompt(tok, history, question, block_size, max_new_tokens, template="qa"):
    """Prompt ids for the next answer in the model's chat template, and the history actually
    kept: the oldest turns are dropped (whole question/answer pairs) until the prompt leaves
    room for max_new_tokens."""
    history = list(history)
    budget = block_size - max_new_tokens
    while True:
        ids = render_prompt(tok, history, question, template)
        if len(ids) <= budget:
            return ids, history
        if not history:
            raise ValueError(
                f"the question is {len(ids)} tokens; with {max_new_tokens} new tokens it does not fit "
                f"the model's {block_size}-token context — shorten it or lower max_new_tokens"
            )
        history = history[2:] if len(history) >= 2 else []


def answer(model, tok, history, question, constraint=None, template="qa", **kwargs):
    """Stream the model's answer to question, given earlier turns [{"role","content"},...].
    The constraint also allows the characters of the conversation."""
    ids, kept = chat_prompt(tok, history, question, model.context_size, kwargs.get("max_new_tokens", 256), template)
    if constraint is not None:
        constraint = constraint.with_chars(question + "".join(m["content"] for m in kept))
    yield from stream_text(model, tok, ids, stop_at_eot=True, constraint=constraint, **kwargs)


def answer_batch(
    model, tok, questions, constraint=None, max_new_tokens=96, seed=None, batch_size=16, template="qa", **sampling
):
    """Answers to many single-turn questions, batch_size rows at a time: the prompts are
    left-padded and each row stops on its own. A finished row makes room: once half the
    rows have finished and questions are waiting, the batch is rebuilt from the unfinished
    rows (their prompt plus what they wrote so far, prefilled again) and new questions, so
    the long answers do not run on in a nearly empty batch. Answers equal answer()'s,
    token for token, greedy or under the penalties (tested); each row's constraint also
    allows its own question's characters. sampling: as stream_text (default greedy)."""
    sampling = dict(GREEDY, **sampling)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    prompts = [chat_prompt(tok, [], q, model.context_size, max_new_tokens, template)[0] for q in questions]
    rows = [constraint.with_chars(q) if constraint is not None else None for q in questions]
    written = [[] for _ in questions]  # each answer's tokens, without the end token
    done = [False] * len(questions)
    waiting, active = list(range(len(questions))), []
    while waiting or active:
        take = batch_size - len(active)
        active, waiting = active + waiting[:take], waiting[take:]
        idx, pad = left_padded([prompts[i] + written[i] for i in active], tok.eot, device)
        budget = min(
            max_new_tokens - len(written[i]) for i in active
        )  # the round ends when the first row is out of tokens
        states = [partial_character(tok, written[i]) for i in active]
        finished = 0
        for step in generate_stream(
            model,
            idx,
            budget,
            stop_token=tok.stop_ids,
            generator=generator,
            pad=pad,
            states=states,
            written=[written[i] for i in active],
            constraint=[rows[i] for i in active] if constraint is not None else None,
            **sampling,
        ):
            for i, t in zip(active, step.tolist()):
                if done[i]:
                    continue
                if t in tok.stop_ids:
                    done[i] = True
                else:
                    written[i].append(t)
                    done[i] = len(written[i]) >= max_new_tokens
                finished += done[i]
            if waiting and finished * 2 >= len(active):
                break
        active = [i for i in active if not done[i]]
    out = []
    for ids in written:
        decoder = text_decoder(constraint)
        out.append(decoder.decode(tok.decode_bytes(ids)) + text_tail(decoder, constraint))
    return out


def left_padded(contexts, pad_id, device):
    """A batch of token lists of different lengths, left-padded with pad_id: (ids (B, T),
    pad (B,): each row's padding), as GPT.forward(pad=...) takes them."""
    width = max(map(len, contexts))
    return (
        torch.tensor([[pad_id] * (width - len(c)) + c for c in contexts], device=device),
        torch.tensor([width - len(c) for c in contexts], device=device),
    )


def partial_character(tok, ids):
    """The bytes of a character the tokens left half-written (b"" between characters): the
    decoding constraint's state after them."""
    decoder = text_decoder(None)
    decoder.decode(tok.decode_bytes(ids))
    return decoder.getstate()[0]
