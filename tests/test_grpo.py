"""GRPO (miniglm/align/grpo.py, rewards.py): the rewards on hand-made answers, advantages and loss equal to
trl's (its own GRPOTrainer._compute_loss on the same token ids), groups of equal rewards skipped,
exact resume (the sampler's RNG in the checkpoint), DDP, LoRA, and one-line bad input."""
import math

import pytest
import torch

import train
from conftest import TINY, read_log, run_script, torchrun_train
from data_utils import UserError
from miniglm.align.grpo import group_advantages, grpo_loss
from miniglm.align.rewards import load_reward, qa_reward, score
from miniglm.checkpoint import load_checkpoint, load_model

BAD_PROMPTS = []


def constant_reward(prompt, answer, record):  # every answer alike: every group flat
    return 1.0


def nan_reward(prompt, answer, record):
    BAD_PROMPTS.append(prompt)
    return float("nan")


CALLS = []


def rising_reward(
    prompt, answer, record
):  # every call more than the last: each evaluation's dev reward beats the one before
    CALLS.append(prompt)
    return len(CALLS) * 1e-3


def falling_reward(prompt, answer, record):  # every call less than the last: the first evaluation stays the best
    CALLS.append(prompt)
    return -len(CALLS) * 1e-3


def test_rewards_on_hand_made_answers():
    author = ("《静夜思》的作者是谁?", {"reference": "《静夜思》的作者是李白。"})
    assert qa_reward(author[0], "《静夜思》的作者是李白。", author[1]) == pytest.approx(1.5)
    right_author_other_title = qa_reward(author[0], "《静夜》的作者是李白。", author[1])
    wrong = qa_reward(author[0], "《静夜思》的作者是杜甫。", author[1])
    assert 1.0 < right_author_other_title < 1.5 and 0 < wrong < 0.5  # the fact is worth more than the form
    nxt = ("“床前明月光”的下一句是什么?", {"reference": "“床前明月光”的下一句是“疑是地上霜”。"})
    assert qa_reward(nxt[0], "“床前明月光”的下一句是“疑是地上霜”。", nxt[1]) == pytest.approx(1.5)
    assert qa_reward(nxt[0], "“床前明月光”的下一句是“疑是地上雪”。", nxt[1]) < 0.5
    assert qa_reward("早上好!", "早上好!", {"reference": "早上好!"}) == pytest.approx(0.5)  # no fact: F1 only
    assert load_reward("rewards:qa_reward") is qa_reward
    for spec, message in (
        ("rewards", "must be 'module:function'"),
        ("no_such_module:f", "cannot import 'no_such_module'"),
        ("rewards:nope", "'rewards' has no 'nope'"),
    ):
        with pytest.raises(UserError, match=message):
            load_reward(spec)
    with pytest.raises(UserError, match=r"returned nan, not a finite number \(prompt '问'\)"):
        score(nan_reward, "问", "答", {})
    with pytest.raises(UserError, match=r"returned 'x', not a finite number"):
        score(lambda p, a, r: "x", "问", "答", {})


@pytest.mark.slow
def test_advantages_and_loss_equal_trls(vocab_runs, tmp_path):
    """trl/trainer/grpo_trainer.py (trl 1.16.0), _generate_and_score_completions, lines 2765-2787:
    mean_grouped_rewards = nanmean(rewards.view(-1, G), 1); std_rewards = nanstd(...) (trl's own,
    unbiased); advantages = (rewards - mean) / (std + 1e-4). The loss: trl's _compute_loss itself."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import nanstd

    from miniglm.align.reference import token_logps

    rewards = torch.tensor([0.1, 0.5, 0.5, 1.5, 0.2, 0.2, 0.2, 0.2])  # 2 groups of 4; the second flat
    ours, flat = group_advantages(rewards, 4)
    grouped = rewards.view(-1, 4)
    theirs = (rewards - torch.nanmean(grouped, 1).repeat_interleave(4)) / (
        nanstd(grouped, 1).repeat_interleave(4) + 1e-4
    )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert flat.tolist() == [False] * 4 + [True] * 4
    torch.testing.assert_close(
        group_advantages(rewards, 4, scale=False)[0], rewards - grouped.mean(1).repeat_interleave(4)
    )

    sft = vocab_runs["bpe"] / "sft"
    run_script("export_hf.py", f"--out_dir={sft}", f"--dest={tmp_path / 'hf'}")
    model, tok, _ = load_model(sft)
    g = torch.Generator().manual_seed(0)
    B, P, C = 4, 5, 6
    prompt, completion = torch.randint(0, 8000, (B, P), generator=g), torch.randint(0, 8000, (B, C), generator=g)
    cmask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3, [1] * 6])
    old, ref = torch.randn(B, C, generator=g) * 0.5 - 8, torch.randn(B, C, generator=g) * 0.5 - 8
    advantages = torch.tensor([1.0, -0.5, 0.2, -0.7])
    ids = torch.cat([prompt, completion], 1)
    batch = dict(x=ids[:, :-1], y=ids[:, 1:], loss_mask=torch.cat([torch.zeros(B, P - 1, dtype=torch.long), cmask], 1))
    keep = cmask.bool()
    for kl_weight in (0.0, 0.04):
        with torch.no_grad():
            logp, entropy = token_logps(model, batch)
            loss, kl = grpo_loss(
                logp, old[keep], ref[keep], advantages, batch["loss_mask"].bool().nonzero()[:, 0], 0.2, kl_weight
            )
        args = GRPOConfig(
            output_dir=str(tmp_path / "trl"),
            num_generations=4,
            per_device_train_batch_size=4,
            beta=kl_weight,
            loss_type="bnpo",
            epsilon=0.2,
            report_to="none",
            use_cpu=True,
            bf16=False,
            max_completion_length=C,
        )
        trainer = GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(tmp_path / "hf"),
            args=args,
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            train_dataset=Dataset.from_list([{"prompt": "问"}] * 4),
            processing_class=AutoTokenizer.from_pretrained(tmp_path / "hf"),
        )
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # (its training loop sets it)
        with torch.no_grad():
            trl_loss = trainer._compute_loss(
                trainer.model,
                dict(
                    prompt_ids=prompt,
                    prompt_mask=torch.ones_like(prompt),
                    completion_ids=completion,
                    completion_mask=cmask,
                    advantages=advantages,
                    old_per_token_logps=old,
                    ref_per_token_logps=ref,
                ),
            )
        assert abs(trl_loss.item() - loss.item()) < 1e-6, (trl_loss.item(), loss.item())
        assert abs(trainer._metrics["train"]["entropy"][-1] - entropy.mean().item()) < 1e-5
        if kl_weight:
            assert abs(trainer._metrics["train"]["kl"][-1] - kl.item()) < 1e-5
    assert abs(loss.item()) > 1e-3  # the ratios are not 1 and some are clipped: a check that can fail


def grpo_args(tiny_runs, sft_data, out, *extra):
    return [
        *TINY,
        f"--data_dir={sft_data}",
        f"--out_dir={out}",
        f"--init_from={tiny_runs[1] / 'best.pt'}",
        "--stage=grpo",
        "--grpo_prompts=2",
        "--grpo_group=4",
        "--grpo_max_new_tokens=12",
        "--learning_rate=1e-3",
        "--eval_interval=2",
        "--eval_iters=2",
        "--lr_decay_iters=4",
        "--warmup_iters=0",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_grpo_trains_and_resumes_exactly(tiny_runs, tiny_sft_data, tmp_path, method):
    extra = ["--finetune=lora", "--learning_rate=1e-2"] if method == "lora" else []
    train.main(grpo_args(tiny_runs, tiny_sft_data, tmp_path / "full", "--max_iters=4", *extra))
    train.main(grpo_args(tiny_runs, tiny_sft_data, tmp_path / "split", "--max_iters=2", *extra))
    train.main(grpo_args(tiny_runs, tiny_sft_data, tmp_path / "split", "--max_iters=4", *extra, "--init_from=resume"))
    full, split = read_log(tmp_path / "full", "train"), read_log(tmp_path / "split", "train")
    assert [(s["loss"], s["reward"]) for s in split] == [(s["loss"], s["reward"]) for s in full]
    for key in (
        "reward",
        "reward_std",
        "zero_spread_groups",
        "kl",
        "entropy",
        "answer_tokens",
        "sample_s",
        "sample_tokens_per_s",
    ):
        assert all(math.isfinite(s[key]) for s in full)
    assert load_checkpoint(tmp_path / "full" / "ckpt.pt")["kind"] == "grpo"


def test_flat_groups_are_skipped_and_change_nothing(tiny_runs, tiny_sft_data, tmp_path):
    train.main(
        grpo_args(
            tiny_runs,
            tiny_sft_data,
            tmp_path,
            "--max_iters=2",
            "--grpo_reward=test_grpo:constant_reward",
            "--grpo_format_reward=0.0",
        )
    )
    assert all(s["zero_spread_groups"] == 1.0 for s in read_log(tmp_path, "train"))
    before = load_checkpoint(tiny_runs[1] / "best.pt")["model"]
    after = load_checkpoint(tmp_path / "ckpt.pt")["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # no signal, no update (not even weight decay)


@pytest.mark.slow
def test_grpo_under_ddp_samples_per_process(tiny_runs, tiny_sft_data, tmp_path):
    args = [a for a in grpo_args(tiny_runs, tiny_sft_data, tmp_path, "--max_iters=2") if a != "--device=cpu"]
    torchrun_train(2, *args, "--device=cpu")
    assert [s["iter"] for s in read_log(tmp_path, "train")] == [1, 2]


def test_bad_grpo_input_is_one_line(tiny_runs, tiny_sft_data, tmp_path):
    args = grpo_args(tiny_runs, tiny_sft_data, tmp_path, "--max_iters=1")
    cases = [
        (["--grpo_group=1"], "grpo_group must be at least 2"),
        (["--init_from=scratch"], "stage='grpo' improves a trained model"),
        (["--grpo_reward=no_such_module:f"], "cannot import 'no_such_module'"),
        (["--grpo_max_new_tokens=64"], "leaves room for grpo_max_new_tokens=64 in the model's 64 positions"),
        (["--grpo_reward=test_grpo:nan_reward"], "the reward function returned nan, not a finite number (prompt"),
    ]
    for extra, message in cases:
        with pytest.raises(UserError) as e:
            train.main(args + extra)
        assert message in str(e.value) and "\n" not in str(e.value)
    assert BAD_PROMPTS and f"prompt {BAD_PROMPTS[-1]!r}" in str(e.value)  # (the last: an earlier test adds one)
    # a real process, as a user sees it: one line, no traceback
    proc = run_script("train.py", *args, "--grpo_group=1", check=False, isolated=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_best_pt_is_chosen_by_dev_reward_not_val_loss(tiny_runs, tiny_sft_data, tmp_path):
    """A GRPO run whose SFT val loss rises (lr 3e-2) and whose dev reward rises (rising_reward): best.pt,
    which sample.py, serve.py, evaluations.py and the exports open, is the last evaluation's weights and
    not the SFT model it started from (it was, when the val loss chose); the report names them."""
    init = tiny_runs[1] / "best.pt"
    train.main(
        grpo_args(
            tiny_runs,
            tiny_sft_data,
            tmp_path / "run",
            "--max_iters=4",
            "--learning_rate=3e-2",
            "--grpo_reward=test_grpo:rising_reward",
            "--grpo_dev_questions=8",
        )
    )
    evals = read_log(tmp_path / "run", "eval")
    assert [e["iter"] for e in evals] == [0, 2, 4]
    assert min(e["val_loss"] for e in evals[1:]) > evals[0]["val_loss"]  # the case: lr 3e-2 wrecks SFT's loss
    assert evals[2]["dev_reward"] > evals[1]["dev_reward"] > evals[0]["dev_reward"]
    model, _, meta = load_model(tmp_path / "run")
    assert meta["best"]["metric"] == "dev_reward" and meta["best"]["iter"] == 4 and meta["iter_num"] == 4
    assert meta["best"]["value"] == evals[2]["dev_reward"]
    started = load_checkpoint(init)["model"]
    opened = model.state_dict()
    assert any(not torch.equal(started[k], opened[k]) for k in started)  # GRPO's weights, not SFT's
    assert "iteration 4 of 4, dev_reward" in meta["weights"] and "highest mean reward" in meta["weights"]
    run_script(
        "evaluations.py",
        f"--out_dir={tmp_path / 'run'}",
        f"--sft_data={tiny_sft_data}",
        "--questions=2",
        "--max_new_tokens=4",
        "--max_batches=2",
        "--pretrain_data=none",
    )
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| weights evaluated |" in report and "best.pt: iteration 4 of 4, dev_reward" in report


def test_iteration_0_is_named_plainly(tiny_runs, tiny_sft_data, tmp_path):
    """When no later evaluation beats the first (falling_reward), best.pt is iteration 0, the SFT
    model itself: whatever opens the folder says so."""
    train.main(
        grpo_args(
            tiny_runs,
            tiny_sft_data,
            tmp_path,
            "--max_iters=2",
            "--grpo_reward=test_grpo:falling_reward",
            "--grpo_dev_questions=8",
        )
    )
    _, _, meta = load_model(tmp_path)
    assert meta["best"]["iter"] == 0
    assert "iteration 0 of this grpo run: the weights it started from" in meta["weights"]
    assert str(tiny_runs[1] / "best.pt") in meta["weights"]
