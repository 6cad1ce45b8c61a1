"""
Sample from a trained model, streaming tokens as they come (KV cache).

  python sample.py --out_dir=out/tiny-pretrain --start="《静夜思》" --num_samples=3
  python sample.py --out_dir=out/tiny-sft --chat --start="《静夜思》的作者是谁?"
  python sample.py --out_dir=out/tiny-sft --chat          # interactive chat: /reset, /exit
  python sample.py --out_dir=out/tiny-pretrain --start=FILE:prompt.txt

Answers (--chat) are decoded with generation.DEFAULT_DECODING (greedy with a repetition
penalty), text after --start with generation.WRITING (sampled, so samples differ); the
flags override either. Generation itself is in miniglm/generation.py.
"""
import argparse
import sys
from pathlib import Path

from data_utils import UserError, invalid_unicode, pick_device, run_cli
from miniglm.checkpoint import load_model
from miniglm.constraint import CONSTRAINTS
from miniglm.generation import (
    DEFAULT_DECODING,
    WRITING,
    add_decoding_flags,
    answer,
    chat_prompt,
    decoding_from_flags,
    model_constraint,
    model_template,
    stream_text,
)
from model import DECODE_MODES


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out/tiny-sft", help="a training out_dir (uses best.pt) or a .pt file")
    p.add_argument("--base", help="for an adapter (LoRA, P-Tuning): its base checkpoint, if not where it was trained")
    p.add_argument("--start", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--chat", action="store_true", help="the model's chat template (问/答 or ChatML, from its "
                                                     "checkpoint); without --start, an interactive chat")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=200)
    add_decoding_flags(p)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--decode", default="eager", choices=DECODE_MODES,
                   help="decode steps: eager (a growing KV cache; best on a CPU), static (a fixed-shape cache), "
                        "compiled (fixed shape under torch.compile: CUDA graphs on a GPU)")
    p.add_argument("--constrain", default="chars", choices=CONSTRAINTS,
                   help="chars: only valid UTF-8 made of characters seen in training or the prompt (default); "
                        "utf8: any valid character; off: raw tokens, stray bytes print as � (byte-level BPE laid bare)")
    args = p.parse_args()
    if args.max_new_tokens < 1:
        raise UserError("--max_new_tokens must be >= 1")
    gen = dict(
        decoding_from_flags(args, DEFAULT_DECODING if args.chat else WRITING), max_new_tokens=args.max_new_tokens
    )

    start = args.start
    if start and start.startswith("FILE:"):
        path = Path(start[5:])
        if not path.is_file():
            raise UserError(f"{path}: prompt file not found")
        try:
            start = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    if start and invalid_unicode(start):  # bytes that are not UTF-8 on the command line arrive as surrogates
        raise UserError(f"--start {invalid_unicode(start).removeprefix('text ')}; the prompt must be UTF-8")

    model, tok, ckpt = load_model(args.out_dir, pick_device(args.device), args.decode, args.base)
    print(f"weights: {ckpt['weights']}", file=sys.stderr)  # (stderr: the sampled text alone goes to stdout)
    constraint, template = model_constraint(tok, ckpt, args.constrain), model_template(ckpt)
    if args.chat and ckpt.get("kind") != "sft":
        print(
            f"warning: {args.out_dir} holds a pretrained model that was not fine-tuned on 问/答; "
            f"its answers will ramble (train SFT first: see README)",
            file=sys.stderr,
        )
    if args.chat and start is None:
        return interactive_chat(model, tok, constraint, template, gen, args.seed)
    for i in range(args.num_samples):
        seed = args.seed + i
        if args.chat:
            try:
                pieces = answer(model, tok, [], start, constraint=constraint, template=template, seed=seed, **gen)
                print("答:", end="", flush=True)
                for piece in pieces:
                    print(piece, end="", flush=True)
            except ValueError as e:
                raise UserError(str(e)) from None
        else:
            ids = tok.encode(start or "\n")[-model.context_size :]
            print(start or "", end="", flush=True)
            allowed = constraint.with_chars(start or "") if constraint else None
            for piece in stream_text(model, tok, ids, seed=seed, constraint=allowed, **gen):
                print(piece, end="", flush=True)
        print("\n" + "-" * 40 if i + 1 < args.num_samples else "")


def interactive_chat(model, tok, constraint, template, gen, seed):
    print("MiniGLM chat — type a question; /reset clears the history, /exit quits.")
    history = []
    while True:
        try:
            question = input("问: ").strip()
        except EOFError:
            print()
            return
        except UnicodeDecodeError:
            question = None  # bytes that are not UTF-8 (or, below, arrived as surrogates)
        if question is None or invalid_unicode(question):
            print("(that line is not valid UTF-8 text; type it again)")
            continue
        if question in ("/exit", "/quit"):
            return
        if question == "/reset":
            history = []
            print("(history cleared)")
            continue
        if not question:
            continue
        try:
            _, history = chat_prompt(tok, history, question, model.context_size, gen["max_new_tokens"], template)
        except ValueError as e:
            print(f"({e})")
            continue
        print("答: ", end="", flush=True)
        reply = ""
        for piece in answer(model, tok, history, question, constraint=constraint, template=template, seed=seed, **gen):
            reply += piece
            print(piece, end="", flush=True)
        print()
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


if __name__ == "__main__":
    run_cli(main)
