"""
Reinforcement learning from rewards that can be checked: GRPO (Shao et al. 2024), run by
train.py with stage='grpo' on an SFT data folder, starting from an SFT checkpoint.

Each iteration: grpo_prompts questions of the SFT train split (none whose text is a held-out
question), grpo_group answers to each sampled from the current policy (generation.generate:
batched, KV cache, the decoding constraint, the length cap grpo_max_new_tokens), a reward for
each (miniglm/align/rewards.py), and the advantage of each answer within its group, as trl computes it:
(r - group mean) / (group std + 1e-4), or r - mean with grpo_scale_rewards=False. Groups whose
rewards are all equal carry no signal: they are skipped (their share is logged). Then
grpo_iterations updates on these samples of the token-level clipped policy-gradient loss
(trl's 'bnpo': summed over the answer tokens, divided by their number),

  -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) + grpo_kl ratio (exp(ref - logp) - (ref - logp) - 1),

ratio = exp(logp - logp at sampling time): 1, and no clipping, on the first update. The KL term
(k3) is to the frozen reference (reference.py); grpo_kl = 0 is trl's default.
"""
import time

import torch

from data_utils import SFTData, UserError
from miniglm import distributed
from miniglm.align.reference import ReferenceTrainer, token_logps, train_questions
from miniglm.align.rewards import load_reward, score
from miniglm.chat_template import render_prompt
from miniglm.generation import GREEDY, answer_batch, generate, left_padded, model_constraint
from miniglm.metrics import answer_metrics, held_out_questions, question_type

METRICS = ("reward", "reward_std", "zero_spread_groups", "kl", "entropy", "answer_tokens", "sample_s",
           "learn_s", "sample_tokens_per_s")


def group_advantages(rewards, group, scale=True):
    """(advantages, the groups' spread is zero) of rewards (P * group,), trl's formula
    (trl/trainer/grpo_trainer.py, _generate_and_score_completions: the unbiased group std,
    advantages = (rewards - mean) / (std + 1e-4); 'none' leaves out the division)."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(1).repeat_interleave(group)
    std = grouped.std(1).repeat_interleave(group)
    advantages = rewards - mean
    if scale:
        advantages = advantages / (std + 1e-4)
    return advantages, torch.isclose(std, torch.zeros_like(std))


def grpo_loss(logp, old_logp, ref_logp, advantages, rows, clip, kl_weight):
    """(loss, mean k3 KL) over flat answer tokens; rows: each token's row (its advantage)."""
    ratio = torch.exp(logp - old_logp)
    a = advantages[rows]
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - clip, 1 + clip) * a)
    # k3, times the ratio: trl's use_bias_correction_kl (its default), an unbiased estimate under reused samples
    kl = (
        (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1) * ratio if ref_logp is not None else torch.zeros_like(logp)
    )
    if kl_weight:
        per_token = per_token + kl_weight * kl
    return per_token.sum() / max(1, per_token.numel()), kl.detach().mean()


class GRPOTrainer(ReferenceTrainer):
    """GRPO: each iteration samples answers (rollouts), rewards them, and takes the clipped
    policy-gradient step on them with Trainer's set_lr and update; best.pt is chosen by the
    mean reward of greedy answers to the dev questions (selection)."""

    stage = "grpo"
    CONFIG = dict(
        grpo_prompts=8,  # questions per iteration (all processes together)
        grpo_group=8,  # answers sampled per question: each is judged against its group
        grpo_max_new_tokens=48,  # the length cap of an answer
        grpo_temperature=1.0,  # the sampling temperature of the rollouts
        grpo_reward="miniglm.align.rewards:qa_reward",  # the reward, as module:function (miniglm/align/rewards.py)
        grpo_format_reward=0.1,  # + this for an answer that ended with the end token before the cap
        grpo_kl=0.0,  # the k3 KL's weight (trl's default: 0)
        grpo_clip=0.2,  # the ratio's clip epsilon
        grpo_iterations=1,  # updates per batch of samples (more than 1 reuses them: the ratio then matters)
        grpo_scale_rewards=True,  # advantages (r - mean) / (std + 1e-4) as trl; False: r - mean (nanochat)
        grpo_dev_questions=64,  # greedy answers to this many dev questions at each evaluation: choose best.pt
        grpo_question_types="all",  # or some of 作者, 下一句, 背诵, dialogue (metrics.question_type): '作者+下一句'
    )

    def check_config(self, c):
        super().check_config(c)
        if c["init_from"] == "scratch":
            raise UserError(
                "stage='grpo' improves a trained model: set init_from to an SFT checkpoint "
                "(init_from='scratch' samples nothing worth rewarding)"
            )
        group = c["grpo_group"]
        if isinstance(group, bool) or not isinstance(group, int) or group < 2:
            raise UserError(f"grpo_group must be at least 2 (an answer is judged against its group), got {group!r}")

    def open_data(self, data_dir, block_size, tok):
        data = super().open_data(data_dir, block_size, tok)
        if not isinstance(data, SFTData):
            raise UserError(
                f"{data_dir}: stage='grpo' takes its questions from an SFT folder (sft_train.jsonl, "
                f"data/prepare_sft.py)"
            )
        return data

    def build_model(self):
        super().build_model()
        c = self.c
        self.kind = "grpo"
        self.reward_fn = load_reward(c["grpo_reward"])
        room = self.raw_model.context_size - c["grpo_max_new_tokens"]
        asked = train_questions(c["data_dir"])
        if c["grpo_question_types"] != "all":
            kinds = {k.strip() for k in c["grpo_question_types"].replace("+", ",").split(",")}
            asked = [x for x in asked if question_type(x[0]) in kinds]
        self.questions = []  # (question, reference, record, prompt ids) of those that leave room for an answer
        for question, reference, record in asked:
            ids = render_prompt(self.tok, [], question, self.template)
            if len(ids) <= room:
                self.questions.append((question, reference, record, ids))
        if not self.questions:
            raise UserError(
                f"{c['data_dir']}: no train question (of grpo_question_types) leaves room for "
                f"grpo_max_new_tokens={c['grpo_max_new_tokens']} in the model's "
                f"{self.raw_model.context_size} positions"
            )
        if c["grpo_prompts"] % self.run.world:
            raise UserError(f"grpo_prompts={c['grpo_prompts']} must be divisible by the number of processes")
        self.constraint = model_constraint(self.tok, {"chars": self.chars})
        # tokens/iter in the log: at most the sampled ones (prompts x group x length cap)
        sampled = c["grpo_prompts"] * c["grpo_group"] * c["grpo_max_new_tokens"]
        rows_per_iter = c["gradient_accumulation_steps"] * c["batch_size"]
        self.block = -(-sampled // rows_per_iter)  # (rounded up)

    def rollouts(self, picks):
        """Rows of prompt + sampled answer, their answer mask, rewards, and what took how long."""
        c, G, tok = self.c, self.c["grpo_group"], self.tok
        t0 = time.time()
        self.raw_model.eval()
        asked = [i for i in picks for _ in range(G)]  # each question G times
        contexts = [self.questions[i][3] for i in asked]
        idx, pad = left_padded(contexts, tok.eot, self.run.device)
        rows = [self.constraint.with_chars(self.questions[i][0]) for i in asked]
        out = generate(
            self.raw_model,
            idx,
            c["grpo_max_new_tokens"],
            temperature=c["grpo_temperature"],
            stop_token=tok.stop_ids,
            constraint=rows,
            pad=pad,
        )
        out = out[:, idx.size(1) :].tolist()  # the answers alone
        self.raw_model.train()
        sampled, answers, ended = [], [], []
        for ids in out:
            stop = next((k for k, t in enumerate(ids) if t in tok.stop_ids), None)
            sampled.append(ids[: stop + 1] if stop is not None else ids)  # (the end token is trained too)
            answers.append(tok.decode(ids[:stop] if stop is not None else ids))
            ended.append(stop is not None)
        sample_s = time.time() - t0
        rewards = []
        for i, answer, answer_ended in zip(asked, answers, ended):
            question, _, record, _ = self.questions[i]
            reward = score(self.reward_fn, question, answer, record)
            rewards.append(reward + c["grpo_format_reward"] * answer_ended)
        rewards = torch.tensor(rewards)
        seqs = [ctx + s for ctx, s in zip(contexts, sampled)]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.eot] * (width - len(s)) for s in seqs])  # (P*G, width)
        mask = torch.tensor(
            [[0] * len(ctx) + [1] * len(s) + [0] * (width - len(ctx) - len(s)) for ctx, s in zip(contexts, sampled)]
        )  # (P*G, width): 1 on the answer's tokens
        batch = dict(x=ids[:, :-1], y=ids[:, 1:], loss_mask=mask[:, 1:])
        batch = {k: v.to(self.run.device) for k, v in batch.items()}
        return batch, rewards.to(self.run.device), sample_s, sum(map(len, sampled))

    def train_step(self, lr):
        """Sample, reward, then grpo_iterations updates (Trainer.update) of the clipped loss."""
        c, run, model = self.c, self.run, self.model
        self.set_lr(lr)
        picks = torch.randint(len(self.questions), (c["grpo_prompts"],), generator=self.data_gen)
        picks = picks.view(run.world, -1)[run.rank].tolist()  # each process samples its own prompts
        batch, rewards, sample_s, n_tokens = self.rollouts(picks)
        t0 = time.time()
        advantages, flat = group_advantages(rewards, c["grpo_group"], c["grpo_scale_rewards"])
        rows = batch["loss_mask"].bool().nonzero()[:, 0]  # each answer token's row
        live = ~flat[rows]  # the tokens of groups with some spread: the others carry no signal
        with torch.no_grad():  # the log-probabilities at sampling time: needed apart only for reused batches
            old = token_logps(self.raw_model, batch)[0] if c["grpo_iterations"] > 1 else None
            ref = self.reference_logps(batch, per_token=True)
        # no group with any spread in any process: no update at all (AdamW's momentum and weight
        # decay would still move the weights)
        learn = distributed.all_mean(live.any().float(), run).item() > 0
        loss = kl = entropy = torch.zeros((), device=run.device)
        for _ in range(c["grpo_iterations"] if learn else 0):
            with run.amp:
                logp, entropy = token_logps(model, batch)
                if old is None:  # one update per batch: the sampling-time log-probabilities are its own, as in trl
                    old = logp.detach()
                loss, kl = grpo_loss(
                    logp[live], old[live], ref[live], advantages, rows[live], c["grpo_clip"], c["grpo_kl"]
                )
            self.scaler.scale(loss).backward()  # (a batch of only flat groups: a zero gradient)
            self.update()
        self.running_loss += loss.detach()
        groups = c["grpo_group"]
        self.metric_sums += torch.tensor(
            [
                rewards.mean(),
                rewards.view(-1, groups).std(1).mean(),
                flat.view(-1, groups)[:, 0].float().mean(),
                kl,
                entropy.mean(),
                n_tokens / len(rewards),
                sample_s,
                time.time() - t0,
                n_tokens / sample_s,
            ],
            device=run.device,
        )

    def log_extras(self, record, line):
        if record["kind"] == "train":
            means = distributed.all_mean(self.metric_sums, self.run) / self.iters_since_log
            record.update(zip(METRICS, means.tolist()))
            line += (
                f", reward {record['reward']:.3f} (spread {record['reward_std']:.3f}, "
                f"{record['zero_spread_groups']:.0%} flat), kl {record['kl']:.4f}, "
                f"{record['answer_tokens']:.0f} tokens/answer, sampling {record['sample_s']:.2f} s"
            )
            self.metric_sums.zero_()
        elif record["kind"] == "eval" and self.dev is not None:
            record.update(self.dev)
            passes = [f"{k[len('dev_pass@1_') :]} {v:.2f}" for k, v in self.dev.items() if k.startswith("dev_pass@1_")]
            line += f", dev greedy reward {self.dev['dev_reward']:.4f}, pass@1 " + ", ".join(passes)
        return line

    def estimate_loss(self):
        self.dev = self.dev_scores() if self.run.master else None
        return super().estimate_loss()  # the SFT answer loss on the val rows: how far it drifts

    def selection(self, losses):
        """best.pt is chosen by what GRPO optimises: the reward, of greedy answers to the dev
        questions (the validation loss measures SFT's objective, which GRPO may raise)."""
        if not self.run.master:  # (process 0 answers the dev questions, and writes best.pt)
            return "dev_reward", None, True, ""
        if self.dev is None:  # no dev questions to score: the latest weights
            return "iter", self.iter_num, True, "the latest: no dev questions to score"
        rule = f"the highest mean reward of greedy answers to {self.dev_count} dev questions; ties: the later"
        return "dev_reward", self.dev["dev_reward"], True, rule

    def dev_scores(self):
        """The mean reward (grpo_reward, without the format term) and the key-fact rate per type of
        greedy answers to the dev questions (held-out, after the 100 scored ones)."""
        qs = held_out_questions(self.c["data_dir"], self.c["grpo_dev_questions"], skip=100)
        self.dev_count = len(qs)
        if not qs:
            return None
        self.raw_model.eval()
        answers = answer_batch(
            self.raw_model,
            self.tok,
            [q for q, _ in qs],
            constraint=self.constraint,
            template=self.template,
            max_new_tokens=self.c["grpo_max_new_tokens"],
            **GREEDY,
        )
        self.raw_model.train()
        rewards = []
        for (question, reference), answer in zip(qs, answers):
            record = {
                "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reference}],
                "reference": reference,
            }
            rewards.append(score(self.reward_fn, question, answer, record))
        by_type = answer_metrics(answers, qs)["by_type"]
        scores = {f"dev_pass@1_{t}": v["key_fact_rate"] for t, v in by_type.items() if "key_fact_rate" in v}
        scores["dev_reward"] = sum(rewards) / len(rewards)
        return scores

    def train(self):
        self.metric_sums = torch.zeros(len(METRICS), device=self.run.device)
        self.dev = None
        super().train()
