"""DPO checked by trl itself: a policy trained with stage='dpo' and its reference, exported to
transformers (export_hf.py), run through trl's DPOTrainer on the same batch of token ids
(trl's DataCollatorForPreference, then DPOTrainer._compute_loss: its forward, its summed
log-probabilities, its loss and its metrics) give the project's loss and rewards within 1e-5."""
import json
import math

import pytest
import torch

import train
from conftest import TINY, run_script
from miniglm.align.dpo import METRICS, PairData, dpo_loss
from miniglm.align.reference import sequence_logps
from miniglm.checkpoint import load_model

pytestmark = pytest.mark.slow  # every test here trains, exports or runs end to end

POEM = [("《静夜思》的作者是谁?", "《静夜思》的作者是李白。", "《静夜思》的作者是杜甫。"),
        ("“床前明月光”的下一句是什么?", "“床前明月光”的下一句是“疑是地上霜”。", "“床前明月光”的下一句是“春眠不觉晓”。"),
        ("请背诵《春晓》。", "春眠不觉晓，处处闻啼鸟。", "春风又绿江南岸。"),
        ("《登鹳雀楼》的作者是谁?", "《登鹳雀楼》的作者是王之涣。", "《登鹳雀楼》的作者是王维。"),
        ("早上好!", "早上好!", "你穿越一只什么。"),
        ("“白日依山尽”的下一句是什么?", "“白日依山尽”的下一句是“黄河入海流”。", "“白日依山尽”的下一句是“江流天地外”。")]
BETA = 0.5
# the project's loss (with rpo_alpha) and trl's loss_type list (with loss_weights) for the same thing
CASES = {"sigmoid": ("sigmoid", 0.0, ["sigmoid"], None), "hinge": ("hinge", 0.0, ["hinge"], None),
         "ipo": ("ipo", 0.0, ["ipo"], None), "sigmoid+sft": ("sigmoid", 0.7, ["sigmoid", "sft"], [1.0, 0.7])}


@pytest.fixture(scope="module")
def aligned(vocab_runs, tmp_path_factory):
    """A DPO run on the BPE model (rotary: GPT-NeoX in transformers), policy and reference exported."""
    pytest.importorskip("trl")
    out = tmp_path_factory.mktemp("trl")
    sft = vocab_runs["bpe"] / "sft"
    src = out / "prefs.jsonl"
    src.write_text("".join(json.dumps({"prompt": q, "chosen": c, "rejected": r}, ensure_ascii=False) + "\n"
                           for q, c, r in POEM * 2))
    run_script("data/prepare_pairs.py", f"--vocab={sft}", f"--input={src}", f"--out_dir={out / 'pairs'}",
               "--block_size=64", "--val_fraction=0.2")
    train.main([*TINY, "--block_size=64", f"--data_dir={out / 'pairs'}", f"--out_dir={out / 'dpo'}",
                f"--init_from={sft / 'best.pt'}", "--stage=dpo", f"--beta={BETA}", "--learning_rate=3e-3",
                "--max_iters=6", "--eval_interval=6", "--eval_iters=1"])
    for name, ckpt in (("policy", out / "dpo" / "ckpt.pt"), ("reference", sft / "best.pt")):
        run_script("export_hf.py", f"--out_dir={ckpt}", f"--dest={out / name}")
    return out, sft


@pytest.mark.parametrize("case", list(CASES))
def test_trl_computes_the_projects_dpo_loss_and_rewards(aligned, case):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    loss_type, rpo_alpha, trl_types, trl_weights = CASES[case]
    aligned, sft = aligned
    policy, tok, _ = load_model(aligned / "dpo" / "ckpt.pt")
    reference, _, _ = load_model(sft / "best.pt")
    data = PairData(aligned / "pairs", policy.context_size, tok)
    batch = data.load("train", torch.arange(data.num_rows("train")), "cpu")
    with torch.no_grad():
        logps, counts = sequence_logps(policy, batch)
        ref, _ = sequence_logps(reference, batch)
        ours, our_metrics = dpo_loss(logps, ref, counts, BETA, loss_type, rpo_alpha)
    assert abs(ours.item() - {"ipo": (1 / (2 * BETA)) ** 2}.get(loss_type, 0.0)) > 1e-3  # trained: not the start

    # the same pairs as trl's examples: prompt ids, then each answer's ids (its trained tokens)
    ids, mask = batch["x"], batch["loss_mask"]
    examples = []
    n = len(ids) // 2
    for k in range(n):
        rows = []
        for r in (k, n + k):
            full = torch.cat([ids[r], batch["y"][r, -1:]])
            trained = torch.cat([torch.zeros(1, dtype=torch.long), mask[r]]).nonzero().flatten()
            rows.append((full[:trained[0]].tolist(), full[trained[0]:trained[-1] + 1].tolist()))
        assert rows[0][0] == rows[1][0]  # one prompt for both sides
        examples.append({"prompt_ids": rows[0][0], "chosen_ids": rows[0][1], "rejected_ids": rows[1][1]})
    hf_policy = AutoModelForCausalLM.from_pretrained(aligned / "policy")
    hf_reference = AutoModelForCausalLM.from_pretrained(aligned / "reference")
    args = DPOConfig(output_dir=str(aligned / f"trl-{case}"), beta=BETA, loss_type=trl_types, report_to="none",
                     use_cpu=True, bf16=False, **({"loss_weights": trl_weights} if trl_weights else {}))
    trainer = DPOTrainer(
        model=hf_policy,
        ref_model=hf_reference,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": q, "chosen": c, "rejected": r} for q, c, r in POEM]),
        processing_class=AutoTokenizer.from_pretrained(aligned / "policy"),
    )
    inputs = DataCollatorForPreference(pad_token_id=tok.eot)(examples)
    trainer.model.train()
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    assert abs(theirs.item() - ours.item()) < 1e-5, (theirs.item(), ours.item())
    for name, value in zip(METRICS, our_metrics.tolist()):
        # summed log-probabilities are ~100 in size, where float32's step is 7.6e-6: another CPU's summation
        # order moved logps/chosen by 1.5e-5 (2 steps) on a Zen 4, so they are compared relative to their size
        theirs_value = trainer._metrics["train"][name][-1]
        assert math.isclose(theirs_value, value, rel_tol=1e-6, abs_tol=1e-5), (name, theirs_value, value)
