"""
The whole pipeline in one command, on a CPU in under 8 minutes: fetch the default data →
prepare (a BPE trained on its train split) → prepare SFT and its choice questions (in that
BPE) → tiny pretrain (scoring the dev choice questions at each evaluation) → tiny SFT →
[--align=dpo: preference pairs of its own answers → tiny DPO; --align=grpo: tiny GRPO] →
evaluate against the model before the last stage → report.

The data: Debian's fortunes-zh where it is installed (the README's figures), else the
corpus committed in assets/embedded/ (classical Chinese, no apt needed); --data picks.

Everything it writes goes under --out (default out/): the checkpoints, eval.json, and
out/tiny-sft/report.md with its loss plots. Tracked files are left alone unless
--refresh_docs asks to copy the new plots over the README's (docs/loss.png, docs/curves.png).

  python demo.py
  python demo.py --smoke      # a 1-minute run of every step with a handful of iterations
  python demo.py --data embedded
  python demo.py --finetune=lora     # LoRA instead of full SFT (or ptuning: P-Tuning v2), out/tiny-lora
  python demo.py --finetune=ptuning --reuse_pretrain   # keep out/tiny-pretrain from an earlier run
  python demo.py --align=dpo         # then the third stage: DPO on the model's own answers, out/tiny-dpo
  python demo.py --align=grpo        # or GRPO: its sampled answers rewarded (right author, next line), out/tiny-grpo
"""
import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
FORTUNES = Path("/usr/share/games/fortunes/tang300")  # data/fetch_data.py reads it and its siblings
PRETRAIN_CONFIG = "config/train_tiny_cpu.py"
SFT_CONFIGS = {"full": "config/sft_tiny_cpu.py", "lora": "config/sft_lora_tiny_cpu.py",
               "ptuning": "config/sft_ptuning_tiny_cpu.py"}


def sft_rows(method, overrides=()):
    """Tokens per SFT row for a method (its config, then train.py --key=value overrides): the
    tiny pretrain's block_size (256); with a P-Tuning prefix, as many as fit beside it
    (block_size + 1 - its virtual tokens: the model sees a row less its last token)."""
    from train import load_config
    block = load_config([str(ROOT / PRETRAIN_CONFIG)])["block_size"]
    if method != "ptuning":
        return block
    return block + 1 - load_config([str(ROOT / SFT_CONFIGS[method]), *overrides])["num_virtual_tokens"]


def step(title, *args):
    print(f"\n=== {title}: python {' '.join(map(str, args))}", flush=True)
    t0 = time.time()
    if subprocess.run([sys.executable, *map(str, args)], cwd=ROOT).returncode != 0:
        sys.exit(f"error: the step '{title}' failed (its message is above)")
    print(f"--- {title}: {time.time() - t0:.0f}s", flush=True)


def parse_args():
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a few iterations per step, to check everything runs")
    p.add_argument("--out", default="out", help="where the runs go (out/tiny-pretrain, out/tiny-sft)")
    p.add_argument("--data", default="auto", choices=["auto", "fortunes-zh", "embedded"],
                   help="auto: fortunes-zh where the Debian package is installed, else the embedded corpus")
    p.add_argument("--finetune", default="full", choices=["full", "lora", "ptuning"],
                   help="how SFT trains: every weight, or an adapter on the frozen pretrain (docs/finetune.md)")
    p.add_argument("--reuse_pretrain", action="store_true",
                   help="keep the pretrained model of an earlier run (its best.pt) instead of training it again")
    p.add_argument("--align", default="none", choices=["none", "dpo", "grpo"],
                   help="after SFT, align the model: dpo = preference pairs of its own answers, grpo = rewards "
                        "that can be checked (docs/align.md)")
    p.add_argument("--reuse_sft", action="store_true", help="keep the SFT model of an earlier run (its best.pt)")
    p.add_argument("--refresh_docs", action="store_true",
                   help="copy the run's loss.png and curves.png over docs/ (the README's pictures)")
    return p.parse_args()


def pick_data(choice):
    """The pretraining corpus: fortunes-zh where the Debian package is installed, else the embedded one."""
    if choice != "auto":
        return choice
    if FORTUNES.exists():
        return "fortunes-zh"
    print("note: the Debian package fortunes-zh is not installed; running on the embedded corpus "
          "(assets/embedded/; --data fortunes-zh after installing it gives the README's figures)")
    return "embedded"


def reusing(args, pre, sft):
    """(keep the pretrained model, keep the SFT model): what --reuse_pretrain and --reuse_sft find."""
    return args.reuse_pretrain and (pre / "best.pt").is_file(), args.reuse_sft and (sft / "best.pt").is_file()


def prepare(args, data, data_dir, pre, sft, sft_data, rows):
    """Fetch, tokenize (and train the BPE); the SFT set and its choice questions in the model's
    vocabulary (that BPE), before pretraining, which scores the dev choice questions as it goes."""
    keep_pre, keep_sft = reusing(args, pre, sft)
    if keep_pre:
        print(f"note: --reuse_pretrain: keeping {pre / 'best.pt'} (fetch, prepare and pretraining skipped)")
    else:
        step(f"fetch the default data ({data})", "data/fetch_data.py", data)
        step("tokenize for pretraining, train the BPE on the train split", "data/prepare.py", data)
    if keep_sft:
        print(f"note: --reuse_sft: keeping {sft / 'best.pt'} (its data in {sft_data})")
        return
    from train import load_config
    vocab = pre if keep_pre else data_dir / f"bpe-{load_config([str(ROOT / PRETRAIN_CONFIG)])['vocab_size']}.json"
    step("build the SFT set and its choice questions in the model's vocabulary", "data/prepare_sft.py",
         f"--vocab={vocab}", "--pack", f"--poems={data_dir / 'docs.jsonl'}", f"--block_size={rows}",
         f"--out_dir={sft_data}")


def pretrain(args, data_dir, pre, sft, sft_data, quick):
    """Pretrain: out/tiny-pretrain, the dev choice questions scored at each evaluation."""
    if not reusing(args, pre, sft)[0]:
        step("tiny pretrain", "train.py", PRETRAIN_CONFIG, f"--data_dir={data_dir}", f"--out_dir={pre}",
             f"--choice_set={Path(sft_data) / 'choices_dev.jsonl'}", *quick)


def finetune(args, pre, sft, sft_data, quick):
    """SFT (full, LoRA or P-Tuning) on the SFT set."""
    if not reusing(args, pre, sft)[1]:
        step(f"tiny SFT ({args.finetune})", "train.py", SFT_CONFIGS[args.finetune], f"--out_dir={sft}",
             f"--init_from={pre / 'best.pt'}", f"--data_dir={sft_data}", *quick)


def align(args, sft, sft_data, rows, quick):
    """The third stage, if asked for: DPO on pairs of the SFT model's own answers, or GRPO.
    Returns the stage's out_dir, or None."""
    if args.align == "dpo":
        final = Path(args.out) / "tiny-dpo"
        step("preference pairs from the SFT model's own answers (train questions only)", "data/prepare_pairs.py",
             f"--vocab={sft}", "--on_policy", f"--sft_data={sft_data}", f"--block_size={rows}", "--out_dir=data/pairs",
             *(["--max_questions=40"] if args.smoke else []))
        step("tiny DPO", "train.py", "config/dpo_tiny_cpu.py", f"--out_dir={final}", f"--init_from={sft / 'best.pt'}",
             "--data_dir=data/pairs", f"--choice_set={Path(sft_data) / 'choices_dev.jsonl'}", *quick)
        return final
    if args.align == "grpo":
        final = Path(args.out) / "tiny-grpo"
        step("tiny GRPO: the model's own answers, rewarded", "train.py", "config/grpo_tiny_cpu.py",
             f"--out_dir={final}", f"--init_from={sft / 'best.pt'}", f"--data_dir={sft_data}", *quick)
        return final
    return None


def main():
    args = parse_args()
    pre = Path(args.out) / "tiny-pretrain"
    sft = Path(args.out) / {"full": "tiny-sft", "lora": "tiny-lora", "ptuning": "tiny-ptuning"}[args.finetune]
    # P-Tuning's virtual tokens take some of the model's positions: its SFT rows are shorter
    rows = sft_rows(args.finetune)
    sft_data = f"data/sft-{rows}" if args.finetune == "ptuning" else "data/sft"
    quick = ["--max_iters=8", "--eval_interval=4", "--eval_iters=2", "--log_interval=2"] if args.smoke else []
    data = pick_data(args.data)
    data_dir = Path("data") / data
    t0 = time.time()
    prepare(args, data, data_dir, pre, sft, sft_data, rows)
    pretrain(args, data_dir, pre, sft, sft_data, quick)
    finetune(args, pre, sft, sft_data, quick)
    aligned = align(args, sft, sft_data, rows, quick)
    final, compare = (aligned, sft) if aligned else (sft, pre)  # the last stage, against the one before it
    step(f"evaluate {final.name} vs {compare.name}, write the report", "evaluations.py", f"--out_dir={final}",
         f"--compare={compare}", f"--pretrain_data={data_dir}", f"--sft_data={sft_data}", "--show=6",
         *(["--questions=4", "--max_batches=2"] if args.smoke else ["--questions=100"]))
    if args.refresh_docs:
        for name in ("loss.png", "curves.png"):
            shutil.copyfile(final / name, ROOT / "docs" / name)
        print("copied loss.png and curves.png to docs/")
    print(f"\nall done in {time.time() - t0:.0f}s. Report: {final / 'report.md'}\n"
          f"Next: python sample.py --out_dir={final} --chat   or   python sample_gradio.py")

if __name__ == "__main__":
    main()
