"""parallel='fsdp' (FSDP2 over gloo on the CPU): the same training as one process, in both
reshard settings; sharded checkpoints that resume exactly, also on another number of
processes; best.pt read as before; half-written folders never taken; one-line errors; and
the live trackers (log_to), read back with their own readers."""
import glob
import json
import time

import pytest
import torch

import train
from conftest import TINY, read_log, run_script, torchrun_train
from data_utils import UserError
from miniglm.checkpoint import SHARDED, load_checkpoint

pytestmark = pytest.mark.slow  # every test here trains, exports or runs end to end

COMMON = [*TINY, "--block_size=64", "--gradient_accumulation_steps=4", "--eval_iters=4"]


def torchrun(n, out_dir, *args):
    """train.py as n processes under torchrun, parallel='fsdp'."""
    return torchrun_train(n, *COMMON, *args, f"--out_dir={out_dir}", "--parallel=fsdp")


def one(out_dir, *args):
    """train.py in this process (parallel='fsdp' alone: a world of one)."""
    train.main([*COMMON, *args, f"--out_dir={out_dir}"])


def sharded_weights(folder, like):
    """The model in a sharded checkpoint, read without processes into tensors shaped as like's."""
    import torch.distributed.checkpoint as dcp
    state = {"model": {k: torch.zeros_like(v) for k, v in like.items()}}
    dcp.load(state, checkpoint_id=folder)
    return state["model"]


def assert_close_runs(single, sharded, iters, keys=None):
    a, b = read_log(single, "train"), read_log(sharded, "train")
    assert len(b) == iters and all(abs(x["loss"] - y["loss"]) < 1e-4 for x, y in zip(a, b)), (a, b)
    want = load_checkpoint(single / "ckpt.pt")["model"]
    got = sharded_weights(sharded / SHARDED, want)
    assert all(torch.allclose(want[k], got[k], atol=1e-5) for k in keys or want)


@pytest.mark.parametrize(
    "reshard,data_dir,accum",
    [(True, "pretrain", 4), (False, "sft-packed", 4), (True, "pretrain", 1)],
    indirect=["data_dir"],
)
def test_two_sharded_processes_match_one_process(tmp_path, reshard, data_dir, accum):
    """ZeRO-3-like on pretraining, ZeRO-2-like on packed SFT rows, each with 2 micro-steps
    per process, clipping across shards and the chunked loss: one process's losses and
    weights. With one micro-step (accum 1) each process takes half of its rows."""
    args = [
        f"--data_dir={data_dir}",
        "--max_iters=6",
        "--eval_interval=6",
        f"--gradient_accumulation_steps={accum}",
        f"--batch_size={16 // accum}",
    ]
    train.main([*COMMON, *args, f"--out_dir={tmp_path / 'single'}"])
    proc = torchrun(2, tmp_path / "fsdp", *args, f"--reshard_after_forward={reshard}")
    assert "device cpu x2" in proc.stdout and not (tmp_path / "fsdp" / "ckpt.pt").exists()
    assert_close_runs(tmp_path / "single", tmp_path / "fsdp", 6)
    # each process holds half of the weights, gradients and optimizer state of one process
    single, halves = (
        read_log(tmp_path / "single", "memory")[0]["processes"],
        read_log(tmp_path / "fsdp", "memory")[0]["processes"],
    )
    for part in ("params", "grads", "optimizer"):
        assert [h[part] for h in halves] == pytest.approx([single[0][part] / 2] * 2, rel=0.02), part


def test_sharded_checkpoint_resumes_on_another_number_of_processes(tmp_path, pretrain_dir):
    """Saved by 2 processes, resumed by 1; saved by 1, resumed by 2: the uninterrupted run's
    losses (to the cross-process tolerance); best.pt is one file that sample.py reads."""
    args = [f"--data_dir={pretrain_dir}", "--eval_interval=4", "--lr_decay_iters=8"]
    torchrun(2, tmp_path / "full", *args, "--max_iters=8")
    torchrun(2, tmp_path / "two-one", *args, "--max_iters=4")
    one(tmp_path / "two-one", *args, "--max_iters=8", "--init_from=resume", "--parallel=fsdp")
    one(tmp_path / "one-two", *args, "--max_iters=4", "--parallel=fsdp")
    torchrun(2, tmp_path / "one-two", *args, "--max_iters=8", "--init_from=resume")
    full = [s["loss"] for s in read_log(tmp_path / "full", "train")]
    for run in ("two-one", "one-two"):
        losses = [s["loss"] for s in read_log(tmp_path / run, "train")]
        assert len(losses) == 8 and max(abs(a - b) for a, b in zip(losses, full)) < 1e-4, run
    best = load_checkpoint(tmp_path / "two-one" / "best.pt")
    assert best["iter_num"] == 8 and all(not hasattr(v, "device_mesh") for v in best["model"].values())
    sample = run_script(
        "sample.py", f"--out_dir={tmp_path / 'two-one'}", "--start=床前", "--max_new_tokens=5", "--device=cpu"
    )
    assert sample.stdout.startswith("床前")


def test_sharded_resume_is_exact_with_dropout_and_muon(tmp_path, pretrain_dir):
    """2 processes, dropout on, Muon (each process orthogonalizes the gathered matrix): the
    resumed run's losses are the uninterrupted run's, bit for bit."""
    args = [
        f"--data_dir={pretrain_dir}",
        "--eval_interval=4",
        "--lr_decay_iters=8",
        "--dropout=0.1",
        "--muon_lr=0.02",
        "--muon_ns_dtype=float32",
    ]
    torchrun(2, tmp_path / "full", *args, "--max_iters=8")
    torchrun(2, tmp_path / "split", *args, "--max_iters=4")
    torchrun(2, tmp_path / "split", *args, "--max_iters=8", "--init_from=resume")
    full, split = read_log(tmp_path / "full", "train"), read_log(tmp_path / "split", "train")
    assert [s["loss"] for s in split] == [s["loss"] for s in full] and len(full) == 8
    assert full[-1]["loss"] < full[0]["loss"]


def test_lora_under_fsdp_matches_one_process(tmp_path, tiny_runs, tiny_sft_data):
    """The frozen base is sharded with the adapters; only the adapters train, and best.pt is
    the adapter alone, as without FSDP."""
    args = [
        f"--data_dir={tiny_sft_data}",
        f"--init_from={tiny_runs[0] / 'best.pt'}",
        "--max_iters=4",
        "--eval_interval=4",
        "--finetune=lora",
        "--lora_r=4",
        "--learning_rate=1e-2",
        "--lora_dropout=0.0",
    ]
    train.main([*COMMON, *args, f"--out_dir={tmp_path / 'single'}"])
    torchrun(2, tmp_path / "fsdp", *args)
    assert_close_runs(tmp_path / "single", tmp_path / "fsdp", 4)
    best = load_checkpoint(tmp_path / "fsdp" / "best.pt")
    assert sorted(best["model"]) == sorted(load_checkpoint(tmp_path / "single" / "best.pt")["model"])
    assert best["adapter"]["method"] == "lora" and all("lora" in k for k in best["model"])


def test_half_written_folders_and_mismatched_checkpoints_are_one_line(tmp_path, pretrain_dir):
    args = [f"--data_dir={pretrain_dir}", "--eval_interval=2"]
    one(tmp_path / "run", *args, "--max_iters=2", "--parallel=fsdp")
    one(tmp_path / "zero", *args, "--max_iters=0", "--parallel=fsdp")  # saved before any step: no optimizer state
    one(tmp_path / "zero", *args, "--max_iters=2", "--init_from=resume", "--parallel=fsdp")
    assert [s["loss"] for s in read_log(tmp_path / "zero", "train")] == [
        s["loss"] for s in read_log(tmp_path / "run", "train")
    ]
    (tmp_path / "run" / f"{SHARDED}.tmp").mkdir()  # a save that died half-way
    (tmp_path / "run" / f"{SHARDED}.tmp" / "__0_0.distcp").write_bytes(b"half")
    (tmp_path / "run" / f"{SHARDED}.old").mkdir()  # and one that stopped before deleting the previous folder
    (tmp_path / "run" / f"{SHARDED}.old" / "__0_0.distcp").write_bytes(b"old")
    one(tmp_path / "run", *args, "--max_iters=4", "--init_from=resume", "--parallel=fsdp")
    assert [s["iter"] for s in read_log(tmp_path / "run", "train")] == [1, 2, 3, 4]
    with pytest.raises(
        UserError,
        match=r"ckpt.dcp: a sharded checkpoint \(parallel='fsdp'\): resume it with "
        r"--parallel=fsdp",
    ):
        one(tmp_path / "run", *args, "--max_iters=6", "--init_from=resume")
    (tmp_path / "run" / SHARDED / "meta.pt").unlink()  # no meta.pt: not a checkpoint
    with pytest.raises(UserError, match=r"ckpt.dcp: no complete sharded checkpoint to resume"):
        one(tmp_path / "run", *args, "--max_iters=6", "--init_from=resume", "--parallel=fsdp")
    one(tmp_path / "ddp", *args, "--max_iters=2")
    with pytest.raises(UserError, match=r"ckpt.pt: a single-file checkpoint \(parallel='ddp'\): resume it with"):
        one(tmp_path / "ddp", *args, "--max_iters=4", "--init_from=resume", "--parallel=fsdp")
    with pytest.raises(UserError, match=r"ckpt.dcp: its optimizer does not fit muon_lr=0.02"):
        one(tmp_path / "zero", *args, "--max_iters=6", "--init_from=resume", "--parallel=fsdp", "--muon_lr=0.02")
    with pytest.raises(UserError, match="parallel must be one of ddp, fsdp, got 'zero3'"):
        one(tmp_path / "x", *args, "--parallel=zero3")
    with pytest.raises(UserError, match="log_to must be one of none, tensorboard, wandb, got 'mlflow'"):
        one(tmp_path / "x", *args, "--log_to=mlflow")
    proc = torchrun_train(2, *TINY, f"--data_dir={pretrain_dir}", "--gradient_accumulation_steps=3", "--batch_size=8",
                          f"--out_dir={tmp_path / 'x'}", "--parallel=fsdp", check=False, timeout=120)
    assert (
        "error: gradient_accumulation_steps=3 must be divisible by the number of processes (2): "
        "--gradient_accumulation_steps=4 --batch_size=6" in proc.stderr
    )


def test_tensorboard_and_wandb_get_the_log_records(tmp_path, pretrain_dir, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [f"--data_dir={pretrain_dir}", "--max_iters=4", "--eval_interval=2"]
    one(tmp_path / "tb", *args, "--log_to=tensorboard")
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard")).Reload()
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("train/loss")] == [
        (r["iter"], round(r["loss"], 5)) for r in read_log(tmp_path / "tb", "train")
    ]
    assert [e.step for e in events.Scalars("eval/val_loss")] == [0, 2, 4]
    assert "learning_rate" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path))  # no login anywhere: it must run offline
    one(tmp_path / "wb", *args, "--log_to=wandb")
    runs = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    records = wandb_records(runs[0])
    for _ in range(60):  # wandb's service process may still be writing the file: wait for the run's exit record
        if records["exited"]:
            break
        time.sleep(0.5)
        records = wandb_records(runs[0])
    losses = [json.loads(h["train/loss"]) for h in records["history"] if "train/loss" in h]
    assert losses == pytest.approx([r["loss"] for r in read_log(tmp_path / "wb", "train")])
    assert "learning_rate" in records["config"]


def wandb_records(path):
    """The history rows and config keys of an offline wandb run file (a LevelDB-style log of
    wandb's protobuf records, after a 7-byte header), read with wandb's own record type."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, piece, out = open(path, "rb").read(), 7, b"", {"history": [], "config": set(), "exited": False}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # padding, no record
            pos += 7 + length
            continue
        piece, pos = piece + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(piece)
            piece = b""
            if record.HasField("history"):
                out["history"].append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
            if record.HasField("run"):
                out["config"] |= {i.key for i in record.run.config.update}
            if record.HasField("exit"):
                out["exited"] = True
    return out


def test_a_missing_tracker_package_is_one_line_naming_pip(monkeypatch):
    import importlib.util

    from miniglm import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"^log_to='wandb' needs the wandb package: pip install wandb$"):
        tracking.check_tracker("wandb")
