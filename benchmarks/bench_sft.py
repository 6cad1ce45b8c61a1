"""
SFT efficiency: trained (mask-1) tokens per second with padded rows and with packed rows
(prepare_sft.py --pack), the same model and batch, measured in one run. The default SFT
set is built both ways into a temporary folder first.

  python benchmarks/bench_sft.py                                   # tiny CPU shape, trimmed vocabulary
  python benchmarks/bench_sft.py --n_layer 6 --n_head 8 --n_embd 512 --vocab gpt2 --batch_size 32   # 45M (GPU)
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from data_utils import SFTData, UserError, pick_device, run_cli  # noqa: E402
from data.prepare_sft import vocabulary  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from train import pick_dtype  # noqa: E402


def build(out_dir, args, *extra):
    cmd = [sys.executable, str(ROOT / "data" / "prepare_sft.py"), "--poems", *args.poems, "--out_dir", str(out_dir),
           "--block_size", str(args.block_size), "--vocab", args.vocab, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise UserError(f"prepare_sft.py failed: {proc.stderr.strip()}")
    return json.loads((Path(out_dir) / "meta.json").read_text())


def trained_tokens_per_s(data_dir, tok, args, device):
    """(ms per step, trained tokens per step, trained tokens/s) over args.iters steps."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                          block_size=args.block_size - 1, vocab_size=tok.vocab_size)).to(device)
    data = SFTData(data_dir, args.block_size - 1, tok)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = getattr(torch, pick_dtype({"dtype": "auto"}, device_type))
    amp = nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)
    opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device_type)
    step_model = torch.compile(model) if device_type == "cuda" and args.compile else model
    gen = torch.Generator().manual_seed(0)
    batches = [data.get_batch("train", args.batch_size, gen, device) for _ in range(args.iters + 2)]
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    trained = 0
    for i, b in enumerate(batches):
        if i == 2:  # two warm-up steps (and compilation), then the clock
            sync()
            t0, trained = time.perf_counter(), 0
        with amp:
            _, loss = step_model(b["x"], b["y"], b["loss_mask"], b.get("segment_ids"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        trained += int(b["loss_mask"].sum())
    sync()
    dt = time.perf_counter() - t0
    return dt / args.iters * 1000, trained / args.iters, trained / dt


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--poems", nargs="+", default=[str(ROOT / "data" / "fortunes-zh" / "docs.jsonl")],
                   help="the default set's poems (data/fetch_data.py fortunes-zh)")
    p.add_argument("--vocab", default=str(ROOT / "data" / "fortunes-zh"),
                   help="'gpt2', or a folder with vocab.json / a checkpoint (default: fortunes-zh's trimmed vocabulary)")
    p.add_argument("--block_size", type=int, default=256, help="row length, as prepare_sft.py's")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=192)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--compile", type=int, default=1, help="torch.compile on CUDA")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    for path in args.poems:
        if not Path(path).exists():
            raise UserError(f"{path} not found: run data/fetch_data.py fortunes-zh first")
    device = pick_device(args.device)
    tok = vocabulary(args.vocab)
    print(f"device: {torch.cuda.get_device_name() if device.startswith('cuda') else device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads; model {args.n_layer}x{args.n_embd}, vocabulary {tok.name}, "
          f"batch {args.batch_size}x{args.block_size - 1}, {args.iters} steps each")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, extra in (("padded", []), ("packed", ["--pack"])):
            meta = build(Path(tmp) / mode, args, *extra)
            ms, per_step, per_s = trained_tokens_per_s(Path(tmp) / mode, tok, args, device)
            results[mode] = per_s
            print(f"{mode:>7}: {meta['train_rows']:,} rows for {meta['train_samples']:,} samples, "
                  f"{meta['train_mask_share'] * 100:.1f}% of tokens trained; {ms:.0f} ms/step, "
                  f"{per_step:,.0f} trained tokens/step, {per_s:,.0f} trained tokens/s")
    print(f"packed / padded trained tokens per second: {results['packed'] / results['padded']:.2f}x")


if __name__ == "__main__":
    run_cli(main)
