import os
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch

import train
from conftest import ROOT, TINY, assert_same_training, free_port, read_log, run_script, train_single_and_ddp
from data_utils import UserError
from miniglm import distributed
from miniglm.checkpoint import load_checkpoint


def run_train(out_dir, data_dir, *extra):
    train.main([*TINY, f"--out_dir={out_dir}", f"--data_dir={data_dir}", *extra])


def test_tiny_pretrain_lowers_val_loss(tmp_path, pretrain_dir):
    run_train(tmp_path, pretrain_dir, "--max_iters=40", "--eval_interval=20")
    evals = read_log(tmp_path, "eval")
    assert [e["iter"] for e in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 3.0  # from ~ln(50304)=10.8
    steps = read_log(tmp_path, "train")
    assert len(steps) == 40 and all(s["tokens_per_s"] > 0 and 0 < s["mfu"] for s in steps)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["kind"] == "pretrain" and best["iter_num"] == 40


MODES = pytest.mark.parametrize("data_dir", ["pretrain", "sft", "sft-packed"], indirect=True)


@pytest.mark.slow
@MODES
def test_resume_reproduces_uninterrupted_run(tmp_path, data_dir):
    common = ["--eval_interval=5", "--lr_decay_iters=16", "--dropout=0.1", "--block_size=64"]
    run_train(tmp_path / "full", data_dir, "--max_iters=16", *common)
    run_train(tmp_path / "split", data_dir, "--max_iters=8", *common)
    run_train(tmp_path / "split", data_dir, "--max_iters=16", "--init_from='resume'", *common)
    full, split = read_log(tmp_path / "full", "train"), read_log(tmp_path / "split", "train")
    assert [s["iter"] for s in split] == list(range(1, 17))
    assert [s["loss"] for s in split] == [s["loss"] for s in full]
    assert read_log(tmp_path / "split", "eval")[-1]["val_loss"] == read_log(tmp_path / "full", "eval")[-1]["val_loss"]


@pytest.mark.slow
@MODES
def test_ddp_two_processes_match_single_process(tmp_path, data_dir):
    args = [*TINY, f"--data_dir={data_dir}", "--max_iters=6", "--eval_interval=6", "--gradient_accumulation_steps=4",
            "--block_size=64"]
    proc = train_single_and_ddp(args, tmp_path)
    assert "device cpu x2" in proc.stdout
    assert_same_training(tmp_path / "single", tmp_path / "ddp", iters=6)


@pytest.mark.slow
def test_two_node_torchrun_matches_single_process(tmp_path, pretrain_dir):
    """Two torchrun launches, as on two machines (--nnodes=2, --node_rank 0 and 1), meeting
    at 127.0.0.1 over gloo: the same losses and weights as one process."""
    args = [*TINY, f"--data_dir={pretrain_dir}", "--max_iters=4", "--eval_interval=4",
            "--gradient_accumulation_steps=4", "--block_size=64"]
    train.main([*args, f"--out_dir={tmp_path / 'single'}"])
    env, port = dict(os.environ, OMP_NUM_THREADS="1"), free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "train.py", *args, f"--out_dir={tmp_path / 'multi'}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "device cpu x2" in outputs[0][0]
    assert_same_training(tmp_path / "single", tmp_path / "multi", iters=4)


@pytest.mark.slow
def test_muon_trains_and_resumes_exactly(tmp_path, pretrain_dir, capsys):
    """muon_lr > 0: Muon steps the blocks' matrices, AdamW the rest; the loss falls, a resumed
    run repeats the uninterrupted one, and resuming with the other optimizer is a one-line
    error. (Under DDP Muon orthogonalises the all-reduced gradient like any optimizer; its
    Newton-Schulz steps blow rounding noise in near-null directions up to whole-step size,
    so a 1e-5 weight comparison with one process does not hold, and none is made.)"""
    common = ["--muon_lr=0.02", "--learning_rate=2e-3", "--eval_interval=6", "--lr_decay_iters=12", "--block_size=64"]
    run_train(tmp_path / "full", pretrain_dir, "--max_iters=12", *common)
    losses = [s["loss"] for s in read_log(tmp_path / "full", "train")]
    assert losses[-1] < losses[0] - 0.3  # (from ln(50304) = 10.8: 12 steps, 2 of them warmup)
    muon, adamw = load_checkpoint(tmp_path / "full" / "ckpt.pt")["optimizer"]["optimizers"]
    assert len(muon["state"]) == 4 * 2 and all(
        "momentum_buffer" in v for v in muon["state"].values()
    )  # 4 matrices x 2 layers
    assert len(adamw["state"]) == 2 + 2 * 2 + 1  # wte (tied), wpe; 2 LayerNorms per layer; ln_f
    run_train(tmp_path / "again", pretrain_dir, "--max_iters=12", *common)  # the same command: the same run
    assert [s["loss"] for s in read_log(tmp_path / "again", "train")] == losses
    run_train(tmp_path / "split", pretrain_dir, "--max_iters=6", *common)
    assert load_checkpoint(tmp_path / "split" / "ckpt.pt")["muon_ns_dtype"] == "float32"
    # resumed where the rule would now say bf16 (another machine, another torch): the run keeps its own
    with mock.patch("miniglm.optimizers.auto_ns_dtype", return_value=(torch.bfloat16, "forced")):
        run_train(tmp_path / "split", pretrain_dir, "--max_iters=12", "--init_from='resume'", *common)
    assert [s["loss"] for s in read_log(tmp_path / "split", "train")] == losses
    assert "Muon Newton-Schulz in float32 (recorded in the checkpoint" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"ckpt.pt: its optimizer does not fit muon_lr=0.0"):
        run_train(tmp_path / "split", pretrain_dir, "--max_iters=14", "--init_from='resume'", *common[1:])


def test_bad_config_keys_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="unknown config key 'n_layers'; valid keys: .*n_layer"):
        train.load_config(["--n_layers=3"])
    with pytest.raises(UserError, match="batch_size should be int"):
        train.load_config(["--batch_size=big"])
    with pytest.raises(UserError, match="loss_chunk_rows must be 'auto' or a whole number >= 0, got -1"):
        distributed.pick_loss_chunk_rows(train.load_config(["--loss_chunk_rows=-1"])["loss_chunk_rows"], "cpu")
    assert [distributed.pick_loss_chunk_rows("auto", d) for d in ("cpu", "cuda")] == [512, 0]
    cfg = tmp_path / "c.py"
    cfg.write_text("n_layer = 2\nlearnin_rate = 1e-3\n")
    with pytest.raises(UserError, match=f"{cfg}: unknown config key 'learnin_rate'"):
        train.load_config([str(cfg)])
    proc = run_script("train.py", "--max_iter=3", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --max_iter=3: unknown config key")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_missing_and_corrupt_checkpoints(tmp_path, pretrain_dir):
    proc = run_script(
        "train.py", f"--out_dir={tmp_path}", f"--data_dir={pretrain_dir}", "--init_from=resume", check=False
    )
    assert proc.returncode == 1 and f"{tmp_path / 'ckpt.pt'}: checkpoint not found" in proc.stderr
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    proc = run_script(
        "train.py", f"--out_dir={tmp_path}", f"--data_dir={pretrain_dir}", "--init_from=resume", check=False
    )
    assert (
        proc.returncode == 1 and "not a readable MiniGLM checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    )
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="missing model_args"):
        load_checkpoint(tmp_path / "other.pt")


@pytest.mark.slow
def test_resume_after_kill_with_dropout_and_measured_peak(tmp_path, pretrain_dir):
    """As the demo runs: dropout on, Muon, peak_flops='auto' (a matmul probe at start-up).
    A run killed (SIGKILL) after a checkpoint and resumed logs the uninterrupted run's
    losses bit for bit: the start-up probes leave the dropout RNG alone."""
    tiny = [a for a in TINY if not a.startswith("--peak_flops")]  # the default: 'auto'
    common = [
        *tiny,
        f"--data_dir={pretrain_dir}",
        "--block_size=64",
        "--dropout=0.1",
        "--muon_lr=0.02",
        "--eval_interval=6",
        "--lr_decay_iters=24",
    ]
    train.main([*common, f"--out_dir={tmp_path / 'full'}", "--max_iters=24"])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "train.py", *common, f"--out_dir={tmp_path / 'killed'}", "--max_iters=100000"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:  # the checkpoint of iteration 6 is written before iteration 7 runs
        if line.startswith("iter 8:"):
            proc.kill()
            break
    proc.wait(timeout=60)
    assert proc.returncode == -9
    killed_at = load_checkpoint(tmp_path / "killed" / "ckpt.pt")["iter_num"]
    assert 6 <= killed_at < 24
    train.main([*common, f"--out_dir={tmp_path / 'killed'}", "--max_iters=24", "--init_from='resume'"])
    full, resumed = read_log(tmp_path / "full", "train"), read_log(tmp_path / "killed", "train")
    assert [s["iter"] for s in resumed] == list(range(1, 25))
    assert [s["loss"] for s in resumed] == [s["loss"] for s in full]
    assert [e["val_loss"] for e in read_log(tmp_path / "killed", "eval")] == [
        e["val_loss"] for e in read_log(tmp_path / "full", "eval")
    ]


def start_training(args, wait_for="iter 2:", torchrun=False):
    """A long train.py run in the background, returned once it has logged `wait_for`."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
    proc = subprocess.Popen(
        [sys.executable, *launcher, "train.py", *args, "--max_iters=100000"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith(wait_for):
            return proc
    raise AssertionError(f"train.py ended before {wait_for!r}")


@pytest.mark.slow
def test_one_run_per_out_dir_and_a_dead_runs_lock_is_taken_over(tmp_path, pretrain_dir):
    args = [*TINY, f"--data_dir={pretrain_dir}", f"--out_dir={tmp_path}", "--eval_interval=2"]
    proc = start_training(args)
    try:
        second = run_script("train.py", *args, "--init_from=resume", check=False)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"{tmp_path}: another train.py is running on it (PID {proc.pid})" in second.stderr
    finally:
        proc.kill()
        proc.wait(timeout=60)
    at = load_checkpoint(tmp_path / "ckpt.pt")["iter_num"]
    run_train(tmp_path, pretrain_dir, f"--max_iters={at + 2}", "--eval_interval=2", "--init_from='resume'")
    assert read_log(tmp_path, "train")[-1]["iter"] == at + 2  # the lock the killed run left was taken over


@pytest.mark.slow
def test_torchrun_workers_stop_when_torchrun_is_killed(tmp_path, pretrain_dir):
    """SIGKILL reaches torchrun alone (its workers run in sessions of their own): they stop
    within seconds, and their locks on out_dir go with them."""
    proc = start_training(
        [*TINY, f"--data_dir={pretrain_dir}", f"--out_dir={tmp_path}", "--eval_interval=2"], torchrun=True
    )
    fd = os.open(tmp_path / "train.lock", os.O_RDWR)
    try:
        assert distributed.lock_holder(fd) is not None
        proc.kill()
        proc.wait(timeout=60)
        deadline = time.time() + 20
        while distributed.lock_holder(fd) is not None and time.time() < deadline:
            time.sleep(0.2)
        assert distributed.lock_holder(fd) is None, "a worker still holds out_dir 20 s after torchrun died"
    finally:
        os.close(fd)
