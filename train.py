"""
Pretraining and supervised fine-tuning (SFT) of the GPT in model.py.

  python train.py config/train_tiny_cpu.py                     # one process
  python train.py config/train_config.py --batch_size=32       # --key=value overrides (Python literals)
  torchrun --standalone --nproc_per_node=4 train.py config/train_config.py   # DDP

The data folder decides the mode: sft_train.bin (from data/prepare_sft.py) means SFT,
with the loss on answer tokens only; train.bin (from data/prepare.py) means pretraining.
init_from: 'scratch', 'resume' (continue out_dir/ckpt.pt exactly), or the path of a
checkpoint whose weights to start from (SFT starts from a pretrained model this way).
vocab: 'gpt2' (all 50,257 tokens), 'trimmed' (the GPT-2 ids of data_dir's corpus, from its
vocab.json) or 'bpe' (the BPE of vocab_size tokens that data/prepare.py trained on data_dir's
train split): set when training from scratch; a checkpoint brings its own.
"""
import ast
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import checkpoint_tokenizer, load_checkpoint, model_from_checkpoint, save_checkpoint
from data_utils import SFTData, UserError, open_data, pick_device, run_cli
from model import GPT, GPTConfig
from tokenizer import data_vocabulary

DEFAULTS = dict(
    # I/O
    out_dir="out/pretrain",
    data_dir="data/fortunes-zh",
    init_from="scratch",  # 'scratch' | 'resume' | path to a checkpoint to start from
    eval_interval=200,  # evaluate, log and checkpoint every this many iterations
    eval_iters=50,  # batches per split in each evaluation
    log_interval=10,
    eval_only=False,
    # model (ignored when the weights come from a checkpoint)
    n_layer=6, n_head=8, n_embd=512, block_size=512, dropout=0.0, bias=False, rope=False,  # rope: rotary positions
    # 'gpt2' | 'trimmed' (the GPT-2 ids data_dir's corpus uses: a cheap output layer) | 'bpe'
    # (data_dir's trained BPE: ~2.4x fewer tokens per Chinese character than GPT-2)
    vocab="gpt2",
    vocab_size=8192,  # vocab='bpe': which of data_dir's BPEs (prepare.py --bpe_vocab_size); the others ignore it
    # batch: batch_size rows per micro-step, gradient_accumulation_steps micro-steps per
    # iteration in total (divided among DDP processes)
    batch_size=16, gradient_accumulation_steps=4,
    # AdamW and the cosine schedule; muon_lr > 0: Muon at that lr for the blocks' matrices
    learning_rate=6e-4, max_iters=5000, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, muon_lr=0.0,
    decay_lr=True, warmup_iters=200, lr_decay_iters=None, min_lr=6e-5,  # lr_decay_iters None = max_iters
    # system
    device="auto",  # 'auto' = cuda > mps > cpu
    dtype="auto",  # 'auto' = bfloat16 on CUDA if supported, else float16 on CUDA, float32 elsewhere
    compile="auto",  # 'auto' = torch.compile on CUDA only
    compile_mode="default",  # torch.compile's mode: default | max-autotune | max-autotune-no-cudagraphs | ...
    # rows per chunk of the fused output layer + loss (model.LinearCrossEntropy); 0 = the plain
    # full-logits loss; 'auto' = 512 on the CPU (measured faster), 0 on CUDA until measured there
    loss_chunk_rows="auto",
    backend="auto",  # DDP: nccl on CUDA, gloo on CPU
    seed=1337,
    peak_flops="auto",  # FLOP/s per device for MFU; 'auto' measures a matmul in the training dtype
)


def load_config(argv, defaults=DEFAULTS):
    """Defaults, then each config file (plain Python) in order, then --key=value overrides."""
    config = dict(defaults)

    def set_key(key, value, where):
        if key not in config:
            raise UserError(f"{where}: unknown config key {key!r}; valid keys: {', '.join(sorted(config))}")
        old = config[key]
        if old is not None and not isinstance(old, str) and value is not None:
            ok = isinstance(value, type(old)) or (isinstance(old, float) and type(value) is int)
            if not ok or (isinstance(old, bool) != isinstance(value, bool)):
                raise UserError(f"{where}: {key} should be {type(old).__name__}, got {value!r}")
        config[key] = value

    for arg in argv:
        if arg.startswith("--"):
            key, sep, raw = arg[2:].partition("=")
            if not sep:
                raise UserError(f"{arg}: overrides are written --key=value")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw  # a bare word is a string: --device=cpu
            set_key(key, value, arg)
        else:
            if not Path(arg).is_file():
                raise UserError(f"{arg}: config file not found")
            scope = {}
            try:
                exec(compile(Path(arg).read_text(encoding="utf-8"), arg, "exec"), scope)
            except Exception as e:
                line = getattr(e, "lineno", None) or (e.__traceback__.tb_next.tb_lineno if e.__traceback__.tb_next else "?")
                raise UserError(f"{arg}:{line}: {type(e).__name__}: {e}") from None
            for key, value in scope.items():
                if not key.startswith("_") and not callable(value) and type(value).__name__ != "module":
                    set_key(key, value, arg)
    return config


def get_lr(it, c):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = c["lr_decay_iters"] or c["max_iters"]
    if not c["decay_lr"]:
        return c["learning_rate"]
    if it < c["warmup_iters"]:
        return c["learning_rate"] * (it + 1) / (c["warmup_iters"] + 1)
    if it >= decay_iters:
        return c["min_lr"]
    ratio = (it - c["warmup_iters"]) / max(1, decay_iters - c["warmup_iters"])
    return c["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c["learning_rate"] - c["min_lr"])


def pick_dtype(c, device_type):
    if c["dtype"] != "auto":
        if c["dtype"] not in ("float32", "bfloat16", "float16"):
            raise UserError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {c['dtype']!r}")
        return c["dtype"]
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"  # bf16 matmul on CPUs without AMX is hundreds of times slower than fp32


def measure_peak_flops(device, dtype):
    """FLOP/s of a large square matmul in the training dtype: the MFU denominator."""
    n = 4096 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    best = float("inf")  # the best of a few rounds: one slow round (another process) is not the peak
    for _ in range(3):
        reps, t0 = 5, time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n ** 3 / best


def rng_states(data_gen):
    states = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng(states, data_gen):
    torch.set_rng_state(states["torch"])
    data_gen.set_state(states["data"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def truncate_log(log_path, iter_num):
    """On resume, forget log lines past the checkpoint: they are about to be redone."""
    if log_path.exists():
        lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
        keep = [ln for ln in lines if json.loads(ln)["iter"] <= iter_num]
        log_path.write_text("".join(ln + "\n" for ln in keep))


def pick_loss_chunk_rows(value, device_type):
    """'auto': the chunked loss on the CPU, where it measured x1.25-1.45 faster per 45M step;
    on CUDA the plain loss: there the chunked one measured x0.95 on an H100 (gpu_check.sh)."""
    rows = value if value != "auto" else (0 if device_type == "cuda" else 512)
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise UserError(f"loss_chunk_rows must be 'auto' or a whole number >= 0, got {rows!r}")
    return rows


def main(argv=None):
    c = load_config(sys.argv[1:] if argv is None else argv)

    # ------------------------------------------------------------------ processes, device
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = pick_device(c["device"])
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        backend = c["backend"] if c["backend"] != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
        dist.init_process_group(backend=backend)
    else:
        rank, local_rank, world = 0, 0, 1
    master = rank == 0
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    if c["gradient_accumulation_steps"] % world:
        raise UserError(f"gradient_accumulation_steps={c['gradient_accumulation_steps']} must be divisible "
                        f"by the number of processes ({world})")
    local_accum = c["gradient_accumulation_steps"] // world
    dtype = pick_dtype(c, device_type)
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    amp = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
    use_compile = c["compile"] if c["compile"] != "auto" else device_type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out_dir = Path(c["out_dir"])
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ model, optimizer
    torch.manual_seed(c["seed"])  # the same initial weights in every process
    iter_num, best_val_loss, ckpt = 0, float("inf"), None
    if c["init_from"] == "scratch":
        tok, chars = data_vocabulary(c["data_dir"], c["vocab"], c["vocab_size"]), ""
        model_args = dict(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["block_size"],
                          dropout=c["dropout"], bias=c["bias"], rope=c["rope"], vocab_size=tok.vocab_size)
        model = GPT(GPTConfig(**model_args))
    else:
        ckpt = load_checkpoint(out_dir / "ckpt.pt" if c["init_from"] == "resume" else c["init_from"])
        tok, chars = checkpoint_tokenizer(ckpt), ckpt.get("chars") or ""
        model_args = dict(ckpt["model_args"], dropout=c["dropout"])
        ckpt["model_args"] = model_args
        model = model_from_checkpoint(ckpt)
        if c["init_from"] == "resume":
            iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    model.to(device)
    model.loss_chunk_rows = pick_loss_chunk_rows(c["loss_chunk_rows"], device_type)
    # the config saved with the checkpoints tells the model that was trained, also where
    # the shape and vocabulary came from a checkpoint rather than from these keys
    c.update({k: model_args[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias")},
             vocab=tok.kind, rope=model_args.get("rope", False))
    data = open_data(c["data_dir"], model_args["block_size"], tok)
    kind = "sft" if isinstance(data, SFTData) else "pretrain"
    # the characters the model has seen in training: by default generation writes no other
    chars = "".join(sorted(set(chars) | set(data.chars or "")))
    block = data.row_len - 1 if kind == "sft" else model_args["block_size"]
    # the chat template the SFT rows were written in: sample, Gradio and evaluations use it
    template = data.meta.get("template", "qa") if kind == "sft" else (ckpt or {}).get("template")
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    optimizer = model.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]),
                                           device_type, c["muon_lr"])
    data_gen = torch.Generator().manual_seed(c["seed"])  # same draws in every process
    if c["init_from"] == "resume":
        if ("optimizers" in ckpt["optimizer"]) != (c["muon_lr"] > 0):  # Muon + AdamW, or AdamW alone
            raise UserError(f"{out_dir / 'ckpt.pt'}: its optimizer does not fit muon_lr={c['muon_lr']}: resume with the run's")
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0], data_gen)
    else:
        torch.manual_seed(c["seed"] + rank)  # different dropout masks per process
    ckpt = None  # free the memory
    raw_model = model
    if use_compile:
        model = torch.compile(model, mode=c["compile_mode"])
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    tokens_per_iter = c["gradient_accumulation_steps"] * c["batch_size"] * block
    flops_per_iter = raw_model.flops_per_token() * tokens_per_iter
    # SFT without compile projects only the trained positions onto the vocabulary (model.py):
    # the output layer's FLOPs then count for those positions alone
    head_flops = 6 * model_args["n_embd"] * model_args["vocab_size"] if kind == "sft" and not use_compile else 0
    trained_tokens = torch.zeros((), device=device)  # mask-1 targets since the last log line
    peak = c["peak_flops"] if c["peak_flops"] != "auto" else measure_peak_flops(device, ptdtype)
    log_path = out_dir / "log.jsonl"
    if master:
        print(f"{kind} | {raw_model.num_params() / 1e6:.2f}M parameters | vocabulary {tok.name} "
              f"({tok.vocab_size:,} slots) | device {device} x{world} | {dtype} | "
              f"compile {use_compile} | {tokens_per_iter:,} tokens/iter | data {c['data_dir']}")
        if c["init_from"] == "resume":
            truncate_log(log_path, iter_num)
        elif log_path.exists():
            log_path.unlink()

    def log(record, line):
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(dict(record, mode=kind)) + "\n")
            print(line, flush=True)

    def all_mean(x):
        if ddp:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            x /= world
        return x

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over eval_iters batches per split; the same batches at every eval
        (a fixed generator), shared out among the processes."""
        model.eval()
        out = {}
        for split in ("train", "val"):
            rows = data.sample_rows(split, c["eval_iters"] * c["batch_size"], torch.Generator().manual_seed(c["seed"] + 1))
            total = torch.zeros(2, device=device)
            for batch_rows in rows.view(c["eval_iters"], c["batch_size"])[rank::world]:
                b = data.load(split, batch_rows, device)
                with amp:
                    _, loss = raw_model(b["x"], b["y"], b.get("loss_mask"), b.get("segment_ids"))
                total += torch.stack([loss.float(), torch.ones((), device=device)])
            if ddp:
                dist.all_reduce(total)
            out[split] = (total[0] / total[1]).item()
        model.train()
        return out

    def save(name, state):
        save_checkpoint(out_dir / name, dict(state, model=raw_model.state_dict(), model_args=model_args, config=c,
                                             kind=kind, tokenizer_sha256=tok.sha256, vocab=tok.state(), chars=chars,
                                             template=template))

    # ------------------------------------------------------------------ training loop
    t_start = time.time()
    resumed_at = iter_num if c["init_from"] == "resume" else None
    running_loss = torch.zeros((), device=device)
    t_log, iters_since_log = time.time(), 0
    while True:
        if (iter_num % c["eval_interval"] == 0 or iter_num >= c["max_iters"] or c["eval_only"]) and iter_num != resumed_at:
            t_eval = time.time()
            losses = estimate_loss()
            rng = rng_states(data_gen)
            if ddp:  # every process's dropout RNG, so a resumed DDP run continues exactly too
                gathered = [None] * world
                dist.all_gather_object(gathered, rng)
                rng = gathered
            else:
                rng = [rng]
            bpc = data.bits_per_char("val", losses["val"]) if kind == "pretrain" else None
            log({"kind": "eval", "iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                 "val_bpc": bpc, "tokens": iter_num * tokens_per_iter, "time": time.time() - t_start},
                f"eval {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                + (f" ({bpc:.3f} bits/char)" if bpc is not None else ""))
            if master and not c["eval_only"]:
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                save("ckpt.pt", dict(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), iter_num=iter_num,
                                     best_val_loss=best_val_loss, rng=rng))
                if improved:
                    save("best.pt", dict(iter_num=iter_num, best_val_loss=best_val_loss))
            t_log += time.time() - t_eval  # evaluation and checkpointing are not training time
        if iter_num >= c["max_iters"] or c["eval_only"]:
            break

        lr = get_lr(iter_num, c)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # the whole iteration's rows, drawn once: micro-step k of process r takes row block k*world + r
        rows = data.sample_rows("train", c["gradient_accumulation_steps"] * c["batch_size"], data_gen)
        my_rows = rows.view(local_accum, world, c["batch_size"])[:, rank]
        batch = data.load("train", my_rows[0], device)
        for micro in range(local_accum):
            last = micro == local_accum - 1
            with (model.no_sync() if ddp and not last else nullcontext()), amp:
                _, loss = model(batch["x"], batch["y"], batch.get("loss_mask"), batch.get("segment_ids"))
                loss = loss / local_accum
            if kind == "sft":
                trained_tokens += batch["loss_mask"].sum()
            if not last:  # load the next micro-batch while the device works on this one
                batch = data.load("train", my_rows[micro + 1], device)
            scaler.scale(loss).backward()
            running_loss += loss.detach()
        if c["grad_clip"] > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        iters_since_log += 1

        if iter_num % c["log_interval"] == 0 or iter_num == c["max_iters"]:
            lossf = all_mean(running_loss).item() / iters_since_log  # .item() waits for the device
            dt = (time.time() - t_log) / iters_since_log
            tok_s = tokens_per_iter / dt
            trained = all_mean(trained_tokens).item() * world / iters_since_log  # per iteration, all processes
            flops = flops_per_iter - head_flops * (tokens_per_iter - trained) if head_flops else flops_per_iter
            mfu = flops / dt / (peak * world)
            record = {"kind": "train", "iter": iter_num, "loss": lossf, "lr": lr, "dt_ms": dt * 1000, "tokens_per_s": tok_s,
                      "mfu": mfu, "tokens": iter_num * tokens_per_iter, "time": time.time() - t_start}
            extra = ""
            if kind == "sft":  # the tokens that carry loss: what packing rows buys
                record["trained_tokens_per_s"] = trained / dt
                extra = f" ({trained / dt:,.0f} trained)"
            log(record, f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter, {tok_s:,.0f} tok/s"
                        f"{extra}, mfu {mfu * 100:.1f}%")
            running_loss.zero_()
            trained_tokens.zero_()
            t_log, iters_since_log = time.time(), 0

    if master:
        print(f"done in {time.time() - t_start:.1f}s; best val loss {best_val_loss:.4f}; checkpoints in {out_dir}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
