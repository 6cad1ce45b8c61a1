"""
Choice questions scored by log-likelihood, as benchmarks measure small models (HellaSwag,
ARC, nanochat's CORE, lm-evaluation-harness's multiple_choice tasks): the model is not asked to
write the answer, only which of four it finds most likely. Such scores move long before greedy
answers are right.

The choice set (data/prepare_sft.py writes it beside the SFT data, from the held-out questions):
  choices_test.jsonl   every held-out question with a fact, but the dev ones: what evaluations.py reports
  choices_dev.jsonl    the dev questions' (GRPO chooses best.pt on them): train.py scores them at each evaluation
One item a line:
  {"type": "作者", "question": "《静夜思》的作者是谁?", "answer_prefix": "《静夜思》的作者是",
   "plain": "《静夜思》\\n作者:", "choices": ["杜甫", "李白", "王维", "白居易"], "answer": 1}
The types: 作者 (the right author against three other authors of the corpus), 下一句 (the right
next half-line against three of the same length from other poems), 首句 (for 请背诵/请写出
questions: the poem's first half-line against three of the same length). Chance is 1 in 4.

A choice is scored as the continuation of its context: for a fine-tuned model the question in its
own chat template, then answer_prefix (问:{question}\\n答:{answer_prefix}); for a pretrained model
the plain-text form the corpus writes the fact in (plain). Tokens as lm-eval makes them: the
context's trailing spaces move to the continuation; the continuation is what the tokens of
context + choice, encoded whole, hold after the context's own tokens.
  acc        the choice with the highest summed log-probability is the answer
  acc_norm   the highest per character of the choice (lm-eval's acc_norm)
"""
import math
import random
import re
from pathlib import Path

import torch
from torch.nn import functional as F

from data_utils import UserError, read_jsonl
from miniglm.chat_template import render_prompt

SPLITS = {"test": "choices_test.jsonl", "dev": "choices_dev.jsonl"}
TYPES = ("作者", "下一句", "首句")
FIELDS = {"type": str, "question": str, "answer_prefix": str, "plain": str, "choices": list, "answer": int}
HALF_LINE_END = r"[，,。？！；：、?!;:]"  # what ends a half-line
CHANCE = 0.25


# ------------------------------------------------------------------ building the set
def half_lines(lines):
    """Poem lines split into half-lines: 床前明月光，疑是地上霜。 → 床前明月光 / 疑是地上霜
    (the default SFT set's 下一句 questions are made of them too: data/prepare_sft.py)"""
    return [c for ln in lines for c in re.split(HALF_LINE_END, ln) if c.strip()]


def distractors(right, pool, rng, n=3):
    """n different wrong choices drawn from pool (sorted first: the same seed, the same draw)."""
    pool = sorted(set(pool) - {right})
    return rng.sample(pool, n) if len(pool) >= n else None


def choice_item(kind, question, answer_prefix, plain, right, wrong, rng):
    """One item: the right choice and the wrong ones in a seeded order."""
    choices = [right, *wrong]
    rng.shuffle(choices)
    return {"type": kind, "question": question, "answer_prefix": answer_prefix, "plain": plain,
            "choices": choices, "answer": choices.index(right)}


def held_out_poems(questions, poems):
    """The poems the questions ask about: by title (作者, 请背诵, 请写出) or by a half-line (下一句)."""
    titles = {m.group(1) or m.group(2) for q, _ in questions
              if (m := re.fullmatch(r"《(.+)》的作者是谁\?|请(?:背诵|写出.*的)《(.+)》。", q))}
    lines = {m.group(1) for q, _ in questions if (m := re.fullmatch(r"“(.+)”的下一句是什么\?", q))}
    return [p for p in poems if p["title"] in titles or any(line in p["text"] for line in lines)]


def build_items(questions, poems, seed, line_poems, trained=()):
    """Choice items for the (question, reference answer) pairs of the default SFT set's kinds
    (作者, 下一句, 请背诵/请写出 → 首句); other questions give none. poems: the documents
    (title, author, lines, text) the questions were made from; the wrong authors come from all
    of them, the wrong lines from line_poems (the held-out ones: no choice is a line that SFT
    trained on, which a fine-tuned model would favour for being familiar), never from the
    question's own poem. A question with more than one right answer (a title several poems
    share, as 词牌 names are; a half-line in several poems) or asked in training (trained) gives none."""
    rng = random.Random(seed)
    authors = [p["author"] for p in poems if p.get("author")]
    by_title = {}
    for p in poems:
        by_title.setdefault(p["title"], []).append(p)

    line_halves = [(p["text"], half_lines(p["lines"])) for p in line_poems]

    def wrong_lines(right, own_texts):
        """Three half-lines of right's length from line_poems other than the question's own."""
        own = {h for text, halves in line_halves if text in own_texts for h in halves}
        pool = [h for _, halves in line_halves for h in halves if len(h) == len(right) and h not in own]
        return distractors(right, pool, rng)

    items, seen = [], set()
    for question, reference in questions:
        item = None
        if question in trained:
            continue
        if m := re.fullmatch(r"《(.+)》的作者是谁\?", question):
            title = m.group(1)
            author = re.fullmatch(r"《.+》的作者是(.+)。", reference)
            unique = len({p.get("author") for p in by_title.get(title, [])}) == 1
            wrong = distractors(author.group(1), authors, rng) if author and unique else None
            if wrong:
                item = choice_item("作者", question, f"《{title}》的作者是", f"《{title}》\n作者:", author.group(1),
                                   wrong, rng)
        elif m := re.fullmatch(r"“(.+)”的下一句是什么\?", question):
            line = m.group(1)
            fact = re.fullmatch(r"“.+”的下一句是“(.+)”。", reference)
            sources = next_line_source(poems, line)
            found = fact and len(sources) == 1 and re.search(
                re.escape(line) + f"({HALF_LINE_END}\n?)" + re.escape(fact.group(1)), sources[0])
            wrong = wrong_lines(fact.group(1), sources) if found else None
            if wrong:
                item = choice_item("下一句", question, f"“{line}”的下一句是“", line + found.group(1), fact.group(1),
                                   wrong, rng)
        elif m := re.fullmatch(r"请背诵《(.+)》。|请写出.+的《(.+)》。", question):
            same_title = by_title.get(m.group(1) or m.group(2), [])
            poem = same_title[0] if len(same_title) == 1 else None
            first = half_lines(reference.split("\n"))[:1]
            if poem and first and poem["text"].find(first[0]) > 0:
                wrong = wrong_lines(first[0], [poem["text"]])
                if wrong:
                    plain = poem["text"][: poem["text"].find(first[0])]  # the title and author lines
                    item = choice_item("首句", question, "", plain, first[0], wrong, rng)
        if item and (item["type"], item["plain"], item["choices"][item["answer"]]) not in seen:
            seen.add((item["type"], item["plain"], item["choices"][item["answer"]]))
            items.append(item)
    return items


def next_line_source(poems, line):
    """The texts of the poems that hold the half-line (usually one)."""
    return [p["text"] for p in poems if line in p["text"]]


# ------------------------------------------------------------------ reading
def read_choices(path):
    """The items of a choices JSONL file; a malformed one is a UserError naming file:line."""
    records, _ = read_jsonl(path)
    items = []
    for lineno, item in records:
        if not isinstance(item, dict):
            raise UserError(f"{path}:{lineno}: not a JSON object")
        for key, kind in FIELDS.items():
            if not isinstance(item.get(key), kind) or isinstance(item.get(key), bool):
                raise UserError(f"{path}:{lineno}: {key!r} should be a {kind.__name__}")
        choices = item["choices"]
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise UserError(f"{path}:{lineno}: 'choices' should be two or more non-empty strings")
        if not 0 <= item["answer"] < len(choices):
            raise UserError(f"{path}:{lineno}: 'answer' {item['answer']} is not an index of its {len(choices)} choices")
        items.append(item)
    if not items:
        raise UserError(f"{path}: no choice items")
    return items


def choice_file(folder, split):
    return Path(folder) / SPLITS[split]


# ------------------------------------------------------------------ scoring
def split_pair(tok, context, continuation):
    """(context ids, continuation ids) as lm-eval makes them: trailing spaces move to the
    continuation; the continuation is the whole text's tokens after the context's own."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok.encode(context + continuation)
    context_ids = tok.encode(context)
    return context_ids, whole[len(context_ids):]


def requests(tok, item, template):
    """(context ids, continuation ids) for each choice of an item. template None: the plain-text
    form (a pretrained model); else the question in that chat template, then answer_prefix."""
    if template is None:
        return [split_pair(tok, item["plain"], choice) for choice in item["choices"]]
    prompt = render_prompt(tok, [], item["question"], template)
    pairs = []
    for choice in item["choices"]:  # the answer's text is tokenized as training tokenizes it: whole, after the head
        if item["answer_prefix"]:
            prefix_ids, choice_ids = split_pair(tok, item["answer_prefix"], choice)
        else:  # (lm-eval's split needs a context: with none, the choice is the whole answer)
            prefix_ids, choice_ids = [], tok.encode(choice)
        pairs.append((prompt + prefix_ids, choice_ids))
    return pairs


@torch.no_grad()
def loglikelihoods(model, pairs, max_logits=2**24):
    """The summed log-probability of each continuation after its context, for a list of
    (context ids, continuation ids); batched, right-padded (a causal model never sees the
    padding), the longest first, at most max_logits logits held at once."""
    device = model.lm_head.weight.device
    T = model.context_size
    vocab = model.lm_head.weight.size(0)
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    out = [0.0] * len(pairs)
    start = 0
    while start < len(order):
        longest = order[start]
        width = min(len(pairs[longest][0]) + len(pairs[longest][1]), T + 1) - 1  # inputs: all tokens but the last
        rows = max(1, max_logits // max(1, width * vocab))
        batch = order[start:start + rows]
        seqs = [(pairs[i][0] + pairs[i][1])[-(T + 1):] for i in batch]
        x = torch.zeros(len(batch), width, dtype=torch.long)  # (B, width): padding after each row's tokens
        for r, s in enumerate(seqs):
            x[r, : len(s) - 1] = torch.tensor(s[:-1])
        logits, _ = model(x.to(device))  # (B, width, vocab)
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, width, vocab)
        for r, (i, s) in enumerate(zip(batch, seqs)):
            n = len(pairs[i][1])
            targets = torch.tensor(s[-n:], device=device)  # (n,) the continuation's tokens
            predicted = logp[r, len(s) - 1 - n: len(s) - 1]  # (n, vocab): the positions that predict them
            out[i] = predicted.gather(-1, targets[:, None]).sum().item()
        start += len(batch)
    return out


def wilson_interval(correct, n, z=1.96):
    """The 95% Wilson score interval of a proportion (sound for small n and for 0 or n)."""
    if n == 0:
        return None
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]


def summary(correct, correct_norm):
    """acc and acc_norm of a list of 0/1 outcomes, each with its 95% interval."""
    n = len(correct)
    return {"items": n, "acc": sum(correct) / n, "acc_ci": wilson_interval(sum(correct), n),
            "acc_norm": sum(correct_norm) / n, "acc_norm_ci": wilson_interval(sum(correct_norm), n)}


def best(values):
    """The index of the highest value, the first of a tie (as numpy's argmax, which lm-eval uses)."""
    return max(range(len(values)), key=values.__getitem__)


def score(model, tok, items, template):
    """acc and acc_norm (with 95% intervals) overall and per type, and each item's
    log-likelihoods ("logliks"), of a model on choice items (template None: the plain form)."""
    was_training = model.training
    model.eval()
    pairs = [pair for item in items for pair in requests(tok, item, template)]
    flat = loglikelihoods(model, pairs)
    model.train(was_training)
    per_item, start = [], 0
    for item in items:
        per_item.append(flat[start:start + len(item["choices"])])
        start += len(item["choices"])
    normed = [[v / len(c) for v, c in zip(ll, it["choices"])] for it, ll in zip(items, per_item)]  # per character
    correct = [int(best(ll) == it["answer"]) for it, ll in zip(items, per_item)]
    correct_norm = [int(best(ll) == it["answer"]) for it, ll in zip(items, normed)]
    result = summary(correct, correct_norm)
    result["form"] = "plain" if template is None else template
    result["by_type"] = {}
    for kind in sorted({it["type"] for it in items}):
        picks = [i for i, it in enumerate(items) if it["type"] == kind]
        result["by_type"][kind] = summary([correct[i] for i in picks], [correct_norm[i] for i in picks])
    result["logliks"] = per_item
    return result


def score_line(result):
    """'acc 0.3125 [0.22, 0.42], acc_norm ...' of a score() result."""
    ci = lambda v: f"[{v[0]:.2f}, {v[1]:.2f}]"  # noqa: E731
    return (f"acc {result['acc']:.4f} {ci(result['acc_ci'])}, acc_norm {result['acc_norm']:.4f} "
            f"{ci(result['acc_norm_ci'])} ({result['items']} items, {result['form']} form)")
