"""The choice questions (miniglm/choices.py): the set data/prepare_sft.py builds from the held-out
questions, the log-likelihood scores, the dev scores train.py logs at each evaluation, and
lm-evaluation-harness's own figures on the Hugging Face export of a model trained on the facts."""
import json
import math
import random

import pytest
import torch
import yaml

from conftest import ROOT, TINY, make_sft_data, read_log, run_script
from miniglm import choices
from miniglm.adapters import add_adapter
from miniglm.metrics import held_out_questions
from miniglm.tokenizer import GPT2
from model import GPT, GPTConfig


def read_items(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_choice_set_is_built_from_held_out_questions(sft_dir, tmp_path):
    test, dev = read_items(sft_dir / "choices_test.jsonl"), read_items(sft_dir / "choices_dev.jsonl")
    assert {it["type"] for it in test} == set(choices.TYPES) and len(dev) > 5
    held_out = held_out_questions(sft_dir, 10**9)
    references = dict(held_out)
    dev_questions = {q for q, _ in held_out[100:164]}  # GRPO's dev questions
    assert {it["question"] for it in dev} <= dev_questions
    assert not {it["question"] for it in test} & dev_questions
    trained = {json.loads(line)["messages"][0]["content"] for line in (sft_dir / "sft_train.jsonl").open()}
    for item in test + dev:
        assert item["question"] not in trained  # none of the held-out questions is trained on
        right, ref = item["choices"][item["answer"]], references[item["question"]]
        wrong = [c for i, c in enumerate(item["choices"]) if i != item["answer"]]
        assert len(set(item["choices"])) == 4 and right in ref and not any(w in ref for w in wrong), item
        if item["type"] != "作者":  # lines against lines of the same length
            assert len({len(c) for c in item["choices"]}) == 1, item
    assert len({it["answer"] for it in test}) == 4  # the right choice is not always in one place
    # reproducible: the same seed writes the same set
    make_sft_data(_docs_of(sft_dir), tmp_path)
    assert (tmp_path / "choices_test.jsonl").read_bytes() == (sft_dir / "choices_test.jsonl").read_bytes()


def _docs_of(sft_dir):
    """The docs.jsonl the SFT folder's default set was built from (its meta.json says)."""
    return json.loads((sft_dir / "meta.json").read_text())["source"][0]


@pytest.mark.parametrize("adapter", [None, "lora", "ptuning"])
def test_loglikelihoods_batched_as_one_by_one(adapter):
    """The batched, right-padded scores are each continuation's log-probability, computed plainly;
    with an adapter (a LoRA, a P-Tuning prefix) as well."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=GPT2.vocab_size)).eval()
    if adapter == "lora":
        model = add_adapter(model, {"method": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["attn.c_attn"]})
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
    elif adapter == "ptuning":
        model = add_adapter(model, {"method": "ptuning", "num_virtual_tokens": 4, "prefix_projection": False,
                                    "encoder_hidden_size": 16})
    rng = random.Random(0)
    pairs = [([rng.randrange(50000) for _ in range(rng.randint(1, 20))],
              [rng.randrange(50000) for _ in range(rng.randint(1, 6))]) for _ in range(12)]
    batched = choices.loglikelihoods(model, pairs, max_logits=5 * 30 * GPT2.vocab_size)  # a few rows a batch
    for (context, continuation), got in zip(pairs, batched):
        ids = torch.tensor([context + continuation])
        logits, _ = model(ids[:, :-1])
        logp = torch.log_softmax(logits[0], dim=-1)
        want = sum(logp[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))
        assert math.isclose(got, want, abs_tol=1e-4), (got, want)


def test_tokens_split_as_lm_eval_does():
    """The context's trailing whitespace moves to the continuation; the continuation is what the
    whole text's tokens hold after the context's own."""
    context, continuation = choices.split_pair(GPT2, "《静夜思》\n作者:李白\n", "床前明月光")
    assert GPT2.decode(context) == "《静夜思》\n作者:李白" and GPT2.decode(continuation) == "\n床前明月光"
    whole = GPT2.encode("hello world")
    context, continuation = choices.split_pair(GPT2, "hello", " world")
    assert context + continuation == whole


def test_train_logs_dev_choices_and_trains_the_same(tiny_runs, tiny_sft_data, tmp_path):
    """train.py scores the dev choice questions at each evaluation, without changing what it trains."""
    import train
    pre, _ = tiny_runs
    args = [*TINY, f"--data_dir={tiny_sft_data}", f"--init_from={pre / 'best.pt'}", "--max_iters=4",
            "--eval_interval=2", "--batch_size=8"]
    train.main([*args, f"--out_dir={tmp_path / 'scored'}"])
    train.main([*args, f"--out_dir={tmp_path / 'plain'}", "--choice_set=none"])
    scored = read_log(tmp_path / "scored", "eval")
    assert [e["iter"] for e in scored] == [0, 2, 4]
    assert all(0 <= e["dev_choice_acc"] <= 1 and 0 <= e["dev_choice_acc_norm"] <= 1 for e in scored)
    assert all("dev_choice_acc" not in e for e in read_log(tmp_path / "plain", "eval"))
    from miniglm.checkpoint import load_checkpoint
    a, b = (load_checkpoint(tmp_path / run / "ckpt.pt")["model"] for run in ("scored", "plain"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a broken choices file is a one-line error naming file and line; a missing one a note
    bad = tmp_path / "bad.jsonl"
    lines = (tiny_sft_data / "choices_dev.jsonl").read_text(encoding="utf-8").splitlines()
    bad.write_text(lines[0] + "\n" + lines[1].replace('"answer": ', '"answer": 7') + "\n", encoding="utf-8")
    proc = run_script("train.py", *args, f"--out_dir={tmp_path / 'bad'}", f"--choice_set={bad}", check=False)
    assert proc.returncode == 1 and f"{bad}:2: 'answer'" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("train.py", *args, "--max_iters=0", f"--out_dir={tmp_path / 'missing'}",
                      f"--choice_set={tmp_path / 'none.jsonl'}")
    assert "not found" in proc.stdout


# ------------------------------------------------------------------ checked by lm-evaluation-harness
@pytest.fixture(scope="module")
def fact_models(sft_dir, tmp_path_factory):
    """Two tiny models in a BPE trained on the facts (which an HF tokenizer writes exactly):
    one pretrained on the facts of 40 held-out choice questions (each a line of plain text: 《题》\\n作者:某,
    a half-line and the next, a title and author before the first line), one untrained; and the
    items, in a folder of their own."""
    import train
    out = tmp_path_factory.mktemp("facts")
    items = read_items(sft_dir / "choices_test.jsonl")[:40]
    (out / "data").mkdir()
    for split in ("choices_test.jsonl", "choices_dev.jsonl"):
        (out / "data" / split).write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items),
                                          encoding="utf-8")
    docs = [{"text": it["plain"] + it["choices"][it["answer"]]} for it in items] * 3
    # every choice's text is in the corpus too, and more often than the facts (as in the demo's corpus,
    # where all are lines and authors of its poems): a BPE that merged only the right ones would give
    # them fewer tokens, and fewer tokens alone win (an untrained model scored 0.55 on such a BPE)
    docs += [{"text": "、".join(sorted(it["choices"]))} for it in items] * 10
    (out / "docs.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                                    encoding="utf-8")
    run_script("data/prepare.py", "--docs", out / "docs.jsonl", "--bpe_vocab_size", "2048", "--val_fraction=0.1")
    common = [*TINY, "--vocab=bpe", "--vocab_size=2048", f"--data_dir={out}", "--block_size=64", "--n_embd=64",
              "--batch_size=8", "--gradient_accumulation_steps=1", "--choice_set=none"]
    train.main([*common, f"--out_dir={out / 'trained'}", "--max_iters=200", "--eval_interval=200"])
    train.main([*common, f"--out_dir={out / 'untrained'}", "--max_iters=0"])
    for run in ("trained", "untrained"):
        run_script("export_hf.py", f"--out_dir={out / run}", f"--dest={out / ('hf-' + run)}")
    return out, items


def lm_eval_results(hf_dir, data, tmp_path):
    """lm-eval's simple_evaluate on an exported model, with the repository's two task YAMLs
    pointed at data's files: {task: (acc, acc_norm, each item's log-likelihoods)}."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -r requirements.txt)")
    from lm_eval.tasks import TaskManager
    tasks = tmp_path / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for path in (ROOT / "lm_eval_tasks").glob("*.yaml"):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        config["dataset_kwargs"]["data_files"] = {"test": str(data / "choices_test.jsonl"),
                                                  "validation": str(data / "choices_dev.jsonl")}
        (tasks / path.name).write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    names = ["miniglm_choices", "miniglm_choices_plain"]
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32", tasks=names,
                                  device="cpu", batch_size=16, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks)))
    results = {}
    for name in names:
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        logliks = [[resp[0] for resp in s["filtered_resps"]] for s in samples]
        results[name] = (out["results"][name]["acc,none"], out["results"][name]["acc_norm,none"], logliks)
    return results


def lm_eval_tokens(tok, context, continuation):
    """The ids lm-eval scores for a request: the context encoded alone, then the whole text's rest."""
    whole, context_ids = tok.encode(context + continuation), tok.encode(context)
    return context_ids, whole[len(context_ids):]


@pytest.mark.slow
def test_lm_eval_gets_the_projects_scores(fact_models, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, items = fact_models
    from miniglm.checkpoint import load_model
    scores = {}
    for run in ("trained", "untrained"):
        model, tok, _ = load_model(out / run, "cpu")
        ours = {"miniglm_choices_plain": choices.score(model, tok, items, None),
                "miniglm_choices": choices.score(model, tok, items, "qa")}
        theirs = lm_eval_results(out / f"hf-{run}", out / "data", tmp_path / run)
        for task, (acc, acc_norm, logliks) in theirs.items():
            mine = ours[task]
            # the items whose tokens differ: lm-eval encodes 问:{question}\n答:{answer_prefix} as one text, the
            # template (as training does) piece by piece; where a BPE merge crosses a piece's edge, the ids differ
            differ = set()
            if task == "miniglm_choices":
                for i, item in enumerate(items):
                    context = f"问:{item['question']}\n答:{item['answer_prefix']}"
                    if [lm_eval_tokens(tok, context, c) for c in item["choices"]] != \
                            [tuple(p) for p in choices.requests(tok, item, "qa")]:
                        differ.add(i)
            for i, (a, b) in enumerate(zip(mine["logliks"], logliks)):
                if i not in differ:
                    assert all(math.isclose(x, y, abs_tol=2e-3) for x, y in zip(a, b)), (task, i, a, b)
            assert abs(mine["acc"] - acc) <= len(differ) / len(items), (run, task, mine["acc"], acc)
            assert abs(mine["acc_norm"] - acc_norm) <= len(differ) / len(items), (run, task)
            scores[run, task] = acc
    # what is measured is knowledge: lm-eval's own figures rise with training on the facts
    assert scores["trained", "miniglm_choices_plain"] >= 0.7  # (0.90 on a Zen 4; the untrained one 0.275)
    assert scores["trained", "miniglm_choices_plain"] >= scores["untrained", "miniglm_choices_plain"] + 0.4
