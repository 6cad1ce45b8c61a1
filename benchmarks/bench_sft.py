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
from data.prepare_sft import vocabulary  # noqa: E402
from data_utils import SFTData, UserError, pick_device, run_cli  # noqa: E402
from miniglm.distributed import pick_dtype  # noqa: E402
from miniglm.optimizers import configure_optimizers  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def build(out_dir, args, *extra):
    cmd = [sys.executable, str(ROOT / "data" / "prepare_sft.py"), "--poems", *args.poems, "--out_dir", str(out_dir),
           "--block_size", str(args.block_size), "--vocab", args.vocab, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise UserError(f"prepare_sft.py failed: {proc.stderr.strip()}")
    return json.loads((Path(out_dir) / "meta.json").read_text())


class Run:
    """One model training on one data set; step() returns (seconds, trained tokens)."""

    def __init__(self, data_dir, tok, args, device):
        torch.manual_seed(0)  # both runs start from the same weights
        self.model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                                   block_size=args.block_size - 1, vocab_size=tok.vocab_size)).to(device)
        data = SFTData(data_dir, args.block_size - 1, tok)
        device_type = "cuda" if device.startswith("cuda") else "cpu"
        dtype = getattr(torch, pick_dtype({"dtype": "auto"}, device_type))
        self.amp = nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)
        self.opt = configure_optimizers(self.model, 0.1, 1e-4, (0.9, 0.95), device_type)
        self.step_model = torch.compile(self.model) if device_type == "cuda" and args.compile else self.model
        gen = torch.Generator().manual_seed(0)
        self.batches = [data.get_batch("train", args.batch_size, gen, device) for _ in range(args.iters + 2)]
        self.sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)

    def step(self, i):
        b = self.batches[i]
        self.sync()
        t0 = time.perf_counter()
        with self.amp:
            _, loss = self.step_model(b["x"], b["y"], b["loss_mask"], b.get("segment_ids"))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sync()
        return time.perf_counter() - t0, int(b["loss_mask"].sum())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--poems", nargs="+", default=[str(ROOT / "data" / "fortunes-zh" / "docs.jsonl")],
                   help="the default set's poems (data/fetch_data.py fortunes-zh)")
    p.add_argument(
        "--vocab",
        default=str(ROOT / "data" / "fortunes-zh"),
        help="'gpt2', a folder with vocab.json, a bpe-N.json or a checkpoint "
        "(default: fortunes-zh's trimmed vocabulary)",
    )
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
    print(
        f"device: {torch.cuda.get_device_name() if device.startswith('cuda') else device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads; model {args.n_layer}x{args.n_embd}, vocabulary {tok.name}, "
        f"batch {args.batch_size}x{args.block_size - 1}, {args.iters} steps each"
    )
    with tempfile.TemporaryDirectory() as tmp:
        modes = {"padded": [], "packed": ["--pack"]}
        metas = {m: build(Path(tmp) / m, args, *extra) for m, extra in modes.items()}
        runs = {m: Run(Path(tmp) / m, tok, args, device) for m in modes}
        totals = {m: [0.0, 0] for m in modes}
        # the steps alternate (padded, packed, padded, ...) so that a slower or busier
        # moment of the machine costs both the same; the first two of each warm up
        for i in range(args.iters + 2):
            for m, run in runs.items():
                dt, trained = run.step(i)
                if i >= 2:
                    totals[m][0] += dt
                    totals[m][1] += trained
    for m, (seconds, trained) in totals.items():
        meta = metas[m]
        print(
            f"{m:>7}: {meta['train_rows']:,} rows for {meta['train_samples']:,} samples, "
            f"{meta['train_mask_share'] * 100:.1f}% of tokens trained; {seconds / args.iters * 1000:.0f} ms/step, "
            f"{trained / args.iters:,.0f} trained tokens/step, {trained / seconds:,.0f} trained tokens/s"
        )
    speed = {m: t / s for m, (s, t) in totals.items()}
    print(f"packed / padded trained tokens per second: {speed['packed'] / speed['padded']:.2f}x")


if __name__ == "__main__":
    run_cli(main)
