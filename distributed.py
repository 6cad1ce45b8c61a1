"""
Processes and devices for train.py: one process, or DDP under torchrun (one process per
GPU, or several CPU processes over gloo); the training dtype and autocast; the RNG states a
checkpoint carries so that a resumed run repeats the uninterrupted one exactly; and the
matmul probe that gives MFU its denominator.
"""
import os
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data_utils import UserError, pick_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(c, device_type):
    if c["dtype"] != "auto":
        if c["dtype"] not in DTYPES:
            raise UserError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {c['dtype']!r}")
        return c["dtype"]
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"  # bf16 matmul on CPUs without AMX is hundreds of times slower than fp32


def setup(c):
    """The process group (under torchrun), the device, the dtype: what every stage of
    training needs to know about where it runs."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = pick_device(c["device"])
    rank, local_rank, world = 0, 0, 1
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        backend = c["backend"] if c["backend"] != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
        dist.init_process_group(backend=backend)
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    if c["gradient_accumulation_steps"] % world:
        raise UserError(f"gradient_accumulation_steps={c['gradient_accumulation_steps']} must be divisible "
                        f"by the number of processes ({world})")
    dtype = pick_dtype(c, device_type)
    amp = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=DTYPES[dtype])
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return SimpleNamespace(ddp=ddp, rank=rank, local_rank=local_rank, world=world, master=rank == 0, device=device,
                           device_type=device_type, local_accum=c["gradient_accumulation_steps"] // world,
                           dtype=dtype, ptdtype=DTYPES[dtype], amp=amp,
                           use_compile=c["compile"] if c["compile"] != "auto" else device_type == "cuda")


def wrap(model, run, compile_mode):
    """The model the steps call: compiled (CUDA by default) and, under torchrun, DDP."""
    if run.use_compile:
        model = torch.compile(model, mode=compile_mode)
    if run.ddp:
        model = DDP(model, device_ids=[run.local_rank] if run.device_type == "cuda" else None)
    return model


def all_mean(x, run):
    if run.ddp:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= run.world
    return x


def rng_states(data_gen):
    states = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def all_rng_states(data_gen, run):
    """Every process's RNG states (its dropout masks differ), for the checkpoint."""
    states = rng_states(data_gen)
    if not run.ddp:
        return [states]
    gathered = [None] * run.world
    dist.all_gather_object(gathered, states)
    return gathered


def restore_rng(all_states, data_gen, run):
    """This process's states from a checkpoint's list (a run resumed on more processes than
    it was saved by gives the extra ones process 0's)."""
    states = all_states[run.rank] if run.rank < len(all_states) else all_states[0]
    torch.set_rng_state(states["torch"])
    data_gen.set_state(states["data"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def measure_peak_flops(device, dtype):
    """FLOP/s of a large square matmul in the training dtype: the MFU denominator."""
    n = 4096 if device.startswith("cuda") else 1024
    # a private generator: a start-up probe must not move the training RNG streams, or a
    # resumed run's dropout masks differ from the uninterrupted run's
    a, b = torch.randn(2, n, n, generator=torch.Generator().manual_seed(0)).to(device, dtype)
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


def peak_memory_mib(run):
    """This process's peak: the CUDA allocator's on a GPU, the resident set size elsewhere."""
    if run.device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def finish(run):
    if run.ddp:
        dist.destroy_process_group()
