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
from tokenizer import EOT, encode, get_tokenizer, render_prompt


def stream_text(model, ids, max_new_tokens=256, temperature=0.8, top_k=None, top_p=None, seed=None,
                stop_at_eot=False, use_cache=True):
    """Yield text pieces as tokens are generated after the prompt ids. A Chinese character
    is often split over two tokens: the incremental UTF-8 decoder holds a partial
    character back until it is complete, so every piece is valid text."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    enc = get_tokenizer()
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    for token in model.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                       stop_token=EOT if stop_at_eot else None, use_cache=use_cache,
                                       generator=generator):
        t = int(token[0])
        if t == EOT and stop_at_eot:
            break
        piece = decoder.decode(enc.decode_single_token_bytes(t) if t <= EOT else b"")
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def chat_prompt(history, question, block_size, max_new_tokens):
    """Prompt ids for the next answer, and the history actually kept: the oldest turns are
    dropped (whole 问/答 pairs) until the prompt leaves room for max_new_tokens."""
    history = list(history)
    budget = block_size - max_new_tokens
    while True:
        ids = render_prompt(history, question)
        if len(ids) <= budget:
            return ids, history
        if not history:
            raise ValueError(f"the question is {len(ids)} tokens; with {max_new_tokens} new tokens it does not fit "
                             f"the model's {block_size}-token context — shorten it or lower max_new_tokens")
        history = history[2:] if len(history) >= 2 else []


def answer(model, history, question, **kwargs):
    """Stream the model's answer to question, given earlier turns [{"role","content"},...]."""
    ids, _ = chat_prompt(history, question, model.config.block_size, kwargs.get("max_new_tokens", 256))
    yield from stream_text(model, ids, stop_at_eot=True, **kwargs)


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
    args = p.parse_args()
    if args.temperature < 0 or args.max_new_tokens < 1:
        raise UserError("--temperature must be >= 0 and --max_new_tokens >= 1")

    model, ckpt = load_model(args.out_dir, pick_device(args.device))
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
        return interactive_chat(model, gen, args.seed)
    for i in range(args.num_samples):
        seed = args.seed + i
        if args.chat:
            try:
                pieces = answer(model, [], start, seed=seed, **gen)
                print("答:", end="", flush=True)
                for piece in pieces:
                    print(piece, end="", flush=True)
            except ValueError as e:
                raise UserError(str(e)) from None
        else:
            ids = encode(start or "\n")[-model.config.block_size:]
            print(start or "", end="", flush=True)
            for piece in stream_text(model, ids, seed=seed, **gen):
                print(piece, end="", flush=True)
        print("\n" + "-" * 40 if i + 1 < args.num_samples else "")


def interactive_chat(model, gen, seed):
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
            ids, history = chat_prompt(history, question, model.config.block_size, gen["max_new_tokens"])
        except ValueError as e:
            print(f"({e})")
            continue
        print("答: ", end="", flush=True)
        reply = ""
        for piece in stream_text(model, ids, stop_at_eot=True, seed=seed, **gen):
            reply += piece
            print(piece, end="", flush=True)
        print()
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


if __name__ == "__main__":
    run_cli(main)
