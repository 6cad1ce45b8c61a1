"""
Sample from a trained model, streaming tokens as they come (KV cache).

  python sample.py --out_dir=out/tiny-pretrain --start="《静夜思》" --num_samples=3
  python sample.py --out_dir=out/tiny-sft --chat --start="《静夜思》的作者是谁?"
  python sample.py --out_dir=out/tiny-sft --chat          # interactive chat: /reset, /exit
  python sample.py --out_dir=out/tiny-pretrain --start=FILE:prompt.txt

The text-level generation used by sample_gradio.py and evaluations.py lives here too:
stream_text() and chat_prompt().
"""
import argparse
import codecs
import sys
from pathlib import Path

import torch

from checkpoint import load_model
from data_utils import UserError, pick_device, run_cli
from tokenizer import CONSTRAINTS, make_constraint, render_prompt


def stream_text(model, tok, ids, max_new_tokens=256, temperature=0.8, top_k=None, top_p=None, seed=None,
                stop_at_eot=False, use_cache=True, constraint=None):
    """Yield text pieces as tokens are generated after the prompt ids. A Chinese character
    is often split over two or three tokens: the incremental UTF-8 decoder holds a partial
    character back until it is complete, so every piece is whole characters. With a
    constraint (tokenizer.make_constraint) the bytes are always valid UTF-8 and a character
    left half-written at max_new_tokens is dropped; without one, bad bytes print as �."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict" if constraint else "replace")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    for token in model.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                       stop_token=tok.eot if stop_at_eot else None, use_cache=use_cache,
                                       generator=generator, constraint=constraint):
        t = int(token[0])
        if t == tok.eot and stop_at_eot:
            break
        piece = decoder.decode(tok.token_bytes[t] if t != tok.eot else b"<|endoftext|>")
        if piece:
            yield piece
    if not constraint:  # a constrained decoder only ever holds back part of a character: drop it
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail


def model_constraint(tok, ckpt, mode="chars", prompt=""):
    """The decoding constraint for a loaded model: its training characters (and the prompt's)."""
    constraint = make_constraint(tok, mode, ckpt.get("chars"))
    return constraint.with_chars(prompt) if constraint is not None else None


def chat_prompt(tok, history, question, block_size, max_new_tokens):
    """Prompt ids for the next answer, and the history actually kept: the oldest turns are
    dropped (whole 问/答 pairs) until the prompt leaves room for max_new_tokens."""
    history = list(history)
    budget = block_size - max_new_tokens
    while True:
        ids = render_prompt(tok, history, question)
        if len(ids) <= budget:
            return ids, history
        if not history:
            raise ValueError(f"the question is {len(ids)} tokens; with {max_new_tokens} new tokens it does not fit "
                             f"the model's {block_size}-token context — shorten it or lower max_new_tokens")
        history = history[2:] if len(history) >= 2 else []


def answer(model, tok, history, question, constraint=None, **kwargs):
    """Stream the model's answer to question, given earlier turns [{"role","content"},...].
    The constraint also allows the characters of the conversation."""
    ids, kept = chat_prompt(tok, history, question, model.config.block_size, kwargs.get("max_new_tokens", 256))
    if constraint is not None:
        constraint = constraint.with_chars(question + "".join(m["content"] for m in kept))
    yield from stream_text(model, tok, ids, stop_at_eot=True, constraint=constraint, **kwargs)


def answer_batch(model, tok, questions, constraint=None, max_new_tokens=96, temperature=0, top_k=None, top_p=None,
                 seed=None, batch_size=16):
    """Answers to many single-turn questions, batch_size at a time: the prompts are
    left-padded and each row stops on its own. Greedy answers equal answer()'s, token for
    token (tested); each row's constraint also allows its own question's characters."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out = []
    for i in range(0, len(questions), batch_size):
        chunk = questions[i:i + batch_size]
        prompts = [chat_prompt(tok, [], q, model.config.block_size, max_new_tokens)[0] for q in chunk]
        width = max(map(len, prompts))
        idx = torch.tensor([[tok.eot] * (width - len(p)) + p for p in prompts], device=device)
        pad = torch.tensor([width - len(p) for p in prompts], device=device)
        rows = [constraint.with_chars(q) if constraint is not None else None for q in chunk]
        tokens = [[] for _ in chunk]
        for step in model.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                          stop_token=tok.eot, generator=generator, pad=pad,
                                          constraint=rows if constraint is not None else None):
            for r, t in enumerate(step.tolist()):
                if not tokens[r] or tokens[r][-1] != tok.eot:
                    tokens[r].append(t)
        for r, ids in enumerate(tokens):
            ids = ids[:-1] if ids and ids[-1] == tok.eot else ids
            decoder = codecs.getincrementaldecoder("utf-8")(errors="strict" if constraint else "replace")
            text = decoder.decode(tok.decode_bytes(ids))  # a half-written last character stays in the decoder
            out.append(text if constraint else text + decoder.decode(b"", final=True))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out/tiny-sft", help="a training out_dir (uses best.pt) or a .pt file")
    p.add_argument("--start", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--chat", action="store_true", help="问/答 template; without --start, an interactive chat")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--constrain", default="chars", choices=CONSTRAINTS,
                   help="chars: only valid UTF-8 made of characters seen in training or the prompt (default); "
                        "utf8: any valid character; off: raw tokens, stray bytes print as � (byte-level BPE laid bare)")
    args = p.parse_args()
    if args.temperature < 0 or args.max_new_tokens < 1:
        raise UserError("--temperature must be >= 0 and --max_new_tokens >= 1")

    model, tok, ckpt = load_model(args.out_dir, pick_device(args.device))
    constraint = model_constraint(tok, ckpt, args.constrain)
    if args.chat and ckpt.get("kind") != "sft":
        print(f"warning: {args.out_dir} holds a pretrained model that was not fine-tuned on 问/答; "
              f"its answers will ramble (train SFT first: see README)", file=sys.stderr)
    start = args.start
    if start and start.startswith("FILE:"):
        path = Path(start[5:])
        if not path.is_file():
            raise UserError(f"{path}: prompt file not found")
        start = path.read_text(encoding="utf-8")
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)

    if args.chat and start is None:
        return interactive_chat(model, tok, constraint, gen, args.seed)
    for i in range(args.num_samples):
        seed = args.seed + i
        if args.chat:
            try:
                pieces = answer(model, tok, [], start, constraint=constraint, seed=seed, **gen)
                print("答:", end="", flush=True)
                for piece in pieces:
                    print(piece, end="", flush=True)
            except ValueError as e:
                raise UserError(str(e)) from None
        else:
            ids = tok.encode(start or "\n")[-model.config.block_size:]
            print(start or "", end="", flush=True)
            allowed = constraint.with_chars(start or "") if constraint else None
            for piece in stream_text(model, tok, ids, seed=seed, constraint=allowed, **gen):
                print(piece, end="", flush=True)
        print("\n" + "-" * 40 if i + 1 < args.num_samples else "")


def interactive_chat(model, tok, constraint, gen, seed):
    print("MiniGLM chat — type a question; /reset clears the history, /exit quits.")
    history = []
    while True:
        try:
            question = input("问: ").strip()
        except EOFError:
            print()
            return
        if question in ("/exit", "/quit"):
            return
        if question == "/reset":
            history = []
            print("(history cleared)")
            continue
        if not question:
            continue
        try:
            _, history = chat_prompt(tok, history, question, model.config.block_size, gen["max_new_tokens"])
        except ValueError as e:
            print(f"({e})")
            continue
        print("答: ", end="", flush=True)
        reply = ""
        for piece in answer(model, tok, history, question, constraint=constraint, seed=seed, **gen):
            reply += piece
            print(piece, end="", flush=True)
        print()
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


if __name__ == "__main__":
    run_cli(main)
