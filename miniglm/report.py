"""
The run report (report.md) that evaluations.py writes for coursework: each run's config,
size, data and cost (from its checkpoint and log.jsonl), the loss plots, the evaluation
table and sampled answers.
"""
import json
import time
from pathlib import Path

import numpy as np

from data_utils import atomic_write

METRICS = ["kind", "iter", "params_M", "vocab_size", "pretrain_val_loss", "pretrain_val_ppl", "pretrain_val_bpc",
           "sft_answer_loss", "exact_match", "char_f1", "rouge_l", "bleu", "chrf", "distinct_1", "distinct_2",
           "answers_with_fffd"]
GREEDY_METRICS = ["char_f1", "rouge_l", "distinct_2"]  # also reported for greedy decoding beside the default


def decoding_label(d):
    """A decoding's settings in words: 'greedy, repetition penalty 1.2'."""
    words = ["greedy" if not d.get("temperature") else f"temperature {d['temperature']}"]
    words += [f"top-k {d['top_k']}"] * bool(d.get("temperature") and d.get("top_k"))
    words += [f"top-p {d['top_p']}"] * bool(d.get("temperature") and d.get("top_p") and d["top_p"] < 1)
    words += [f"repetition penalty {d['repetition_penalty']}"] * (d.get("repetition_penalty", 1.0) != 1.0)
    words += [f"no repeated {d['no_repeat_ngram']}-grams"] * bool(d.get("no_repeat_ngram"))
    return ", ".join(words)


def fmt(v):
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def method_label(result):
    """How a run was fine-tuned: full, or the adapter and its settings ('-' for a pretrain)."""
    adapter = result.get("adapter") or {}
    if adapter.get("method") == "lora":
        return f"LoRA (r {adapter['r']}, alpha {adapter['alpha']:g}, {', '.join(adapter['targets'])})"
    if adapter.get("method") == "ptuning":
        return f"P-Tuning v2 ({adapter['num_virtual_tokens']} virtual tokens" + \
            (", projected)" if adapter.get("prefix_projection") else ")")
    return result.get("finetune") or "-"


def stage_label(result):
    """Which stage of training made the checkpoint: pretraining, SFT, DPO or GRPO with its settings."""
    c = result.get("config") or {}
    if result.get("kind") == "dpo":
        rpo = f", rpo_alpha {c['rpo_alpha']:g}" if c.get("rpo_alpha") else ""
        return f"DPO ({c.get('dpo_loss', 'sigmoid')}, beta {c.get('beta', 0):g}{rpo})"
    if result.get("kind") == "grpo":
        return (f"GRPO ({c.get('grpo_prompts')} questions x {c.get('grpo_group')} answers, reward "
                f"{c.get('grpo_reward')}, KL {c.get('grpo_kl', 0):g})")
    return {"pretrain": "pretraining", "sft": "SFT"}.get(result.get("kind"), str(result.get("kind")))


def run_dir(path):
    path = Path(path)
    return path if path.is_dir() else path.parent


def training_summary(path):
    """What the run's log.jsonl says: iterations, tokens trained, training wall time."""
    log = run_dir(path) / "log.jsonl"
    if not log.exists():
        return {}
    records = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    last = (train or evals or [{}])[-1]
    return {
        "iterations": last.get("iter"),
        "tokens": last.get("tokens"),
        "seconds": max((r["time"] for r in train + evals), default=None),
        "tokens_per_s": float(np.median([r["tokens_per_s"] for r in train])) if train else None,
        "first_val_loss": evals[0]["val_loss"] if evals else None,
        "last_val_loss": evals[-1]["val_loss"] if evals else None,
    }


def write_report(path, runs, questions, plots, decoding, constrain="chars", n_answers=12):
    """report.md: what a student hands in. The config, size, data and cost of each run, the
    loss plots, the evaluation table and sampled answers."""
    names = list(runs)
    lines = [
        f"# MiniGLM run report: {names[0]}",
        "",
        f"Written by `evaluations.py` on {time.strftime('%Y-%m-%d %H:%M')}; "
        f"{len(questions)} held-out questions; answers decoded with {decoding_label(decoding)} (the default) "
        f"and greedy; constraint `{constrain}`.",
        "",
        "## Runs",
        "",
        "| | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    summaries = {n: training_summary(n) for n in names}

    def row(label, values):
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    row("stage", [stage_label(runs[n][0]) for n in names])
    row("weights evaluated", [runs[n][0].get("weights", "-") for n in names])
    row("fine-tuning", [method_label(runs[n][0]) for n in names])
    row("parameters", [f"{runs[n][0]['params_M']}M" for n in names])
    row(
        "layers × width, heads, context",
        [
            f"{a['n_layer']} × {a['n_embd']}, {a['n_head']}, {a['block_size']}"
            for a in (runs[n][0]["model_args"] for n in names)
        ],
    )
    row("vocabulary", [f"{runs[n][0]['vocab']} ({runs[n][0]['vocab_size']:,} slots)" for n in names])
    row("data", [f"`{runs[n][0]['config'].get('data_dir', '?')}`" for n in names])
    row("iterations", [fmt(summaries[n].get("iterations")) for n in names])
    row("tokens trained", [f"{summaries[n]['tokens']:,}" if summaries[n].get("tokens") else "-" for n in names])
    row(
        "training wall time",
        [f"{summaries[n]['seconds']:.0f} s" if summaries[n].get("seconds") else "-" for n in names],
    )
    row(
        "median tokens/s",
        [f"{summaries[n]['tokens_per_s']:,.0f}" if summaries[n].get("tokens_per_s") else "-" for n in names],
    )
    row(
        "val loss, first → last eval",
        [f"{fmt(summaries[n].get('first_val_loss'))} → {fmt(summaries[n].get('last_val_loss'))}" for n in names],
    )
    lines += ["", f"## Configuration of `{names[0]}`", "", "```python"]
    lines += [f"{k} = {v!r}" for k, v in sorted(runs[names[0]][0]["config"].items())]
    lines += ["```", ""]
    if plots:
        lines += ["## Loss curves", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    lines += [
        "## Evaluation",
        "",
        "| metric | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for m in METRICS[3:]:
        if any(runs[n][0].get(m) is not None for n in names):
            row(m, [fmt(runs[n][0].get(m)) for n in names])
    for m in GREEDY_METRICS:
        if any(runs[n][0].get("greedy", {}).get(m) is not None for n in names):
            row(f"greedy: {m}", [fmt(runs[n][0].get("greedy", {}).get(m)) for n in names])
    types = sorted({t for n in names for t in runs[n][0].get("by_type", {})})
    if types:
        lines += [
            "",
            "By question type (exact match / char F1 / key-fact rate: the right author, the right next line):",
            "",
            "| type | questions | " + " | ".join(f"`{n}`" for n in names) + " |",
            "|---" * (len(names) + 2) + "|",
        ]
        for t in types:
            bt = [runs[n][0]["by_type"].get(t, {}) for n in names]
            lines.append(
                f"| {t} | {bt[0].get('questions', 0)} | "
                + " | ".join(
                    f"{b.get('exact_match', 0):.2f} / {b.get('char_f1', 0):.3f}"
                    + (f" / {b['key_fact_rate']:.2f}" if "key_fact_rate" in b else "")
                    for b in bt
                )
                + " |"
            )
    lines += [
        "",
        "## Sampled answers",
        "",
        f"({decoding_label(decoding)}; a line break in a poem is shown as ` / `)",
        "",
    ]

    def one_line(text):
        return " / ".join(ln.strip() for ln in text.strip().splitlines()) or "(empty)"

    for i, (q, ref) in enumerate(questions[:n_answers]):
        ref = ref if len(ref) <= 200 else ref[:200] + f"… ({len(ref):,} characters)"
        lines += [f"**问:** {one_line(q)}  ", f"**参考:** {one_line(ref)}  "]
        lines += [f"**`{Path(n).name}` 答:** {one_line(runs[n][1][i])}  " for n in names]
        lines.append("")
    atomic_write(path, lambda f: f.write("\n".join(lines) + "\n"), mode="w")
