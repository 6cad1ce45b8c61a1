"""
The whole pipeline in one command, on the embedded default data, on a CPU in ~6 minutes:
fetch fortunes-zh → prepare → tiny pretrain (vocabulary trimmed to the data) → prepare SFT
(in that vocabulary) → tiny SFT → evaluate against the pretrained model → report.

Everything it writes goes under --out (default out/): the checkpoints, eval.json, and
out/tiny-sft/report.md with its loss plots. Tracked files are left alone unless
--refresh_docs asks to copy the new plots over the README's (docs/loss.png, docs/curves.png).

  python demo.py
  python demo.py --smoke      # a 1-minute run of every step with a handful of iterations
"""
import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def step(title, *args):
    print(f"\n=== {title}: python {' '.join(map(str, args))}", flush=True)
    t0 = time.time()
    if subprocess.run([sys.executable, *map(str, args)], cwd=ROOT).returncode != 0:
        sys.exit(f"error: the step '{title}' failed (its message is above)")
    print(f"--- {title}: {time.time() - t0:.0f}s", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few iterations per step, to check everything runs")
    p.add_argument("--out", default="out", help="where the runs go (out/tiny-pretrain, out/tiny-sft)")
    p.add_argument("--refresh_docs", action="store_true",
                   help="copy the run's loss.png and curves.png over docs/ (the README's pictures)")
    args = p.parse_args()
    pre, sft = Path(args.out) / "tiny-pretrain", Path(args.out) / "tiny-sft"
    quick = ["--max_iters=8", "--eval_interval=4", "--eval_iters=2", "--log_interval=2"] if args.smoke else []
    t0 = time.time()
    step("fetch the embedded default (Debian fortunes-zh)", "data/fetch_data.py", "fortunes-zh")
    step("tokenize for pretraining", "data/prepare.py", "fortunes-zh")
    step("tiny pretrain", "train.py", "config/train_tiny_cpu.py", f"--out_dir={pre}", *quick)
    step("build the SFT set in the pretrained model's vocabulary", "data/prepare_sft.py", f"--vocab={pre}", "--pack")
    step("tiny SFT", "train.py", "config/sft_tiny_cpu.py", f"--out_dir={sft}", f"--init_from={pre / 'best.pt'}", *quick)
    step("evaluate SFT vs pretrained, write the report", "evaluations.py", f"--out_dir={sft}", f"--compare={pre}",
         "--show=6", *(["--questions=4", "--max_batches=2"] if args.smoke else ["--questions=100"]))
    if args.refresh_docs:
        for name in ("loss.png", "curves.png"):
            shutil.copyfile(sft / name, ROOT / "docs" / name)
        print("copied loss.png and curves.png to docs/")
    print(f"\nall done in {time.time() - t0:.0f}s. Report: {sft / 'report.md'}\n"
          f"Next: python sample.py --out_dir={sft} --chat   or   python sample_gradio.py")


if __name__ == "__main__":
    main()
