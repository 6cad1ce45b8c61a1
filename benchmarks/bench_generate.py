"""
Generation speed, batch 1: tokens/s with the KV cache vs recomputing the whole context at
every step, measured in one run on the same model and prompt (greedy, so both paths
produce the same tokens; the script checks that). With a checkpoint and --sft_data, also
the held-out questions answered one by one vs batched (left-padded, --gen_batch at a
time), greedy with the decoding constraint; the answers must be identical.

  python benchmarks/bench_generate.py --out_dir=out/tiny-sft --sft_data=data/sft
  python benchmarks/bench_generate.py --config=config/train_config.py   # random weights, 45M shape
  python benchmarks/bench_generate.py --out_dir=out/sft --decode=eager,compiled --batch=32   # on a GPU

--decode times each decode mode (model.decode_mode: eager, static, compiled) at batch 1
and at --batch rows, and says whether its greedy tokens equal the eager ones.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_utils import UserError, pick_device, run_cli  # noqa: E402
from miniglm.checkpoint import load_model  # noqa: E402
from miniglm.generation import answer, answer_batch, generate, model_constraint  # noqa: E402
from miniglm.metrics import held_out_questions  # noqa: E402
from miniglm.tokenizer import GPT2  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from train import load_config  # noqa: E402


def timed(model, idx, n, use_cache, device):
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = generate(model, idx, n, temperature=0, use_cache=use_cache)
    sync()
    return out, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", help="checkpoint (out_dir or .pt) to load")
    p.add_argument("--config", help="or: a training config; the model gets random weights")
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--sft_data", help="with --out_dir: time answering its held-out questions, batched vs one by one")
    p.add_argument("--questions", type=int, default=40)
    p.add_argument("--gen_batch", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=96)
    p.add_argument(
        "--decode", help="comma-separated decode modes to time at batch 1 and --batch: eager, static, compiled"
    )
    p.add_argument("--batch", type=int, default=32, help="rows for --decode's batched figure")
    args = p.parse_args()
    device = pick_device(args.device)
    if args.out_dir:
        model, tok, ckpt = load_model(args.out_dir, device)
    elif args.config:
        c = load_config([args.config])
        torch.manual_seed(0)
        model = (
            GPT(GPTConfig(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["block_size"]))
            .to(device)
            .eval()
        )
        tok = GPT2
    else:
        raise UserError("give --out_dir or --config")
    n = min(args.new_tokens, model.context_size - 8)  # (a P-Tuning prefix takes positions)
    idx = torch.tensor([tok.encode("问:请背诵《静夜思》。\n答:")[:8]], device=device)
    timed(model, idx, 8, True, device)  # warm-up
    cached, t_cache = timed(model, idx, n, True, device)
    plain, t_plain = timed(model, idx, n, False, device)
    assert torch.equal(cached, plain), "KV cache and recompute disagree"
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"{name}: {model.num_params() / 1e6:.1f}M params, batch 1, {n} new tokens: "
        f"KV cache {n / t_cache:,.0f} tok/s, recompute {n / t_plain:,.0f} tok/s, speed-up x{t_plain / t_cache:.1f}"
    )
    if args.decode:
        decode_modes(model, idx, n, args.decode.split(","), args.batch, device)
    if args.out_dir and args.sft_data:
        batched_vs_one_by_one(model, tok, ckpt, args)


def decode_modes(model, idx, n, modes, batch, device):
    """Tokens/s of each decode mode at batch 1 and at `batch` rows (different prompts, no
    stop token, so every row writes n tokens), and whether its greedy tokens equal eager's."""
    rows = torch.cat(
        [
            idx,
            torch.randint(
                0, model.config.vocab_size, (batch - 1, idx.size(1)), generator=torch.Generator().manual_seed(0)
            ).to(device),
        ]
    )
    want = {}
    for mode in ["eager"] + [m for m in modes if m != "eager"]:
        model.decode_mode = mode
        line = []
        for b in (1, batch):
            timed(model, rows[:b], n, True, device)  # warm-up: compiles and captures the CUDA graph for this shape
            out, t = timed(model, rows[:b], n, True, device)
            same = "" if mode == "eager" else f", {int((out == want[b]).all(1).sum())}/{b} rows equal eager's"
            want.setdefault(b, out)
            line.append(f"batch {b}: {b * n / t:,.0f} tok/s ({t / n * 1000:.2f} ms/step{same})")
        print(f"decode {mode}: " + "; ".join(line))
    model.decode_mode = "eager"


def batched_vs_one_by_one(model, tok, ckpt, args):
    questions = [q for q, _ in held_out_questions(args.sft_data, args.questions)]
    if not questions:
        raise UserError(f"no held-out questions in {args.sft_data}/sft_val.jsonl")
    constraint = model_constraint(tok, ckpt)
    # warm-up: every constraint mask these answers reach is computed (and cached) before either clock runs
    answer_batch(
        model, tok, questions, constraint=constraint, max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch
    )
    t0 = time.perf_counter()
    one = [
        "".join(answer(model, tok, [], q, constraint=constraint, max_new_tokens=args.max_new_tokens, temperature=0))
        for q in questions
    ]
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = answer_batch(
        model, tok, questions, constraint=constraint, max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch
    )
    t_batch = time.perf_counter() - t0
    assert batched == one, "batched and one-by-one greedy answers differ"
    chars = sum(map(len, one))
    print(
        f"{len(questions)} held-out questions, greedy, max {args.max_new_tokens} new tokens: one by one "
        f"{t_one:.1f}s ({chars / t_one:,.0f} chars/s), batched x{args.gen_batch} {t_batch:.1f}s "
        f"({chars / t_batch:,.0f} chars/s): speed-up x{t_one / t_batch:.1f}, identical answers"
    )


if __name__ == "__main__":
    run_cli(main)
