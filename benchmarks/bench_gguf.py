"""
llama.cpp against the project, decoding from the same weights at batch 1, all in one run: the
project's KV-cache greedy loop (generation.generate, eager), and llama.cpp through
llama-cpp-python on the GGUF export as f32 and q8_0, with the same number of threads. Also the
file sizes, and whether the greedy tokens agree.

  pip install -r requirements-gguf.txt      # compiles llama.cpp (~10 minutes on 2 cores)
  python benchmarks/bench_gguf.py --out_dir=out/tiny-sft
  python benchmarks/bench_gguf.py --out_dir=out/bench-45m     # the 45M shape (see benchmarks/README.md)
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from data_utils import UserError, run_cli  # noqa: E402
from miniglm.checkpoint import load_model  # noqa: E402
from miniglm.export.gguf import export, open_in_llama_cpp  # noqa: E402
from miniglm.generation import generate  # noqa: E402

PROMPT = "问:《静夜思》的作者是谁?\n答:"


def project_speed(model, ids, n, reps):
    """Tokens/s of the project's greedy decode (KV cache), the best of reps, and its tokens."""
    idx, best = torch.tensor([ids]), float("inf")
    for _ in range(reps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        out = generate(model, idx, n, temperature=0)
        best = min(best, time.perf_counter() - t0)
    return n / best, out[0, len(ids):].tolist()


def llama_speed(path, ids, n, reps, threads, n_ctx):
    llm = open_in_llama_cpp(path, n_ctx, threads)
    best, got = float("inf"), []
    for _ in range(reps + 1):
        llm.reset()
        got, t0 = [], time.perf_counter()
        for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            got.append(t)
            if len(got) == n:
                break
        best = min(best, time.perf_counter() - t0)
    return n / best, got


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out/tiny-sft")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise UserError("llama-cpp-python is not installed: pip install -r requirements-gguf.txt") from None
    torch.set_num_threads(args.threads)
    model, tok, _ = load_model(args.out_dir)
    model.eval()
    ids = tok.encode(PROMPT)
    n = min(args.new_tokens, model.context_size - len(ids))
    rows = [("project (PyTorch, eager, KV cache)", *project_speed(model, ids, n, args.reps), None)]
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in ("f32", "q8_0"):
            path, _ = export(args.out_dir, Path(tmp) / f"model-{qtype}.gguf", qtype)
            rows.append((f"llama.cpp {qtype}", *llama_speed(path, ids, n, args.reps, args.threads, model.context_size),
                         path.stat().st_size / 2**20))
    want = rows[0][2]
    print(f"{args.out_dir}: {model.num_params() / 1e6:.1f}M parameters, {n} new tokens at batch 1, "
          f"{args.threads} threads, best of {args.reps}")
    print("| decoder | tokens/s | × project | file | greedy tokens equal the project's |")
    print("| --- | --- | --- | --- | --- |")
    for name, speed, got, mib in rows:
        same = next((f"first {k} of {n}" for k, (a, b) in enumerate(zip(got, want)) if a != b), f"all {n}")
        print(f"| {name} | {speed:,.0f} | ×{speed / rows[0][1]:.2f} | {f'{mib:.1f} MiB' if mib else '-'} | {same} |")


if __name__ == "__main__":
    run_cli(main)
