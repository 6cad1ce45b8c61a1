"""
Looking inside the model (miniglm/inside.py), measured:

1. What the heads of each model do: the previous-token and the induction score of every layer
   and head on repeated random tokens (a markdown table; docs/inside.md).
2. That the normal paths keep their speed: a training step (forward + backward, the fused loss)
   and greedy decoding (KV cache) with this model.py against the model.py of an earlier commit
   (--before), the same weights, alternating, in one run; the ratio is what counts. And what one
   look inside costs against a plain forward pass of the same tokens.

  python benchmarks/bench_inside.py --runs out/tiny-pretrain out/tiny-sft --before=HEAD~3
"""
import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from data_utils import UserError, run_cli  # noqa: E402
from miniglm.checkpoint import load_model  # noqa: E402
from miniglm.generation import generate  # noqa: E402
from miniglm.inside import forward_inside, head_scores  # noqa: E402


def heads_table(name, scores):
    """A markdown table: a row per layer, a cell per head: previous-token / induction score."""
    heads = len(scores["induction"][0])
    lines = [f"`{name}` (previous-token / induction; {scores['rows']} sequences of {scores['tokens']} random "
             "tokens, each repeated once)", "", "| layer | " + " | ".join(f"head {h + 1}" for h in range(heads)) + " |",
             "|---" * (heads + 1) + "|"]
    for i, (prev, ind) in enumerate(zip(scores["previous_token"], scores["induction"])):
        lines.append(f"| {i + 1} | " + " | ".join(f"{p:.2f} / {d:.2f}" for p, d in zip(prev, ind)) + " |")
    return "\n".join(lines)


def model_module_at(rev):
    """model.py as it was at a git revision, imported under another name."""
    source = subprocess.run(["git", "show", f"{rev}:model.py"], cwd=ROOT, capture_output=True, text=True)
    if source.returncode:
        raise UserError(f"--before={rev}: {source.stderr.strip()}")
    path = Path(tempfile.mkdtemp()) / "model_before.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("model_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(run, before, repeats, batch):
    """Median seconds of a training step and of a greedy decode, this model.py and before's, alternating."""
    model, tok, _ = load_model(run, "cpu")
    old = before.GPT(before.GPTConfig(**{k: getattr(model.config, k) for k in model.config.__dataclass_fields__}))
    old.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    T = model.config.block_size
    x = torch.randint(0, tok.n_tokens, (batch, T + 1), generator=g)
    prompt = x[:1, :16]

    def step(m):
        m.train()
        m.loss_chunk_rows = 512
        _, loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        m.zero_grad(set_to_none=True)

    def decode(m):
        m.eval()
        generate(m, prompt, 64, temperature=0)

    rows = {}
    for name, fn in (("training step", step), ("greedy decode, 64 tokens", decode)):
        fn(model), fn(old)  # warm-up
        now, then = [], []
        for _ in range(repeats):  # alternating, so that both see the same machine
            then.append(median_time(lambda: fn(old), 1))
            now.append(median_time(lambda: fn(model), 1))
        rows[name] = (statistics.median(then), statistics.median(now))
    model.eval()
    ids = x[0, :T].tolist()
    plain = median_time(lambda: model(torch.tensor([ids])), repeats)
    looked = median_time(lambda: forward_inside(model, ids), repeats)
    return rows, (plain, looked, T)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["out/tiny-pretrain", "out/tiny-sft"])
    p.add_argument("--before", help="a git revision whose model.py to time against (default: no speed table)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="rows of a training step")
    p.add_argument("--rows", type=int, default=16, help="random sequences for the head scores")
    args = p.parse_args()
    torch.manual_seed(0)
    for run in args.runs:
        model, _, _ = load_model(run, "cpu")
        print(heads_table(run, head_scores(model, rows=args.rows)) + "\n")
    if args.before:
        before = model_module_at(args.before)
        rows, (plain, looked, tokens) = speed(args.runs[-1], before, args.repeats, args.batch)
        print(f"| `{args.runs[-1]}`, CPU, torch {torch.__version__} | model.py of {args.before} | this model.py | "
              "ratio (this / before) |\n|---|---|---|---|")
        for name, (then, now) in rows.items():
            print(f"| {name} | {then * 1000:.1f} ms | {now * 1000:.1f} ms | {now / then:.3f} |")
        print(f"\none look inside ({tokens} tokens): {looked * 1000:.1f} ms "
              f"against a plain forward pass: {plain * 1000:.1f} ms ({looked / plain:.2f}x)")


if __name__ == "__main__":
    run_cli(main)
