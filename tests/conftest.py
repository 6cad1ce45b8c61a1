"""Shared fixtures: real data (the embedded corpus, which needs no apt), prepared once per
session into a temp folder, and the flags of a tiny model that trains in seconds on CPU."""
import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from miniglm.distributed import free_port  # noqa: E402,F401  (a port for a test's server or torchrun rendezvous)

FORTUNES = Path("/usr/share/games/fortunes/tang300")
SHARED_POETRY = ROOT.parent / "shared" / "data" / "chinese-poetry"

# a 2-layer, 32-wide model: most of its 1.6M parameters are the GPT-2 vocabulary's embedding
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--device=cpu", "--eval_iters=4", "--log_interval=1",
        "--peak_flops=1e11", "--warmup_iters=2", "--learning_rate=3e-3", "--min_lr=3e-4", "--dropout=0.0"]


def load_script(relpath):
    """Import one of the data/ scripts (not a package) as a module."""
    import importlib.util
    name = Path(relpath).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# Scripts run here as `python SCRIPT ARGS` would run them (the script as __main__, its argv, cwd ROOT,
# stdout/stderr captured, the exit status from SystemExit, a traceback for anything else), in this
# process: starting Python and importing torch and transformers again cost 1.5-5 s a call. A real
# process is started where the process is part of what is tested (isolated=True), for bytes in argv,
# for subprocess options (env, input, timeout), and for scripts that set process-wide state.
OWN_PROCESS = {"serve.py", "demo.py", "-c"}  # serve.py sets torch's threads; demo.py runs its steps as processes


def run_script(*args, check=True, isolated=False, **kw):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    args = [a if isinstance(a, bytes) else str(a) for a in args]
    if isolated or kw or args[0] in OWN_PROCESS or any(isinstance(a, bytes) for a in args):
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, **kw)
    else:
        proc = run_in_this_process(args)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_in_this_process(args):
    """(stdout, stderr, exit status) of running the script args[0] with args[1:], as Python would."""
    script = ROOT / args[0]
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_path, saved_cwd = sys.argv, list(sys.path), os.getcwd()
    code = 0
    try:
        os.chdir(ROOT)
        sys.argv = [str(script), *args[1:]]
        sys.path.insert(0, str(script.parent))  # (python puts the script's folder first)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(script), run_name="__main__")
            except SystemExit as e:
                if isinstance(e.code, str):  # sys.exit("message"): printed, status 1
                    print(e.code, file=sys.stderr)
                    code = 1
                else:
                    code = e.code or 0
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def make_sft_data(docs, out, *extra, **kw):
    """data/prepare_sft.py's default set from the poems of docs, a seeded sample of 400 of
    them (fast), in rows of 65 tokens."""
    return run_script("data/prepare_sft.py", "--poems", docs, "--max_poems", "400", "--out_dir", out,
                      "--block_size", "65", *extra, **kw)


def torchrun_train(n, *args, check=True, timeout=300):
    """train.py with args as n gloo processes under torchrun on this machine (one thread each);
    returns the CompletedProcess, its exit status checked unless check=False."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           "train.py", *args], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def train_single_and_ddp(args, tmp_path):
    """train.py with args in one process (out_dir tmp_path/single) and as 2 gloo processes
    under torchrun (tmp_path/ddp); returns torchrun's CompletedProcess, checked."""
    import train
    train.main([*args, f"--out_dir={tmp_path / 'single'}"])
    return torchrun_train(2, *args, f"--out_dir={tmp_path / 'ddp'}")


def assert_same_training(single, distributed, iters):
    """A distributed run logged the single-process run's losses and ended with its weights
    (an adapter run's: the adapter's)."""
    import torch

    from miniglm.checkpoint import load_checkpoint
    one, many = read_log(single, "train"), read_log(distributed, "train")
    assert len(many) == iters
    for a, b in zip(one, many):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
    w1 = load_checkpoint(single / "ckpt.pt")["model"]
    w2 = load_checkpoint(distributed / "ckpt.pt")["model"]
    assert sorted(w1) == sorted(w2) and all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


def read_log(out_dir, kind):
    lines = (Path(out_dir) / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="session")
def corpus_docs(tmp_path_factory):
    """The embedded corpus (assets/embedded/: 6,281 classical texts), fetched as a user
    would: the tests need no apt package."""
    out = tmp_path_factory.mktemp("embedded")
    run_script("data/fetch_data.py", "embedded", "--out_dir", out)
    return out / "docs.jsonl"


@pytest.fixture(scope="session")
def fortunes_docs(tmp_path_factory):
    """Debian's fortunes-zh, where it is installed (the demo's default there)."""
    if not FORTUNES.exists():
        pytest.skip("the Debian package fortunes-zh is not installed")
    out = tmp_path_factory.mktemp("fortunes")
    run_script("data/fetch_data.py", "fortunes-zh", "--out_dir", out)
    return out / "docs.jsonl"


@pytest.fixture(scope="session")
def pretrain_dir(corpus_docs):
    run_script("data/prepare.py", "--docs", corpus_docs, "--num_threads", "2")
    return corpus_docs.parent


@pytest.fixture(scope="session")
def sft_dir(corpus_docs, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    make_sft_data(corpus_docs, out)
    return out


@pytest.fixture(scope="session")
def sft_packed_dir(corpus_docs, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_packed")
    make_sft_data(corpus_docs, out, "--pack")
    return out


@pytest.fixture
def data_dir(request):
    """The data folder of one training mode: pretrain, sft or sft-packed."""
    return request.getfixturevalue(
        {"pretrain": "pretrain_dir", "sft": "sft_dir", "sft-packed": "sft_packed_dir"}[request.param]
    )


@pytest.fixture(scope="session")
def tiny_runs(pretrain_dir, corpus_docs, tmp_path_factory):
    """A tiny pretrained model with the vocabulary trimmed to the corpus, and its SFT on
    data tokenized with that model's vocabulary, trained for real (a few dozen iterations)."""
    import train

    out = tmp_path_factory.mktemp("runs")
    train.main(
        [
            *TINY,
            "--block_size=64",
            "--vocab=trimmed",
            f"--data_dir={pretrain_dir}",
            f"--out_dir={out / 'pre'}",
            "--max_iters=30",
            "--eval_interval=15",
        ]
    )
    make_sft_data(corpus_docs, out / "sft-data", "--vocab", out / "pre")
    train.main(
        [
            *TINY,
            f"--data_dir={out / 'sft-data'}",
            f"--out_dir={out / 'sft'}",
            f"--init_from={out / 'pre' / 'best.pt'}",
            "--max_iters=30",
            "--eval_interval=15",
            "--batch_size=8",
        ]
    )
    return out / "pre", out / "sft"


@pytest.fixture(scope="session")
def tiny_sft_data(tiny_runs):
    """The SFT data of tiny_runs, in its trimmed vocabulary."""
    return tiny_runs[0].parent / "sft-data"


@pytest.fixture(scope="session")
def vocab_runs(pretrain_dir, corpus_docs, tmp_path_factory):
    """A tiny pretrain and its packed SFT for the full GPT-2 vocabulary and the trained BPE
    (tiny_runs has the trimmed one). The BPE model has rotary positions, as the demo's."""
    import train

    runs = {}
    for vocab in ("gpt2", "bpe"):
        out = tmp_path_factory.mktemp(vocab)
        train.main(
            [
                *TINY,
                "--block_size=64",
                f"--vocab={vocab}",
                f"--data_dir={pretrain_dir}",
                f"--out_dir={out / 'pre'}",
                "--max_iters=20",
                "--eval_interval=10",
                f"--rope={vocab == 'bpe'}",
            ]
        )
        make_sft_data(corpus_docs, out / "sft-data", "--vocab", out / "pre", "--pack")
        train.main(
            [
                *TINY,
                f"--data_dir={out / 'sft-data'}",
                f"--out_dir={out / 'sft'}",
                "--max_iters=10",
                f"--init_from={out / 'pre' / 'best.pt'}",
                "--eval_interval=5",
                "--batch_size=8",
            ]
        )
        runs[vocab] = out
    return runs


@pytest.fixture(scope="session")
def learned_positions_bpe(pretrain_dir, tmp_path_factory):
    """A tiny pretrain on the trained BPE with learned positions, vocab_runs' "bpe" with rope off:
    GPT-2's architecture in transformers and llama.cpp (test_peft, test_gguf)."""
    import train
    out = tmp_path_factory.mktemp("learned-positions")
    train.main([*TINY, "--block_size=64", "--vocab=bpe", f"--data_dir={pretrain_dir}", f"--out_dir={out}",
                "--max_iters=20", "--eval_interval=20", "--rope=False"])
    return out
