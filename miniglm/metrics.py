"""
How answers are scored against their references (evaluations.py, GRPO's rewards and dev scores,
the benchmarks): character-level exact match, F1 and ROUGE-L, corpus BLEU and chrF by sacrebleu,
distinct-n, the question types of the default SFT set and their key facts (the right author, the
right next line).
"""
import re
from collections import Counter
from pathlib import Path

import numpy as np
from sacrebleu.metrics import BLEU, CHRF

from data_utils import read_jsonl


# ------------------------------------------------------------------ metrics (character level)
def _chars(text):
    return [c for c in text if not c.isspace()]


def exact_match(pred, ref):
    return float(_chars(pred) == _chars(ref))


def char_f1(pred, ref):
    """SQuAD-style F1 over characters (the usual token F1, with characters as tokens)."""
    p, r = _chars(pred), _chars(ref)
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred, ref):
    """ROUGE-L F1: longest common subsequence of characters."""
    p, r = _chars(pred), _chars(ref)
    lcs = lcs_length(p, r)
    if not lcs:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def _ngrams(chars, n):
    return Counter(tuple(chars[i:i + n]) for i in range(len(chars) - n + 1))


def corpus_bleu(preds, refs):
    """Corpus BLEU-4 by sacrebleu with tokenize='zh' (each Chinese character a token, the
    standard for Chinese), on its 0-100 scale, so the figure compares with published ones."""
    return BLEU(tokenize="zh").corpus_score(list(preds), [list(refs)]).score


def corpus_chrf(preds, refs):
    """Corpus chrF (character n-gram F-score) by sacrebleu, 0-100."""
    return CHRF().corpus_score(list(preds), [list(refs)]).score


def distinct_n(texts, n):
    """Unique n-grams over all n-grams of the generated texts: low = repetitive output."""
    grams = Counter()
    for t in texts:
        grams.update(_ngrams(_chars(t), n))
    return len(grams) / max(1, sum(grams.values()))


# ------------------------------------------------------------------ losses
def held_out_questions(data_dir, limit, skip=0):
    """Single-turn (question, answer) pairs of the SFT validation split: the first `limit`
    (the scored ones), or with skip, those after the first `skip` (dev questions)."""
    path = Path(data_dir) / "sft_val.jsonl"
    if not path.exists():
        return []
    records, _ = read_jsonl(path)
    pairs = [(c["messages"][0]["content"], c["messages"][1]["content"]) for _, c in records
             if len(c["messages"]) == 2 and c["messages"][0]["role"] == "user"]
    return pairs[skip:skip + limit]


def question_type(q):
    """The default SFT set's question kinds; anything else is dialogue."""
    for key, kind in (("的作者是谁", "作者"), ("请背诵", "背诵"), ("请写出", "背诵"), ("的下一句", "下一句")):
        if key in q:
            return kind
    return "dialogue"


KEY_FACTS = {"作者": re.compile(r"的作者是(.+?)。"), "下一句": re.compile(r"的下一句是“(.+?)”")}


def key_fact(question, reference, answer):
    """For 作者 and 下一句 questions, whether the answer names the reference's fact (the author,
    the next line) in the same form (…的作者是A / …的下一句是“B”); None for other questions."""
    pattern = KEY_FACTS.get(question_type(question))
    fact = pattern.search(reference) if pattern else None
    if not fact:
        return None
    said = pattern.search(answer)
    return bool(said) and said.group(1) == fact.group(1)


def answer_metrics(preds, questions):
    """Scores of answers against the references, overall and per question type."""
    refs = [a for _, a in questions]
    kinds = [question_type(q) for q, _ in questions]

    def mean(score, kind=None):
        """The mean of score(answer, reference) over the questions (of one kind)."""
        return float(np.mean([score(p, r) for p, r, k in zip(preds, refs, kinds) if kind in (None, k)]))

    by_type = {}
    for kind in sorted(set(kinds)):
        scores = {"questions": kinds.count(kind), "exact_match": mean(exact_match, kind),
                  "char_f1": mean(char_f1, kind)}
        if kind in KEY_FACTS:
            facts = [key_fact(q, r, p) for (q, r), p, k in zip(questions, preds, kinds) if k == kind]
            scores["key_fact_rate"] = float(np.mean(facts))
        by_type[kind] = scores
    return dict(
        exact_match=mean(exact_match),
        char_f1=mean(char_f1),
        rouge_l=mean(rouge_l),
        bleu=corpus_bleu(preds, refs),
        chrf=corpus_chrf(preds, refs),
        distinct_1=distinct_n(preds, 1),
        distinct_2=distinct_n(preds, 2),
        answers_with_fffd=sum("\ufffd" in p for p in preds),
        by_type=by_type,
    )
