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

  python visualize.py --inside --out_dir=out/tiny-sft --text="《静夜思》的作者是谁?"

looks inside a model (miniglm/inside.py) and writes three PNGs to <out_dir>/inside/: the answer's
token probabilities with the top-5 alternatives, the attention maps of every layer and head (one
enlarged: --layer, --head), and the logit lens. Without --answer the model's own answer is shown.
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


# ------------------------------------------------------------------ inside the model (miniglm/inside.py)
CJK_FONTS = ("WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC",
             "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "Arial Unicode MS")
MAX_SHOWN = 48  # tokens on a figure's axis: a longer text shows its last ones


def use_cjk_font():
    """Draw Chinese tokens with the first CJK font installed (matplotlib falls back to it glyph by
    glyph); without one they are boxes, and a note says which package brings one."""
    from matplotlib import font_manager
    names = {f.name for f in font_manager.fontManager.ttflist}
    if not any(n in names for n in CJK_FONTS):  # installed after matplotlib cached its font list
        for path in font_manager.findSystemFonts():
            if any(key in Path(path).name.lower() for key in ("wqy", "notosanscjk", "notosanssc", "simhei")):
                font_manager.fontManager.addfont(path)
        names = {f.name for f in font_manager.fontManager.ttflist}
    found = [n for n in CJK_FONTS if n in names]
    if not found:
        print("note: no CJK font installed (apt-get install fonts-wqy-microhei): Chinese tokens are drawn as boxes")
    plt.rcParams["font.family"] = ["DejaVu Sans", *found]
    return bool(found)


def shown(text):
    """A token as a label: a line break as ⏎, a space as ␣."""
    return text.replace("\n", "⏎").replace(" ", "␣")


def plot_token_probs(rows, path, title, per_line=16):
    """Each answer token on a box coloured by the probability the model gave it (red 0 → green 1),
    the probability under it and the top-5 alternatives below."""
    from matplotlib.patches import Rectangle
    lines = max(1, -(-len(rows) // per_line))
    fig, ax = plt.subplots(figsize=(1.15 * per_line, 0.6 + 2.6 * lines))
    cmap = plt.get_cmap("RdYlGn")
    for j, row in enumerate(rows):
        line, col = divmod(j, per_line)
        y = -3.2 * line
        ax.add_patch(Rectangle((col, y), 0.94, 0.9, color=cmap(row["prob"])))
        ax.text(col + 0.47, y + 0.45, shown(row["token"]), ha="center", va="center", fontsize=15)
        ax.text(col + 0.47, y - 0.2, f"{row['prob']:.2f}", ha="center", va="center", fontsize=8)
        for a, (text, prob) in enumerate(row["top"]):
            ax.text(col + 0.47, y - 0.55 - 0.42 * a, f"{shown(text)} {prob:.2f}", ha="center", va="center",
                    fontsize=7, color="black" if text == row["token"] else "dimgray")
    ax.set_xlim(-0.1, per_line)
    ax.set_ylim(-3.2 * (lines - 1) - 2.8, 1.1)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1)), ax=ax, fraction=0.02,
                 label="probability of the token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_attention(view, path, title, layer=None, head=None):
    """The attention maps: one small map per layer (rows) and head (columns), and one head enlarged
    with its tokens (default: the last layer's first head). Rows are queries, columns keys."""
    maps = view["maps"]
    layers, heads = len(maps), len(maps[0])
    layer = layers - 1 if layer is None else layer
    head = 0 if head is None else head
    q0 = max(0, len(view["queries"]) - MAX_SHOWN)  # the last MAX_SHOWN queries, and the keys they see
    prefix = len(view["keys"]) - len(view["queries"])
    keys = list(range(prefix)) + [prefix + k for k in range(q0, len(view["queries"]))]
    fig = plt.figure(figsize=(4 + 1.6 * heads + 9, max(6, 1.6 * layers + 1)))
    grid = fig.add_gridspec(layers, heads + 1, width_ratios=[1] * heads + [max(3, heads * 1.2)])
    for i in range(layers):
        for h in range(heads):
            ax = fig.add_subplot(grid[i, h])
            ax.imshow([[maps[i][h][q][k] for k in keys] for q in range(q0, len(view["queries"]))], cmap="viridis",
                      vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"L{i + 1} H{h + 1}", fontsize=8, color="red" if (i, h) == (layer, head) else "black")
    ax = fig.add_subplot(grid[:, heads])
    image = ax.imshow([[maps[layer][head][q][k] for k in keys] for q in range(q0, len(view["queries"]))],
                      cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(keys)), [shown(view["keys"][k]) for k in keys], fontsize=7, rotation=90)
    ax.set_yticks(range(len(view["queries"]) - q0), [shown(t) for t in view["queries"][q0:]], fontsize=7)
    ax.set(xlabel="key (attended to)", ylabel="query", title=f"layer {layer + 1}, head {head + 1}")
    fig.colorbar(image, ax=ax, fraction=0.03, label="attention probability")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_logit_lens(lens, path, title):
    """Per layer (rows, the embedding at the bottom) and position (columns): the top token written
    in the cell, the cell coloured by the rank of the text's next token there (0 = it is the top)."""
    import math
    t0 = max(0, len(lens["tokens"]) - MAX_SHOWN)
    positions = range(t0, len(lens["tokens"]) - 1)  # the last position has no next token
    ranks = [[math.log10(1 + row[t]) for t in positions] for row in lens["next_rank"]]
    fig, ax = plt.subplots(figsize=(2 + 0.55 * len(positions), 2.8 + 0.6 * len(ranks)))
    image = ax.imshow(ranks, cmap="magma_r", vmin=0, vmax=max(1.0, max(map(max, ranks))), origin="lower",
                      aspect="auto")
    for i, row in enumerate(lens["top"]):
        for j, t in enumerate(positions):
            ax.text(j, i, shown(row[t]), ha="center", va="center", fontsize=7,
                    color="white" if ranks[i][j] > 1.5 else "black")
    ax.set_xticks(range(len(positions)), [f"{shown(lens['tokens'][t])[:14]}→{shown(lens['tokens'][t + 1])[:14]}"
                                          for t in positions], fontsize=7, rotation=90)
    ax.set_yticks(range(len(ranks)), ["embedding"] + [f"block {i}" for i in range(1, len(ranks))], fontsize=8)
    ax.set(xlabel="position: its token → the next token", title=title)
    fig.colorbar(image, ax=ax, fraction=0.03, label="log10(1 + rank of the next token)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def inside_figures(model, tok, question, answer, template, dest, name="inside", layer=None, head=None):
    """The three views of one question and answer (miniglm/inside.py), as PNGs in dest: their paths."""
    from miniglm.inside import look
    use_cjk_font()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    views = look(model, tok, question, answer, template)
    said = f"{question}{answer}" if template is None else f"问: {question}  答: {answer}"
    said = said if len(said) <= 60 else said[:60] + "…"
    return [plot_token_probs(views["tokens"], dest / f"{name}-tokens.png", f"token probabilities: {said}"),
            plot_attention(views["attention"], dest / f"{name}-attention.png", f"attention: {said}", layer, head),
            plot_logit_lens(views["lens"], dest / f"{name}-lens.png", f"logit lens: {said}")]


def inside_main(args):
    """--inside: the three figures of one text, for the model of args.out_dir."""
    from miniglm.checkpoint import load_model
    from miniglm.inside import own_answer
    if not args.text:
        raise UserError("--inside needs --text: a question (or, for a pretrained model, a text)")
    model, tok, ckpt = load_model(args.out_dir, args.device)
    template = ckpt.get("template") if args.template == "auto" else None if args.template == "plain" else args.template
    answer = args.answer
    try:
        if answer is None:
            answer = own_answer(model, tok, ckpt, args.text, args.max_new_tokens)
    except ValueError as e:
        raise UserError(f"--text: {e}") from None
    print(f"weights: {ckpt['weights']}")
    dest = args.dest or Path(args.out_dir if Path(args.out_dir).is_dir() else Path(args.out_dir).parent) / "inside"
    paths = inside_figures(model, tok, args.text, answer, template, dest, layer=args.layer, head=args.head)
    print(f"wrote {', '.join(map(str, paths))}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--runs", nargs="+", default=["out/tiny-pretrain", "out/tiny-sft"], help="out_dirs or log.jsonl files"
    )
    p.add_argument("--out_dir", default=None,
                   help="where the curves go (default plots/); with --inside: the run (or .pt) to look inside")
    p.add_argument("--log_y", action="store_true", help="log-scale loss axes")
    p.add_argument("--inside", action="store_true",
                   help="look inside a model: token probabilities, attention maps and the logit lens of --text")
    p.add_argument("--text", help="--inside: the question (a pretrained model: the text)")
    p.add_argument("--answer", help="--inside: the answer to look at (default: the model's own)")
    p.add_argument("--dest", help="--inside: where the PNGs go (default <out_dir>/inside)")
    p.add_argument("--template", default="auto", choices=["auto", "qa", "chatml", "plain"],
                   help="--inside: how the text is fed: the model's own template (auto; a pretrained model: plain "
                        "text), or this one (e.g. a pretrained model in 问/答 form, to compare it with its SFT)")
    p.add_argument("--layer", type=int, help="--inside: the layer of the enlarged attention map (from 1)")
    p.add_argument("--head", type=int, help="--inside: its head (from 1)")
    p.add_argument("--max_new_tokens", type=int, default=48, help="--inside: the model's own answer's length")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.inside:
        args.out_dir = args.out_dir or "out/tiny-sft"
        args.layer = None if args.layer is None else args.layer - 1
        args.head = None if args.head is None else args.head - 1
        return inside_main(args)
    paths = plot_runs([read_run(r) for r in args.runs], args.out_dir or "plots", args.log_y)
    print(f"wrote {', '.join(map(str, paths))}")


if __name__ == "__main__":
    run_cli(main)
