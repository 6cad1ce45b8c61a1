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


def table_row(label, values):
    return f"| {label} | " + " | ".join(values) + " |"


def table_head(first, names, extra=()):
    """A markdown table's head: the first column's title (none for the Runs table), then one column a run."""
    cells = [*extra, *(f"`{n}`" for n in names)]
    head = (f"| {first} | " if first else "| | ") + " | ".join(cells) + " |"
    return [head, "|---" * (len(cells) + 1) + "|"]


def runs_section(runs):
    """## Runs: what each run is (stage, the weights evaluated, method, size, data) and what it cost."""
    names = list(runs)
    results = [runs[n][0] for n in names]
    summaries = [training_summary(n) for n in names]
    shapes = [r["model_args"] for r in results]
    lines = ["## Runs", "", *table_head("", names)]
    lines.append(table_row("stage", [stage_label(r) for r in results]))
    lines.append(table_row("weights evaluated", [r.get("weights", "-") for r in results]))
    lines.append(table_row("fine-tuning", [method_label(r) for r in results]))
    lines.append(table_row("parameters", [f"{r['params_M']}M" for r in results]))
    lines.append(table_row("layers × width, heads, context",
                           [f"{a['n_layer']} × {a['n_embd']}, {a['n_head']}, {a['block_size']}" for a in shapes]))
    lines.append(table_row("vocabulary", [f"{r['vocab']} ({r['vocab_size']:,} slots)" for r in results]))
    lines.append(table_row("data", [f"`{r['config'].get('data_dir', '?')}`" for r in results]))
    lines.append(table_row("iterations", [fmt(s.get("iterations")) for s in summaries]))
    lines.append(table_row("tokens trained", [f"{s['tokens']:,}" if s.get("tokens") else "-" for s in summaries]))
    lines.append(table_row("training wall time",
                           [f"{s['seconds']:.0f} s" if s.get("seconds") else "-" for s in summaries]))
    lines.append(table_row("median tokens/s",
                           [f"{s['tokens_per_s']:,.0f}" if s.get("tokens_per_s") else "-" for s in summaries]))
    lines.append(table_row("val loss, first → last eval",
                           [f"{fmt(s.get('first_val_loss'))} → {fmt(s.get('last_val_loss'))}" for s in summaries]))
    return lines + [""]


def evaluation_section(runs):
    """## Evaluation: each metric measured for some run, its greedy twin, and the scores by question type."""
    names = list(runs)
    results = [runs[n][0] for n in names]
    lines = ["## Evaluation", "", *table_head("metric", names)]
    for m in METRICS[3:]:
        if any(r.get(m) is not None for r in results):
            lines.append(table_row(m, [fmt(r.get(m)) for r in results]))
    for m in GREEDY_METRICS:
        if any(r.get("greedy", {}).get(m) is not None for r in results):
            lines.append(table_row(f"greedy: {m}", [fmt(r.get("greedy", {}).get(m)) for r in results]))
    types = sorted({t for r in results for t in r.get("by_type", {})})
    if not types:
        return lines
    lines += ["", "By question type (exact match / char F1 / key-fact rate: the right author, the right next line):",
              "", *table_head("type", names, extra=["questions"])]
    for t in types:
        by_type = [r["by_type"].get(t, {}) for r in results]
        cells = []
        for b in by_type:
            cell = f"{b.get('exact_match', 0):.2f} / {b.get('char_f1', 0):.3f}"
            if "key_fact_rate" in b:
                cell += f" / {b['key_fact_rate']:.2f}"
            cells.append(cell)
        lines.append(table_row(t, [str(by_type[0].get("questions", 0)), *cells]))
    return lines


def choices_section(runs):
    """## What the model knows: accuracy on the choice questions by log-likelihood, with 95% intervals."""
    names = [n for n in runs if runs[n][0].get("choices")]
    if not names:
        return []
    scores = [runs[n][0]["choices"] for n in names]
    lines = ["## What the model knows: choice questions", "",
             f"`{scores[0]['file']}`: the right answer among 4 (chance 0.25), chosen by the model's "
             "log-likelihood (acc: summed; acc_norm: per character); [95% Wilson interval]. Form: "
             + ", ".join(f"`{n}` {s['form']}" for n, s in zip(names, scores)) + ".", "",
             *table_head("type", names, extra=["items"])]

    def cell(s, key):
        return f"{s[key]:.3f} [{s[key + '_ci'][0]:.2f}, {s[key + '_ci'][1]:.2f}]"

    for key in ("acc", "acc_norm"):
        lines.append(table_row(f"all: {key}", [str(scores[0]["items"]), *(cell(s, key) for s in scores)]))
    for t in sorted(scores[0]["by_type"]):
        lines.append(table_row(f"{t}: acc", [str(scores[0]["by_type"][t]["items"]),
                                             *(cell(s["by_type"][t], "acc") for s in scores)]))
    return lines + [""]


def one_line(text):
    """A poem's line breaks shown as ' / ', so that an answer fits a line of the report."""
    return " / ".join(ln.strip() for ln in text.strip().splitlines()) or "(empty)"


def answers_section(runs, questions, decoding, n_answers):
    """## Sampled answers: the first questions, their references and each run's answer."""
    lines = ["## Sampled answers", "", f"({decoding_label(decoding)}; a line break in a poem is shown as ` / `)", ""]
    for i, (q, ref) in enumerate(questions[:n_answers]):
        if len(ref) > 200:  # a whole 古文 is pages
            ref = ref[:200] + f"… ({len(ref):,} characters)"
        lines += [f"**问:** {one_line(q)}  ", f"**参考:** {one_line(ref)}  "]
        lines += [f"**`{Path(n).name}` 答:** {one_line(runs[n][1][i])}  " for n in runs]
        lines.append("")
    return lines


def inside_section(inside, question):
    """## Inside the model: each run's token probabilities, attention maps and logit lens of one answer."""
    if not inside:
        return []
    lines = ["## Inside the model", "", f"A held-out question, {one_line(question)}, and each run's own "
             "answer to it (a pretrained model: the question and its answer as plain text): the probability of each "
             "answer token with the top-5 alternatives, the attention maps of every layer and head, and the logit "
             "lens (miniglm/inside.py).", ""]
    for name, paths in inside.items():
        lines += [f"**`{name}`**", ""] + [f"![{p.stem}]({p.name})" for p in paths] + [""]
    return lines


def write_report(path, runs, questions, plots, decoding, constrain="chars", n_answers=12, inside=None,
                 inside_question=None):
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
    ]
    lines += runs_section(runs)
    lines += [f"## Configuration of `{names[0]}`", "", "```python"]
    lines += [f"{k} = {v!r}" for k, v in sorted(runs[names[0]][0]["config"].items())]
    lines += ["```", ""]
    if plots:
        lines += ["## Loss curves", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    lines += evaluation_section(runs)
    lines += [""] + choices_section(runs)
    lines += answers_section(runs, questions, decoding, n_answers)
    lines += inside_section(inside, inside_question)
    atomic_write(path, lambda f: f.write("\n".join(lines) + "\n"), mode="w")
