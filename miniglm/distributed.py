"""
Processes and devices for train.py: one process, or several under torchrun (one per GPU, or
CPU processes over gloo) with parallel = 'ddp' (every process holds the whole model, its
gradients and optimizer state) or 'fsdp' (FSDP2's fully_shard: each holds 1/N of them,
docs/training.md); the training dtype and autocast; the RNG states a checkpoint carries so
that a resumed run repeats the uninterrupted one exactly; the matmul probe that gives MFU
its denominator; what each process holds, in bytes; one run per out_dir (lock_out_dir), and
workers that stop when their torchrun is killed (watch_launcher).
"""
import fcntl
import os
import shutil
import socket
import struct
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data_utils import UserError, pick_device
from miniglm.checkpoint import save_checkpoint
from miniglm.optimizers import each_optimizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PARALLEL = ("ddp", "fsdp")
HELD_LOCKS = []  # lock_out_dir's open files


def pick_dtype(c, device_type):
    if c["dtype"] != "auto":
        if c["dtype"] not in DTYPES:
            raise UserError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {c['dtype']!r}")
        return c["dtype"]
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"  # bf16 matmul on CPUs without AMX is hundreds of times slower than fp32


def setup(c):
    """The process group (under torchrun; parallel='fsdp' alone makes a world of one), the
    device, the dtype: what every stage of training needs to know about where it runs."""
    if c["parallel"] not in PARALLEL:
        raise UserError(f"parallel must be one of {', '.join(PARALLEL)}, got {c['parallel']!r}")
    fsdp = c["parallel"] == "fsdp"
    launched = int(os.environ.get("RANK", -1)) != -1
    device = pick_device(c["device"])
    rank, local_rank, world = 0, 0, 1
    if launched:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        watch_launcher()
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
    if launched or fsdp:
        backend = c["backend"] if c["backend"] != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
        dist.init_process_group(backend=backend, **({} if launched else dict(
            init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)))
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    accum, rows = c["gradient_accumulation_steps"], c["gradient_accumulation_steps"] * c["batch_size"]
    local_accum, local_batch = accum // world, c["batch_size"]
    if accum % world and world % accum == 0 and rows % world == 0:  # fewer micro-steps than processes:
        local_accum, local_batch = 1, rows // world  # each process takes its share of one micro-step's rows
    elif accum % world:
        fit = world * -(-accum // world)  # the same rows per iteration, if they divide evenly
        raise UserError(
            f"gradient_accumulation_steps={accum} must be divisible by the number of processes ({world}): "
            f"--gradient_accumulation_steps={fit}" + (f" --batch_size={rows // fit}" if rows % fit == 0 else "")
        )
    if fsdp and c["eval_iters"] % world:  # every process must run as many forwards: each one is a collective
        raise UserError(
            f"eval_iters={c['eval_iters']} must be divisible by the number of processes ({world}) under parallel='fsdp'"
        )
    dtype = pick_dtype(c, device_type)
    # FSDP on a GPU computes in the low dtype through its MixedPrecisionPolicy (wrap), not autocast
    low = dtype != "float32" and not (fsdp and device_type == "cuda")
    amp = torch.autocast(device_type=device_type, dtype=DTYPES[dtype]) if low else nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return SimpleNamespace(
        dist=launched or fsdp,
        ddp=launched and not fsdp,
        fsdp=fsdp,
        rank=rank,
        local_rank=local_rank,
        world=world,
        master=rank == 0,
        device=device,
        device_type=device_type,
        local_accum=local_accum,
        local_batch=local_batch,
        dtype=dtype,
        ptdtype=DTYPES[dtype],
        amp=amp,
        use_compile=c["compile"] if c["compile"] != "auto" else device_type == "cuda",
    )


def watch_launcher(interval=1.0):
    """Stop this worker within seconds when the torchrun that started it dies. torchrun starts
    workers in sessions of their own (start_new_session, pytorch PR 113231) and has no setting
    that ends them with it: a SIGKILLed torchrun left its workers training and saving into
    out_dir beside the next run. Polls the parent's PID (Linux and macOS alike)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        print(f"rank {os.environ.get('RANK')}: torchrun (PID {parent}) is gone; stopping", file=sys.stderr, flush=True)
        os._exit(1)  # the checkpoints are whole (atomic writes): the next run resumes from the last

    threading.Thread(target=watch, daemon=True, name="watch-torchrun").start()


def lock_holder(fd):
    """The PID holding a lock on any byte of fd's file (Linux: F_GETLK), else None."""
    if not sys.platform.startswith("linux"):
        return None
    query = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)  # struct flock: type, whence, start, len, pid
    kind, _, _, _, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, query))
    return pid if kind != fcntl.F_UNLCK else None


def lock_out_dir(out_dir, run):
    """One run per out_dir: out_dir/train.lock, locked by every process of the live run (process
    r holds byte r; POSIX locks go with the process, so any exit, SIGKILL too, frees them and a
    stale file is simply taken over). A second run refuses in one line naming the holder."""
    fd = os.open(Path(out_dir) / "train.lock", os.O_RDWR | os.O_CREAT, 0o644)
    error = None
    if run.master:
        try:  # the whole file: free only if no process of any run holds a byte of it
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0)
            fcntl.lockf(fd, fcntl.LOCK_UN, 0, 1)  # keep byte 0; the rest is for this run's other processes
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pid = lock_holder(fd) or os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            error = (
                f"{out_dir}: another train.py is running on it (PID {pid}); wait for it, stop it, "
                f"or give this run another --out_dir"
            )
    if run.dist:  # every process learns process 0's verdict before taking its own byte
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        os.close(fd)
        raise UserError(error)
    if not run.master:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, run.rank)
    HELD_LOCKS.append(fd)  # released by finish() (or by the process's end, however it ends)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (a rendezvous, a server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_loss_chunk_rows(value, device_type):
    """'auto': the chunked loss on the CPU, where it measured x1.25-1.45 faster per 45M step;
    on CUDA the plain loss: there the chunked one measured x0.95 on an H100 (gpu_check.sh)."""
    rows = value if value != "auto" else (0 if device_type == "cuda" else 512)
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise UserError(f"loss_chunk_rows must be 'auto' or a whole number >= 0, got {rows!r}")
    return rows


def wrap(model, run, c):
    """The model the steps call: compiled (CUDA by default) and, under torchrun, DDP. Under
    FSDP the model itself is sharded in place (each block, then the rest: the embedding tied
    to the output layer stays one parameter), with each block compiled on its own."""
    if run.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (
            MixedPrecisionPolicy(param_dtype=run.ptdtype, reduce_dtype=torch.float32)
            if run.device_type == "cuda" and run.dtype != "float32"
            else MixedPrecisionPolicy()
        )
        for block in model.transformer.h:
            if run.use_compile:
                block.compile(mode=c["compile_mode"])
            fully_shard(block, mp_policy=policy, reshard_after_forward=c["reshard_after_forward"])
        return fully_shard(model, mp_policy=policy, reshard_after_forward=c["reshard_after_forward"])
    if run.use_compile:
        model = torch.compile(model, mode=c["compile_mode"])
    if run.ddp:
        model = DDP(model, device_ids=[run.local_rank] if run.device_type == "cuda" else None)
    return model


def micro_step(model, run, last, reshard_after_forward):
    """Before each micro-step: gradients are reduced across processes on the last one only.
    Under FSDP the ZeRO-2-like setting also keeps its weights gathered until then (ZeRO-3
    reshards them after each backward, or it would hold the whole model)."""
    if run.fsdp:
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last or reshard_after_forward)
        return nullcontext()
    return model.no_sync() if run.ddp and not last else nullcontext()


def held_bytes(model, optimizer):
    """What this process holds of the weights, gradients and optimizer state, in bytes (a
    sharded tensor counts its local shard only)."""

    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(model.parameters())
    state = [
        v
        for opt in each_optimizer(optimizer)
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    ]
    return {
        "params": sum(map(local, params)),
        "grads": sum(local(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(map(local, state)),
    }


def all_mean(x, run):
    if run.dist:
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
    if not run.dist:
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
    return 2 * n**3 / best


def peak_memory_mib(run):
    """This process's peak: the CUDA allocator's on a GPU, the resident set size elsewhere."""
    if run.device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def memory_record(held, run, iter_num):
    """(log record, line): every process's weight, gradient and optimizer bytes (held_bytes)
    and peak memory."""
    mine = dict(held or {}, peak_mib=peak_memory_mib(run))
    every = [mine] * run.world
    if run.dist:
        dist.all_gather_object(every, mine)
    mib = [
        f"{m.get('params', 0) / 2**20:.1f}/{m.get('grads', 0) / 2**20:.1f}/{m.get('optimizer', 0) / 2**20:.1f}"
        f"/{m['peak_mib']:.0f}"
        for m in every
    ]
    return (
        {"kind": "memory", "iter": iter_num, "processes": every},
        f"per process, MiB of weights/gradients/optimizer state/peak: {'; '.join(mib)}",
    )


def finish():
    while HELD_LOCKS:
        os.close(HELD_LOCKS.pop())
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_worker():
    """End a torchrun worker whose run has finished, without the interpreter's finalisation: gloo's
    threads can still hold Python objects then and abort the process ('terminate called without an
    active exception', SIGABRT; pytorch PR 179291), which torchrun reports as a failed run. Seen in
    about 1 of 12 launches of the test suite's 2-process runs on a Zen 4. Everything is written and
    flushed by then; a process not started by torchrun returns as usual."""
    if int(os.environ.get("RANK", -1)) == -1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------ sharded checkpoints (FSDP)
def save_sharded(folder, model, optimizer, meta, run):
    """Every process writes its shards of the model and optimizer into folder.tmp; process
    0 then writes meta.pt and swaps the folder in. An interrupted save leaves the last
    whole checkpoint where it was."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    if run.master and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    optimizers = each_optimizer(optimizer)
    # an optimizer without state yet (nothing trained) is not saved: get_state_dict would make
    # its state with a zero step, which counts as Adam's first and changes the next update
    trained = any(o.state for o in optimizers)
    model_state, optimizer_state = get_state_dict(model, optimizers if trained else ())
    dcp.save({"model": model_state, **({"optimizer": optimizer_state} if trained else {})}, checkpoint_id=tmp)
    dist.barrier()
    if run.master:
        save_checkpoint(tmp / "meta.pt", dict(meta, model={}, optimizer_saved=trained))
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)  # (a save that stopped before deleting it left it here)
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_sharded(folder, model, optimizer, optimizer_saved=True):
    """Read a sharded checkpoint into a model sharded over any number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizers = each_optimizer(optimizer) if optimizer_saved else ()
    model_state, optimizer_state = get_state_dict(model, optimizers)
    state = {"model": model_state, **({"optimizer": optimizer_state} if optimizer_saved else {})}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state.get("optimizer", {}))


def gathered_weights(model):
    """A sharded model's whole state dict on process 0 (the others get {}): for best.pt."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
