"""
Reinforcement learning from rewards that can be checked: GRPO (Shao et al. 2024), run by
train.py with stage='grpo' on an SFT data folder, starting from an SFT checkpoint.

Each iteration: grpo_prompts questions of the SFT train split (none whose text is a held-out
question), grpo_group answers to each sampled from the current policy (generation.generate:
batched, KV cache, the decoding constraint, the length cap grpo_max_new_tokens), a reward for
each (rewards.py), and the advantage of each answer within its group, as trl computes it:
(r - group mean) / (group std + 1e-4), or r - mean with grpo_scale_rewards=False. Groups whose
rewards are all equal carry no signal: they are skipped (their share is logged). Then
grpo_iterations updates on these samples of the token-level clipped policy-gradient loss
(trl's 'bnpo': summed over the answer tokens, divided by their number),

  -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) + grpo_kl ratio (exp(ref - logp) - (ref - logp) - 1),

ratio = exp(logp - logp at sampling time): 1, and no clipping, on the first update. The KL term
(k3) is to the frozen reference (align.ReferenceMixin); grpo_kl = 0 is trl's default.
"""
import time

import torch

import distributed
from align import ReferenceMixin, token_logps, train_questions
from chat_template import render_prompt
from data_utils import UserError
from evaluations import answer_metrics, held_out_questions, question_type
from generation import GREEDY, answer_batch, generate, left_padded, model_constraint
from rewards import load_reward, score

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
    kl = (torch.exp(ref_logp - logp) - (ref_logp - logp) - 1) * ratio if ref_logp is not None else torch.zeros_like(logp)
    if kl_weight:
        per_token = per_token + kl_weight * kl
    return per_token.sum() / max(1, per_token.numel()), kl.detach().mean()


class GRPOMixin(ReferenceMixin):
    """For train.Trainer: GRPO's rollouts, rewards, step and evaluation."""

    def build_model(self):
        super().build_model()
        c = self.c
        self.reward_fn = load_reward(c["grpo_reward"])
        room = self.raw_model.context_size - c["grpo_max_new_tokens"]
        asked = train_questions(c["data_dir"])
        if c["grpo_question_types"] != "all":
            kinds = {k.strip() for k in c["grpo_question_types"].replace("+", ",").split(",")}
            asked = [x for x in asked if question_type(x[0]) in kinds]
        self.questions = [(q, ref, rec, ids) for q, ref, rec in asked
                          if len(ids := render_prompt(self.tok, [], q, self.template)) <= room]
        if not self.questions:
            raise UserError(f"{c['data_dir']}: no train question (of grpo_question_types) leaves room for grpo_max_new_tokens="
                            f"{c['grpo_max_new_tokens']} in the model's {self.raw_model.context_size} positions")
        if c["grpo_prompts"] % self.run.world:
            raise UserError(f"grpo_prompts={c['grpo_prompts']} must be divisible by the number of processes")
        self.constraint = model_constraint(self.tok, {"chars": self.chars})
        self.kind = "grpo"
        # tokens/iter in the log: at most the sampled ones (prompts x group x length cap)
        self.block = -(-c["grpo_prompts"] * c["grpo_group"] * c["grpo_max_new_tokens"]
                       // (c["gradient_accumulation_steps"] * c["batch_size"]))

    def rollouts(self, picks):
        """Rows of prompt + sampled answer, their answer mask, rewards, and what took how long."""
        c, G, tok = self.c, self.c["grpo_group"], self.tok
        t0 = time.time()
        self.raw_model.eval()
        contexts = [self.questions[i][3] for i in picks for _ in range(G)]
        idx, pad = left_padded(contexts, tok.eot, self.run.device)
        rows = [self.constraint.with_chars(self.questions[i][0]) for i in picks for _ in range(G)]
        out = generate(self.raw_model, idx, c["grpo_max_new_tokens"], temperature=c["grpo_temperature"],
                       stop_token=tok.stop_ids, constraint=rows, pad=pad)[:, idx.size(1):].tolist()
        self.raw_model.train()
        sampled, answers, ended = [], [], []
        for ids in out:
            stop = next((k for k, t in enumerate(ids) if t in tok.stop_ids), None)
            sampled.append(ids[:stop + 1] if stop is not None else ids)
            answers.append(tok.decode(ids[:stop] if stop is not None else ids))
            ended.append(stop is not None)
        sample_s = time.time() - t0
        rewards = torch.tensor([score(self.reward_fn, self.questions[i][0], a, self.questions[i][2])
                                + c["grpo_format_reward"] * e
                                for i, a, e in zip([i for i in picks for _ in range(G)], answers, ended)])
        seqs = [ctx + s for ctx, s in zip(contexts, sampled)]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.eot] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[0] * len(ctx) + [1] * len(s) + [0] * (width - len(ctx) - len(s))
                             for ctx, s in zip(contexts, sampled)])
        batch = {k: v.to(self.run.device) for k, v in dict(x=ids[:, :-1], y=ids[:, 1:], loss_mask=mask[:, 1:]).items()}
        return batch, rewards.to(self.run.device), sample_s, sum(map(len, sampled))

    def train_step(self, lr):
        c, run, model = self.c, self.run, self.model
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        picks = torch.randint(len(self.questions), (c["grpo_prompts"],), generator=self.data_gen)
        picks = picks.view(run.world, -1)[run.rank].tolist()  # each process samples its own prompts
        batch, rewards, sample_s, n_tokens = self.rollouts(picks)
        t0 = time.time()
        advantages, flat = group_advantages(rewards, c["grpo_group"], c["grpo_scale_rewards"])
        rows = batch["loss_mask"].bool().nonzero()[:, 0]
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
                old = logp.detach() if old is None else old  # (one update per batch: they are its own, as in trl)
                loss, kl = grpo_loss(logp[live], old[live], ref[live], advantages, rows[live], c["grpo_clip"],
                                     c["grpo_kl"])
            self.scaler.scale(loss).backward()  # (a batch of only flat groups: a zero gradient)
            if c["grad_clip"] > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.held is None:  # what this process holds, measured once with the gradients there
                self.held = distributed.held_bytes(model, self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
        self.running_loss += loss.detach()
        self.metric_sums += torch.tensor([rewards.mean(), rewards.view(-1, c["grpo_group"]).std(1).mean(),
                                          flat.view(-1, c["grpo_group"])[:, 0].float().mean(), kl,
                                          entropy.mean(), n_tokens / len(rewards), sample_s, time.time() - t0,
                                          n_tokens / sample_s], device=run.device)

    def log(self, record, line):
        if record["kind"] == "train":
            means = distributed.all_mean(self.metric_sums, self.run) / max(1, self.iter_num - self.last_logged)
            record.update(zip(METRICS, means.tolist()))
            line += (f", reward {record['reward']:.3f} (spread {record['reward_std']:.3f}, "
                     f"{record['zero_spread_groups']:.0%} flat), kl {record['kl']:.4f}, "
                     f"{record['answer_tokens']:.0f} tokens/answer, sampling {record['sample_s']:.2f} s")
            self.metric_sums.zero_()
            self.last_logged = self.iter_num
        elif record["kind"] == "eval" and self.dev is not None:
            record.update(self.dev)
            passes = [f"{k[len('dev_pass@1_'):]} {v:.2f}" for k, v in self.dev.items() if k.startswith("dev_pass@1_")]
            line += f", dev greedy reward {self.dev['dev_reward']:.4f}, pass@1 " + ", ".join(passes)
        super().log(record, line)

    def estimate_loss(self):
        self.dev = self.dev_scores() if self.run.master else None
        return super().estimate_loss()  # the SFT answer loss on the val rows: how far it drifts

    def selection(self, losses):
        """best.pt is chosen by what GRPO optimises: the reward, of greedy answers to the dev
        questions (the validation loss measures SFT's objective, which GRPO may raise)."""
        if self.dev is None and self.run.master:  # no dev questions to score: the latest weights
            return "iter", self.iter_num, True, "the latest: no dev questions to score"
        return ("dev_reward", self.dev["dev_reward"] if self.dev else None, True,
                f"the highest mean reward of greedy answers to {self.dev_count} dev questions; ties: the later")

    def dev_scores(self):
        """The mean reward (grpo_reward, without the format term) and the key-fact rate per type of
        greedy answers to the dev questions (held-out, after the 100 scored ones)."""
        qs = held_out_questions(self.c["data_dir"], self.c["grpo_dev_questions"], skip=100)
        self.dev_count = len(qs)
        if not qs:
            return None
        self.raw_model.eval()
        answers = answer_batch(self.raw_model, self.tok, [q for q, _ in qs], constraint=self.constraint,
                               template=self.template, max_new_tokens=self.c["grpo_max_new_tokens"], **GREEDY)
        self.raw_model.train()
        records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ref}],
                    "reference": ref} for q, ref in qs]
        rewards = [score(self.reward_fn, q, a, r) for (q, _), a, r in zip(qs, answers, records)]
        by_type = answer_metrics(answers, qs)["by_type"]
        keys = {f"dev_pass@1_{t}": v["key_fact_rate"] for t, v in by_type.items() if "key_fact_rate" in v}
        return dict(keys, dev_reward=sum(rewards) / len(rewards))

    def train(self):
        self.metric_sums = torch.zeros(len(METRICS), device=self.run.device)
        self.last_logged, self.dev = self.iter_num, None
        super().train()

