"""
Plot training curves from the log.jsonl of one or more runs (train.py writes it).

  python visualize.py --runs out/tiny-pretrain out/tiny-sft            # writes plots/*.png
  python visualize.py --runs out/a out/b out/c --log_y --out_dir plots/compare

Writes loss.png (train and val loss vs iteration, one panel per run kind: pretraining and
SFT side by side, several runs of a kind overlaid with a legend) and curves.png (loss vs
iteration and vs tokens, learning rate, tokens/s, pretraining val bits per character,
which compares across vocabularies where nats per token do not, and the accuracy on the dev
choice questions, what the model knows, where train.py scored them); for DPO runs also dpo.png
(trl's reward metrics: chosen and rejected rewards, margin, accuracy), for GRPO runs grpo.png
(reward and its spread, flat groups, KL, entropy, answer length, dev pass@1).
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from data_utils import UserError, run_cli  # noqa: E402


def read_run(run):
    path = Path(run) / "log.jsonl" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise UserError(f"{path}: no log.jsonl (train a model with train.py first)")
    train, evals = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if r["kind"] in ("train", "eval"):  # (the last line, "memory", is not a curve)
                (train if r["kind"] == "train" else evals).append(r)
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{lineno}: not a train.py log line") from None
    if not train and not evals:
        raise UserError(f"{path}: empty log")
    modes = {r.get("mode") for r in train + evals}
    kind = "DPO" if "dpo" in modes else "GRPO" if "grpo" in modes else "SFT" if "sft" in modes else "pretrain"
    return {"name": str(Path(run)), "train": train, "eval": evals, "kind": kind}


def plot_loss(ax, run, color, x="iter", log_y=False):
    if run["train"]:
        ax.plot([r[x] for r in run["train"]], [r["loss"] for r in run["train"]], color=color, alpha=0.6,
                label=f"{run['name']} train")
    if run["eval"]:
        ax.plot([r[x] for r in run["eval"]], [r["val_loss"] for r in run["eval"]], "o--", color=color,
                label=f"{run['name']} val")
    ax.set_xlabel("iteration" if x == "iter" else "tokens seen")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_runs(runs, out, log_y=False):
    """Write loss.png and curves.png for runs (read_run results) into out; their paths."""
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        run["color"] = colors[i % len(colors)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    kinds = sorted({r["kind"] for r in runs}, key=lambda k: k != "pretrain")
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for run in (r for r in runs if r["kind"] == kind):
            plot_loss(ax, run, run["color"], log_y=log_y)
        ax.set_title(f"{kind} loss" + {"SFT": " (answer tokens only)", "DPO": " (ln 2 = 0.693 at the start)",
                                       "GRPO": " (policy gradient; val: SFT answer loss)"}.get(kind, ""))
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)

    bpc_runs = [r for r in runs if any(e.get("val_bpc") is not None for e in r["eval"])]
    choice_runs = [r for r in runs if any("dev_choice_acc" in e for e in r["eval"])]
    wide = bool(bpc_runs or choice_runs)
    fig, axes = plt.subplots(2, 3 if wide else 2, figsize=(18 if wide else 12, 8), squeeze=False)
    for run in runs:
        plot_loss(axes[0, 0], run, run["color"], log_y=log_y)
        plot_loss(axes[0, 1], run, run["color"], x="tokens", log_y=log_y)
        axes[1, 0].plot([r["iter"] for r in run["train"]], [r["lr"] for r in run["train"]], color=run["color"],
                        label=run["name"])
        axes[1, 1].plot([r["iter"] for r in run["train"]], [r["tokens_per_s"] for r in run["train"]],
                        color=run["color"], label=run["name"])
    axes[0, 0].set_title("loss vs iteration")
    axes[0, 1].set_title("loss vs tokens")
    axes[1, 0].set(title="learning rate", xlabel="iteration", ylabel="learning rate")
    axes[1, 1].set(title="training throughput", xlabel="iteration", ylabel="tokens / s")
    panels = list(axes[1, :2])
    if bpc_runs:
        ax = axes[0, 2]
        for run in bpc_runs:
            points = [e for e in run["eval"] if e.get("val_bpc") is not None]
            ax.plot([e["tokens"] for e in points], [e["val_bpc"] for e in points], "o-", color=run["color"],
                    label=run["name"])
        ax.set(title="pretraining val bits per character", xlabel="tokens seen", ylabel="bits / character")
        panels.append(ax)
    elif wide:
        axes[0, 2].axis("off")
    if choice_runs:
        plot_choices(axes[1, 2], choice_runs)
        panels.append(axes[1, 2])
    elif wide:
        axes[1, 2].axis("off")
    for ax in panels:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    dpo_runs, grpo_runs = ([r for r in runs if r["kind"] == k] for k in ("DPO", "GRPO"))
    return [out / "loss.png", out / "curves.png"] + ([plot_dpo(dpo_runs, out)] if dpo_runs else []) + \
        ([plot_grpo(grpo_runs, out)] if grpo_runs else [])


def plot_choices(ax, runs):
    """What the model knows: accuracy on the dev choice questions (by log-likelihood) at each
    evaluation, against chance (1 in 4)."""
    for run in runs:
        points = [e for e in run["eval"] if "dev_choice_acc" in e]
        ax.plot([e["iter"] for e in points], [e["dev_choice_acc"] for e in points], "o-", color=run["color"],
                label=f"{run['name']} acc")
        ax.plot([e["iter"] for e in points], [e["dev_choice_acc_norm"] for e in points], "s:", color=run["color"],
                alpha=0.6, label=f"{run['name']} acc_norm")
    ax.axhline(0.25, color="gray", linestyle="--", linewidth=1, label="chance (1 in 4)")
    ax.set(title="dev choice questions: accuracy by log-likelihood", xlabel="iteration", ylabel="accuracy")


def plot_grpo(runs, out):
    """grpo.png: the reward (mean and its spread within groups), flat groups, KL and entropy,
    answer length, and greedy pass@1 on the dev questions at each evaluation."""
    fig, axes = plt.subplots(2, 3, figsize=(18, 8))
    panels = [("reward", "mean reward (band: spread within groups)"), ("zero_spread_groups", "share of flat groups"),
              ("kl", "KL to the reference (k3)"), ("entropy", "entropy of the answers (nats/token)"),
              ("answer_tokens", "tokens per answer")]
    for run in runs:
        it = [r["iter"] for r in run["train"]]
        for ax, (key, title) in zip(axes.flat, panels):
            ax.plot(it, [r[key] for r in run["train"]], color=run["color"], label=run["name"])
            ax.set(title=title, xlabel="iteration")
        mean, std = [r["reward"] for r in run["train"]], [r["reward_std"] for r in run["train"]]
        axes[0, 0].fill_between(it, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=run["color"], alpha=0.2)
        for key in sorted({k for e in run["eval"] for k in e if k.startswith("dev_pass@1_")}):
            points = [e for e in run["eval"] if key in e]
            label = f"{run['name']} {key[len('dev_pass@1_'):]}"
            axes[1, 2].plot([e["iter"] for e in points], [e[key] for e in points], "o-", label=label)
    axes[1, 2].set(title="greedy pass@1 on dev questions (key facts)", xlabel="iteration")
    return save_panels(fig, axes.flat, out / "grpo.png")


def plot_dpo(runs, out):
    """dpo.png: trl's reward metrics of DPO runs, train (lines) and val pairs (points)."""
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.2))
    for run in runs:
        for ax, keys in zip(
            axes, (("rewards/chosen", "rewards/rejected"), ("rewards/margins",), ("rewards/accuracies",))
        ):
            for key, style in zip(keys, ("-", ":")):
                ax.plot(
                    [r["iter"] for r in run["train"]],
                    [r[key] for r in run["train"]],
                    style,
                    color=run["color"],
                    alpha=0.7,
                    label=f"{run['name']} {key}",
                )
                points = [e for e in run["eval"] if f"val_{key}" in e]
                ax.plot(
                    [e["iter"] for e in points],
                    [e[f"val_{key}"] for e in points],
                    "o",
                    color=run["color"],
                    label=f"{run['name']} val {key}",
                )
    for ax, title in zip(
        axes,
        (
            "rewards: beta x (log pi - log ref), chosen and rejected",
            "reward margin",
            "reward accuracy (chosen > rejected)",
        ),
    ):
        ax.set(title=title, xlabel="iteration")
    return save_panels(fig, axes, out / "dpo.png")


def save_panels(fig, axes, path):
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--runs", nargs="+", default=["out/tiny-pretrain", "out/tiny-sft"], help="out_dirs or log.jsonl files"
    )
    p.add_argument("--out_dir", default="plots")
    p.add_argument("--log_y", action="store_true", help="log-scale loss axes")
    args = p.parse_args()
    paths = plot_runs([read_run(r) for r in args.runs], args.out_dir, args.log_y)
    print(f"wrote {', '.join(map(str, paths))}")


if __name__ == "__main__":
    run_cli(main)
