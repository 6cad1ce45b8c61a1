"""
Training throughput of a config: tokens/s and an MFU-style ratio (achieved FLOP/s over the
FLOP/s of a large matmul measured in the same run, same dtype).

  python benchmarks/bench_train.py config/train_tiny_cpu.py config/train_config.py --iters=5
  python benchmarks/bench_train.py config/train_config.py --batch_size=8 --block_size=256 \\
      --loss_chunk_rows=512,0 --profile
  python benchmarks/bench_train.py config/train_config.py --iters=20 --loss_chunk_rows=4096,1024,0 --profile  # GPU

--profile adds where one step's time goes (torch.profiler, self time of each op, grouped).
--optimizer times one optimizer step against one forward + backward of the same model, for
AdamW alone and for Muon with its Newton-Schulz iteration in fp32 and in bf16 (the guard that
an optimizer step costing more than the model's step shows up here, not in a user's demo):

  python benchmarks/bench_train.py config/train_tiny_cpu.py --optimizer --iters=20
  ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_train.py config/train_tiny_cpu.py --optimizer  # as an AVX2-only CPU

--parallel runs train.py itself under torchrun for each world size in --worlds and each way
of spreading the model (ddp; fsdp = ZeRO-3-like; fsdp-zero2 = reshard_after_forward False) and
reports, per process, the bytes of weights, gradients and optimizer state it holds, its peak
memory (RSS on the CPU, max_memory_allocated on CUDA) and the tokens/s of the whole run:

  python benchmarks/bench_train.py config/train_config.py --parallel=ddp,fsdp,fsdp-zero2 --worlds=1,2,4 \
      --batch_size=2 --block_size=256 --iters=4
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_utils import pick_device, run_cli  # noqa: E402
from miniglm.distributed import measure_peak_flops, pick_dtype, pick_loss_chunk_rows  # noqa: E402
from miniglm.optimizers import configure_optimizers, pick_ns_dtype  # noqa: E402
from miniglm.tokenizer import data_vocabulary  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from train import load_config  # noqa: E402


def where_time_goes(step, cuda=False):
    """One profiled step: the time of each op (CPU: self time) or kernel (CUDA: GPU time)
    grouped into the parts that matter; on CUDA also the share the GPU sat idle."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        with record_function("step"):
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
    parts = defaultdict(float)
    if cuda:
        for e in prof.key_averages():
            if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0:
                parts[gpu_part(e.key)] += e.self_device_time_total / 1e6
        parts["GPU idle (launch gaps, host work)"] = max(0.0, wall - sum(parts.values()))
    else:
        for e in prof.events():
            if e.name != "step":
                parts[cpu_part(e)] += e.self_cpu_time_total / 1e6
    total = sum(parts.values())
    for part, t in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"    {t * 1000:8.1f} ms  {t / total * 100:5.1f}%  {part}")
    print(f"    {total * 1000:8.1f} ms  100.0%  one profiled step (the profiler adds a little)")


def cpu_part(e):
    inside, parent = [], e.cpu_parent
    while parent is not None:
        inside.append(parent.name)
        parent = parent.cpu_parent
    inside = " ".join(inside)
    matmul = e.name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")
    if "Optimizer.step" in inside or e.name.startswith("Optimizer.step"):
        return "optimizer (AdamW)"
    if "LinearCrossEntropy" in inside or e.name == "LinearCrossEntropy":
        return "output layer + loss: matmuls" if matmul else "output layer + loss: softmax, indexing"
    if "log_softmax" in e.name or "nll_loss" in e.name or "cross_entropy" in e.name:
        return "output layer + loss: softmax, indexing"
    if matmul:
        return "other matmuls (attention/MLP projections, output layer without the fused loss)"
    if "scaled_dot_product" in e.name:
        return "attention (SDPA)"
    return "everything else (LayerNorm, GELU, embeddings, residual adds, autograd)"


def gpu_part(kernel):
    k = kernel.lower()
    if any(s in k for s in ("gemm", "cutlass", "cublas", "xmma", "nvjet", "matmul")):
        return "matmuls (all layers and the output layer)"
    if any(s in k for s in ("flash", "fmha", "attention")):
        return "attention (SDPA)"
    if any(s in k for s in ("adam", "foreach", "multi_tensor")):
        return "optimizer (AdamW)"
    if any(s in k for s in ("softmax", "nll", "cross_entropy")):
        return "loss: softmax and cross-entropy kernels"
    if "memcpy" in k or "memset" in k:
        return "copies and fills"
    return "other kernels (fused elementwise: LayerNorm, GELU, adds, casts)"


def bench(
    config_path,
    iters,
    device,
    batch_size,
    block_size=None,
    profile=False,
    loss_chunk_rows=(None,),
    compile="auto",
    compile_mode="default",
):
    """Steps of each loss_chunk_rows setting alternate (one at a time on the CPU, in blocks
    of `iters` on a GPU), so a busy moment of a shared machine costs each the same; the
    median is reported."""
    c = load_config([config_path])
    c["block_size"] = block_size or c["block_size"]
    torch.manual_seed(0)
    vocab = data_vocabulary(c["data_dir"], c["vocab"], c["vocab_size"]).vocab_size  # trimmed/bpe: the config's data
    model = GPT(
        GPTConfig(
            n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["block_size"], vocab_size=vocab
        )
    )
    model.to(device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    default_rows = pick_loss_chunk_rows(c["loss_chunk_rows"], device_type)  # what train.py would use
    dtype = getattr(torch, pick_dtype(dict(c, dtype="auto"), device_type))
    amp = nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)
    opt = configure_optimizers(model, 0.1, 1e-4, (0.9, 0.95), device_type)
    use_compile = device_type == "cuda" if compile == "auto" else compile == "1"
    step_model = torch.compile(model, mode=compile_mode) if use_compile else model
    B, T = batch_size or c["batch_size"], c["block_size"]
    x = torch.randint(0, vocab, (B, T), device=device)
    y = torch.randint(0, vocab, (B, T), device=device)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)

    def step():
        with amp:
            _, loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    variants = [default_rows if rows is None else rows for rows in loss_chunk_rows]
    per_block, blocks = (1, iters) if device_type == "cpu" else (iters, 3)
    times = {rows: [] for rows in variants}
    peak = measure_peak_flops(device, dtype)  # before and after the steps; the higher one counts
    for rows in variants:  # warm-up (and compilation)
        model.loss_chunk_rows = rows
        for _ in range(2):
            step()
    for _ in range(blocks):
        for rows in variants:
            model.loss_chunk_rows = rows
            sync()
            t0 = time.perf_counter()
            for _ in range(per_block):
                step()
            sync()
            times[rows].append((time.perf_counter() - t0) / per_block)
    peak = max(peak, measure_peak_flops(device, dtype))
    for rows in variants:
        dt = statistics.median(times[rows])
        tok_s = B * T / dt
        mfu = model.flops_per_token() * tok_s / peak
        print(
            f"{config_path}: {model.num_params() / 1e6:.1f}M params, batch {B}x{T}, {str(dtype)[6:]}, "
            f"{f'compile ({compile_mode})' if use_compile else 'eager'}, "
            f"loss_chunk_rows {rows}: {dt * 1000:.0f} ms/step, {tok_s:,.0f} tokens/s, "
            f"matmul peak {peak / 1e9:,.0f} GFLOP/s, MFU {mfu * 100:.1f}%"
        )
    if len(variants) > 1:
        base = statistics.median(times[variants[-1]])
        print(
            "  speed vs loss_chunk_rows "
            + f"{variants[-1]}: "
            + ", ".join(f"{rows}: x{base / statistics.median(times[rows]):.2f}" for rows in variants[:-1])
        )
    for rows in variants if profile else []:
        model.loss_chunk_rows = rows
        print(f"  where one step's time goes, loss_chunk_rows {rows}:")
        where_time_goes(step, cuda=device_type == "cuda")


def bench_optimizer(config_path, iters, device):
    """Median ms of one forward + backward and of one optimizer step, measured alternately
    on the config's model (fp32, eager) with each optimizer; the ratio is step / fwd+bwd."""
    c = load_config([config_path])
    torch.manual_seed(0)
    vocab = data_vocabulary(c["data_dir"], c["vocab"], c["vocab_size"]).vocab_size
    model = GPT(
        GPTConfig(
            n_layer=c["n_layer"],
            n_head=c["n_head"],
            n_embd=c["n_embd"],
            block_size=c["block_size"],
            vocab_size=vocab,
            rope=c["rope"],
        )
    ).to(device)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    muon_lr = c["muon_lr"] or 0.01
    auto, why = pick_ns_dtype("auto", device)
    optimizers = {"AdamW": configure_optimizers(model, 0.1, 1e-4, (0.9, 0.95), device_type)}
    for dtype in (torch.float32, torch.bfloat16):
        optimizers[f"Muon + AdamW, Newton-Schulz in {str(dtype)[6:]}"] = configure_optimizers(
            model, 0.1, 1e-4, (0.9, 0.95), device_type, muon_lr, dtype
        )
    x = torch.randint(0, vocab, (c["batch_size"], c["block_size"]), device=device)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    fwd_bwd, steps = [], {name: [] for name in optimizers}
    for i in range(iters + 2):  # two warm-ups; the optimizers take turns on the same gradients
        model.zero_grad(set_to_none=True)
        t = timed(lambda: model(x, x)[1].backward())
        for name, opt in optimizers.items():
            dt = timed(opt.step)
            if i >= 2:
                steps[name].append(dt)
        if i >= 2:
            fwd_bwd.append(t)
    base = statistics.median(fwd_bwd)
    print(
        f"{config_path}: {model.num_params() / 1e6:.2f}M params, batch {x.shape[0]}x{x.shape[1]}, fp32; "
        f"forward + backward {base * 1000:.1f} ms; Muon's 'auto' picks {str(auto)[6:]} ({why})"
    )
    for name, times in steps.items():
        dt = statistics.median(times)
        print(f"  {name}: step {dt * 1000:.1f} ms = x{dt / base:.2f} of forward + backward")


PARALLEL = {
    "ddp": ["--parallel=ddp"],
    "fsdp": ["--parallel=fsdp", "--reshard_after_forward=True"],
    "fsdp-zero2": ["--parallel=fsdp", "--reshard_after_forward=False"],
}


def bench_parallel(config, modes, worlds, iters, overrides, device):
    """train.py under torchrun, per world size and mode: what each process holds, and tokens/s."""
    root = Path(__file__).resolve().parent.parent
    cores = os.cpu_count() or 1
    print(
        f"| {Path(config).name} | processes | weights / process | gradients | optimizer state | peak / process "
        f"| tokens/s (all) |\n|---|---|---|---|---|---|---|"
    )
    for world in worlds:
        for mode in modes:
            with tempfile.TemporaryDirectory() as out:
                env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // world)))
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc_per_node={world}",
                    "train.py",
                    config,
                    *PARALLEL[mode],
                    *overrides,
                    f"--out_dir={out}",
                    f"--max_iters={iters}",
                    f"--eval_interval={iters}",
                    "--log_interval=1",
                    "--gradient_accumulation_steps=4",
                    "--eval_iters=4",
                    f"--device={device}",
                ]
                proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
                if proc.returncode:
                    print(f"| {mode} | {world} | failed: {proc.stderr.strip().splitlines()[-1][:150]} |")
                    continue
                log = [json.loads(line) for line in open(Path(out) / "log.jsonl")]
            procs = next(r["processes"] for r in log if r["kind"] == "memory")
            tok_s = statistics.median(r["tokens_per_s"] for r in log if r["kind"] == "train" and r["iter"] > 1)
            cells = [
                " / ".join(f"{p.get(k, 0) / 2**20:.1f}" for p in procs[:2]) + (" …" if len(procs) > 2 else "") + " MiB"
                for k in ("params", "grads", "optimizer")
            ]
            print(
                f"| {mode} | {world} | {' | '.join(cells)} | {max(p['peak_mib'] for p in procs):,.0f} MiB "
                f"| {tok_s:,.0f} |",
                flush=True,
            )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--batch_size", type=int, help="override the config's batch size")
    p.add_argument("--block_size", type=int, help="override the config's block size")
    p.add_argument(
        "--loss_chunk_rows",
        help="model.loss_chunk_rows, or several, comma-separated, to compare in "
        "one run; 0 = the plain full-logits loss (default: train.py's 'auto')",
    )
    p.add_argument("--compile", default="auto", choices=["auto", "0", "1"], help="torch.compile ('auto': on CUDA)")
    p.add_argument("--compile_mode", default="default", help="torch.compile's mode, e.g. max-autotune")
    p.add_argument("--profile", action="store_true", help="also print where one step's time goes")
    p.add_argument("--optimizer", action="store_true", help="time one optimizer step against one forward + backward")
    p.add_argument("--device", default="auto")
    p.add_argument("--parallel", help="comma-separated: ddp, fsdp, fsdp-zero2: train.py under torchrun (see above)")
    p.add_argument("--worlds", default="1,2,4", help="with --parallel: the numbers of processes")
    args = p.parse_args()
    if args.parallel:
        overrides = [f"--{k}={getattr(args, k)}" for k in ("batch_size", "block_size") if getattr(args, k)]
        for cfg in args.configs:
            bench_parallel(
                cfg,
                args.parallel.split(","),
                [int(w) for w in args.worlds.split(",")],
                args.iters,
                overrides,
                "cuda" if pick_device(args.device).startswith("cuda") else "cpu",
            )
        return
    device = pick_device(args.device)
    print(
        f"device: {torch.cuda.get_device_name() if device.startswith('cuda') else device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    for cfg in args.configs:
        if args.optimizer:
            bench_optimizer(cfg, args.iters, device)
            continue
        bench(
            cfg,
            args.iters,
            device,
            args.batch_size,
            args.block_size,
            args.profile,
            [int(r) for r in args.loss_chunk_rows.split(",")] if args.loss_chunk_rows else [None],
            args.compile,
            args.compile_mode,
        )


if __name__ == "__main__":
    run_cli(main)
