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
from miniglm.inside import forward_inside, head_scores, look  # noqa: E402
from miniglm.metrics import held_out_questions  # noqa: E402


def heads_table(name, scores):
    """A markdown table: a row per layer, a cell per head: previous-token / induction score on
    repeated random tokens, and the previous-token score on real text."""
    heads = len(scores["induction"][0])
    u = scores["uniform"]
    lines = [f"`{name}`: previous-token / induction score on {scores['rows']} sequences of {scores['tokens']} random "
             f"tokens, each repeated once (even attention would score {u['previous_token']:.3f} / "
             f"{u['induction']:.3f}); previous-token score on real text"
             + (f" (even attention: {u['previous_token_text']:.3f})" if "previous_token_text" in u else ""), "",
             "| layer | " + " | ".join(f"head {h + 1}" for h in range(heads)) + " |", "|---" * (heads + 1) + "|"]
    for i, (prev, ind) in enumerate(zip(scores["previous_token"], scores["induction"])):
        text = scores.get("previous_token_text", [[None] * heads] * (i + 1))[i]
        lines.append(f"| {i + 1} | " + " | ".join(
            f"{p:.3f} / {d:.3f}; text {t:.3f}" if t is not None else f"{p:.3f} / {d:.3f}"
            for p, d, t in zip(prev, ind, text)) + " |")
    return "\n".join(lines)


def lens_table(runs, questions):
    """How the answer forms across the layers: for the reference answers of held-out questions, fed
    in the 问/答 template to each model, the share of answer tokens that each layer's logit lens
    already predicts (the next token is its top one) and the median rank of the next token."""
    shares = {}
    for run in runs:
        model, tok, _ = load_model(run, "cpu")
        ranks = [[] for _ in range(model.config.n_layer + 1)]  # per layer: the next token's rank, each answer token
        for question, reference in questions:
            views = look(model, tok, question, reference, "qa")
            for layer, row in enumerate(views["lens"]["next_rank"]):
                ranks[layer] += row[views["start"] - 1:len(views["ids"]) - 1]  # the positions predicting the answer
        shares[run] = [(sum(r == 0 for r in rs) / len(rs), statistics.median(rs)) for rs in ranks]
    layers = max(len(v) for v in shares.values())
    lines = [f"answer tokens of {len(questions)} held-out questions (reference answers, 问/答 template): the share "
             "whose next token is the lens's top one / the next token's median rank", "",
             "| layer | " + " | ".join(f"`{r}`" for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for i in range(layers):
        name = "embedding" if i == 0 else f"block {i}"
        lines.append(f"| {name} | " + " | ".join(f"{shares[r][i][0]:.3f} / {shares[r][i][1]:g}" for r in runs) + " |")
    return "\n".join(lines)


def real_texts(model, tok, data_dir, n=8):
    """n windows of the pretraining val text (in the model's vocabulary), context_size tokens each."""
    from data_utils import PretrainData
    tokens = PretrainData(data_dir, model.context_size, tok).tokens("val")
    T = model.context_size
    return [tok.from_file_ids(tokens[i * T:(i + 1) * T]).tolist() for i in range(min(n, len(tokens) // T))]


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
    p.add_argument("--sft_data", default="data/sft", help="held-out questions for the logit lens table ('' skips it)")
    p.add_argument("--lens_questions", type=int, default=100)
    p.add_argument("--text_data", default="data/fortunes-zh",
                   help="a pretraining data folder whose val text gives the previous-token score on real text")
    args = p.parse_args()
    torch.manual_seed(0)
    for run in args.runs:
        model, tok, _ = load_model(run, "cpu")
        texts = real_texts(model, tok, args.text_data) if args.text_data else ()
        print(heads_table(run, head_scores(model, rows=args.rows, texts=texts)) + "\n")
    if args.sft_data:
        print(lens_table(args.runs, held_out_questions(args.sft_data, args.lens_questions)) + "\n")
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
