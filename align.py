"""
The third stage: preference alignment with DPO (Rafailov et al. 2023), run by train.py with
stage='dpo' on pairs from data/prepare_pairs.py, starting from an SFT checkpoint.

For each pair the policy's and the frozen reference's log-probabilities of the chosen and the
rejected answer are summed over the answer tokens (and the end token), as trl and minimind do;
with h = (logp_c - ref_c) - (logp_r - ref_r):

  sigmoid  -log sigmoid(beta h)                 (DPO)
  hinge    relu(1 - beta h)                     (SLiC)
  ipo      (h' - 1 / (2 beta))^2                (IPO; h' from per-token means: trl's form)

plus rpo_alpha times the chosen answer's mean token NLL (trl's rpo_alpha). The reference is a
frozen copy of the starting model; under an adapter (finetune='lora' or 'ptuning') it is the
same model with its adapter switched off, as trl does with a peft model: no second copy.
log.jsonl gets trl's metric names: rewards/chosen, rewards/rejected (beta x the log-ratios),
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected.
"""
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import distributed
from adapters import LoRALinear, file_sha256
from checkpoint import load_checkpoint, model_from_checkpoint
from data_utils import SFTData, UserError, read_jsonl, require_file, to_device

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
STAGES = ("auto", "dpo", "grpo")
DEFAULTS = dict(
    # 'auto': pretraining or SFT, by the data folder; 'dpo': preference pairs (here); 'grpo': rewards (grpo.py)
    stage="auto",
    beta=0.1, dpo_loss="sigmoid", rpo_alpha=0.0,  # DPO: the KL strength, the loss (LOSS_TYPES), an SFT term
    grpo_prompts=8, grpo_group=8,  # GRPO: questions per iteration (all processes), answers sampled per question
    grpo_max_new_tokens=48, grpo_temperature=1.0,  # the length cap of an answer; sampling temperature
    grpo_reward="rewards:qa_reward", grpo_format_reward=0.1,  # module:function; + this if it ended properly
    grpo_kl=0.0, grpo_clip=0.2, grpo_iterations=1,  # k3 KL weight (trl's default 0), clip eps, updates per batch
    grpo_scale_rewards=True,  # advantages (r - mean) / (std + 1e-4) as trl; False: r - mean (nanochat)
    grpo_dev_questions=64,  # greedy pass@1 (key facts) on this many dev questions at each evaluation
    grpo_question_types="all",  # or some of 作者, 下一句, 背诵, dialogue (evaluations.question_type): '作者+下一句'
)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


class PairData(SFTData):
    """pairs_{split}.bin / _mask.bin: rows 2k (chosen) and 2k+1 (rejected) of pair k. A batch of
    n pairs is 2n rows: the n chosen rows, then the n rejected rows (trl's order)."""

    def __init__(self, data_dir, block_size, tok):
        self.data_dir = Path(data_dir)
        require_file(self.data_dir / "meta.json", "run data/prepare_pairs.py first")
        meta = json.loads((self.data_dir / "meta.json").read_text())
        if meta.get("vocab") != tok.name:
            raise UserError(f"{self.data_dir}: pairs tokenized for the vocabulary {meta.get('vocab')} but the model "
                            f"uses {tok.name}: re-run data/prepare_pairs.py --vocab <the model's checkpoint>")
        if meta["block_size"] > block_size + 1:
            raise UserError(f"pair rows in {data_dir} are {meta['block_size']} tokens but the model takes {block_size}: "
                            f"re-run data/prepare_pairs.py --block_size={block_size + 1} or less")
        self.meta, self.row_len, self.packed, self.chars = meta, meta["block_size"], False, meta.get("chars")
        for split in ("train", "val"):
            require_file(self.data_dir / f"pairs_{split}.bin", "run data/prepare_pairs.py first")

    def _arrays(self, split):
        def open_(suffix, dtype):
            return np.memmap(self.data_dir / f"pairs_{split}{suffix}.bin", dtype=dtype, mode="r").reshape(-1, self.row_len)
        return open_("", np.uint16), open_("_mask", np.uint8), None

    def num_rows(self, split):  # pairs
        return len(self._arrays(split)[0]) // 2

    def load(self, split, pairs, device):
        ids, mask, _ = self._arrays(split)
        rows = np.concatenate([2 * pairs.numpy(), 2 * pairs.numpy() + 1])
        ids, mask = (torch.from_numpy(a[rows].astype(np.int64)) for a in (ids, mask))
        return to_device(dict(x=ids[:, :-1], y=ids[:, 1:], loss_mask=mask[:, 1:]), device)


def sequence_logps(model, batch):
    """(summed log-probability of each row's trained tokens, their count), each (rows,)."""
    logp, _ = token_logps(model, batch)
    mask = batch["loss_mask"]
    sums = torch.zeros(len(mask), dtype=logp.dtype, device=logp.device).index_add(0, mask.bool().nonzero()[:, 0], logp)
    return sums, mask.sum(1).to(logp.dtype)


def token_logps(model, batch):
    """(log-probability, entropy) of each trained token, flat, in row-major order of the mask.
    Only the trained positions are projected onto the vocabulary (model.py's SFT path: answers
    are a fraction of a row), unless the model is compiled (then all are, and the mask selects)."""
    mask, y = batch["loss_mask"], batch["y"]
    inner = getattr(model, "module", model)  # (under DDP)
    chunk_rows, inner.loss_chunk_rows = inner.loss_chunk_rows, 0  # the logits, not a fused loss
    try:
        logits, _ = model(batch["x"], y, mask)
    finally:
        inner.loss_chunk_rows = chunk_rows
    keep = mask.bool()
    logits = logits[keep] if logits.dim() == 3 else logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    logp = logprobs.gather(-1, y[keep].unsqueeze(-1)).squeeze(-1)
    return logp, -(logprobs.exp() * logprobs).sum(-1).detach()


def dpo_loss(logps, ref_logps, counts, beta, loss_type="sigmoid", rpo_alpha=0.0):
    """(mean loss, metrics) of a batch whose first half is chosen rows, second half rejected."""
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    n_chosen, n_rejected = counts.chunk(2)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":  # per-token means (trl's normalisation, confirmed with IPO's authors)
        h = chosen_ratio / n_chosen.clamp(min=1) - rejected_ratio / n_rejected.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise UserError(f"dpo_loss must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    loss = losses.mean()
    if rpo_alpha:
        loss = loss + rpo_alpha * (-chosen.sum() / n_chosen.sum())
    r_chosen, r_rejected = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    metrics = torch.stack([r_chosen.mean(), r_rejected.mean(), (r_chosen > r_rejected).float().mean(),
                           (r_chosen - r_rejected).mean(), chosen.detach().mean(), rejected.detach().mean()])
    return loss, metrics


@contextmanager
def adapter_off(model):
    """The base model: every LoRA update and a P-Tuning prefix switched off for the block."""
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    prefix = getattr(model, "prefix", None)
    saved = [(m.scaling, m) for m in loras]
    for m in loras:
        m.scaling = 0.0
    model.prefix = None
    try:
        yield model
    finally:
        for scaling, m in saved:
            m.scaling = scaling
        model.prefix = prefix


def trainer_class(base, stage):
    """train.Trainer, or train.Trainer with the mixin that runs an alignment stage."""
    if stage == "grpo":
        import grpo  # (its rewards import the evaluation metrics: only when asked for)
        return type("GRPOTrainer", (grpo.GRPOMixin, base), {})
    return type("DPOTrainer", (DPOMixin, base), {}) if stage == "dpo" else base


def train_questions(sft_data):
    """(question, reference, record) of the single-turn records of an SFT folder's *train* split,
    none whose question text is also a held-out one (those stay untouched by alignment)."""
    path, val = Path(sft_data) / "sft_train.jsonl", Path(sft_data) / "sft_val.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not found (the SFT folder whose train split gives the questions)")
    held_out = {c["messages"][0]["content"] for _, c in read_jsonl(val)[0]} if val.is_file() else set()
    return [(c["messages"][0]["content"], c["messages"][1]["content"], dict(c, reference=c["messages"][1]["content"],
                                                                             source=f"{path}:{n}"))
            for n, c in read_jsonl(path)[0] if len(c.get("messages", [])) == 2 and c["messages"][0]["role"] == "user"
            and c["messages"][0]["content"] not in held_out]


def check_stage(c):
    """One-line errors for a stage key that does not fit the rest of the config."""
    if c["stage"] not in STAGES:
        raise UserError(f"stage must be one of {', '.join(STAGES)}, got {c['stage']!r}")
    if c["stage"] == "grpo":
        if c["init_from"] == "scratch":
            raise UserError("stage='grpo' improves a trained model: set init_from to an SFT checkpoint "
                            "(init_from='scratch' samples nothing worth rewarding)")
        if isinstance(c["grpo_group"], bool) or not isinstance(c["grpo_group"], int) or c["grpo_group"] < 2:
            raise UserError(f"grpo_group must be at least 2 (an answer is judged against its group), "
                            f"got {c['grpo_group']!r}")
    if c["stage"] == "auto":
        return
    if c["init_from"] == "scratch":
        raise UserError("stage='dpo' aligns a trained model: set init_from to an SFT checkpoint "
                        "(init_from='scratch' has nothing to align)")
    if isinstance(c["beta"], bool) or not isinstance(c["beta"], (int, float)) or not c["beta"] > 0:
        raise UserError(f"beta must be a positive number, got {c['beta']!r}")
    if c["dpo_loss"] not in LOSS_TYPES:
        raise UserError(f"dpo_loss must be one of {', '.join(LOSS_TYPES)}, got {c['dpo_loss']!r}")
    if c["parallel"] == "fsdp":
        raise UserError(f"stage={c['stage']!r} runs in one process or under DDP; parallel='fsdp' is not supported "
                        f"for it yet")


def check_kind(c, kind, ckpt):
    """The data folder's kind (and a resumed checkpoint's) must be the stage's."""
    if c["stage"] == "dpo" and kind != "dpo":
        raise UserError(f"{c['data_dir']}: no preference pairs (pairs_train.bin): make them with data/prepare_pairs.py")
    if c["stage"] == "grpo" and kind != "sft":
        raise UserError(f"{c['data_dir']}: stage='grpo' takes its questions from an SFT folder (sft_train.jsonl, "
                        f"data/prepare_sft.py)")
    if c["stage"] != "dpo" and kind == "dpo":
        raise UserError(f"{c['data_dir']} holds preference pairs: train on them with --stage=dpo")
    was = {"dpo": "dpo", "grpo": "grpo"}.get(ckpt.get("kind"), "auto")
    if c["init_from"] == "resume" and was != c["stage"]:
        raise UserError(f"{c['out_dir']}: a {ckpt.get('kind')} run; resume it with stage={was!r}, "
                        f"not stage={c['stage']!r}")


class ReferenceMixin:
    """For train.Trainer: the frozen reference model of the alignment stages (DPO, GRPO)."""

    def build_model(self):
        resumed = self.c["init_from"] == "resume"
        super().build_model()  # (checks the data fits the stage: check_kind)
        if self.adapter:
            self.reference, self.reference_info = None, None
            return
        # the reference is the run's starting model: on resume, that checkpoint again
        path = Path(self.ckpt["reference"]["path"]) if resumed else Path(self.c["init_from"])
        ref_ckpt = load_checkpoint(path)
        self.reference = model_from_checkpoint(ref_ckpt).to(self.run.device).eval().requires_grad_(False)
        self.reference_info = {"path": str(path), "sha256": file_sha256(path)}
        if resumed and self.reference_info["sha256"] != self.ckpt["reference"]["sha256"]:
            raise UserError(f"{path}: the reference model changed since the run started (its sha256 differs)")

    def metadata(self, state):
        return dict(super().metadata(state), reference=self.reference_info)

    @torch.no_grad()
    def reference_logps(self, batch, per_token=False):
        """The reference's log-probabilities of the batch's trained tokens: summed per row, or
        each token's (token_logps). Under an adapter: the model with it switched off."""
        with adapter_off(self.raw_model) if self.reference is None else nullcontext():
            model = self.raw_model if self.reference is None else self.reference
            return token_logps(model, batch)[0] if per_token else sequence_logps(model, batch)[0]


class DPOMixin(ReferenceMixin):
    """For train.Trainer: DPO's data, step and evaluation (here, to keep train.py about
    pretraining and SFT)."""

    def build_model(self):
        super().build_model()
        self.block = 2 * (self.data.row_len - 1)  # the chosen and the rejected row of a pair

    def logps(self, model, batch):
        """The policy's (with grad) and the reference's (none) summed log-probabilities."""
        logps, counts = sequence_logps(model, batch)
        return logps, self.reference_logps(batch), counts

    def loss(self, model, batch):
        c = self.c
        return dpo_loss(*self.logps(model, batch), c["beta"], c["dpo_loss"], c["rpo_alpha"])

    def step_loss(self, model, batch):
        """A micro-step's DPO loss (train.Trainer.train_step runs the rest); its metrics are summed."""
        loss, metrics = self.loss(model, batch)
        self.metric_sums += metrics / self.run.local_accum
        return loss

    def log(self, record, line):
        """Each train and eval record gains DPO's metrics (trl's names)."""
        if record["kind"] == "train":
            means = distributed.all_mean(self.metric_sums, self.run) / self.iters_logged()
            record.update(zip(METRICS, means.tolist()), grad_norm=float(getattr(self, "grad_norm", 0.0)))
            line += f", reward acc {record['rewards/accuracies']:.2f}, margin {record['rewards/margins']:.3f}"
            self.metric_sums.zero_()
        elif record["kind"] == "eval" and self.val_metrics is not None:
            record.update({f"val_{k}": v for k, v in zip(METRICS, self.val_metrics.tolist())})
            line += f", val reward acc {self.val_metrics[2]:.2f}, margin {self.val_metrics[3]:.3f}"
        super().log(record, line)

    def iters_logged(self):
        return max(1, self.iter_num - self.last_logged)

    @torch.no_grad()
    def estimate_loss(self):
        """DPO loss over eval_iters batches of pairs per split, and the val pairs' metrics."""
        c, run = self.c, self.run
        self.model.eval()
        out = {}
        for split in ("train", "val"):
            n = min(c["eval_iters"] * c["batch_size"], self.data.num_rows(split))
            pairs = torch.arange(self.data.num_rows(split))[:n]
            total = torch.zeros(2 + len(METRICS), device=run.device)
            for chunk in pairs.split(c["batch_size"])[run.rank::run.world]:
                with run.amp:
                    loss, metrics = self.loss(self.raw_model, self.data.load(split, chunk, run.device))
                total += torch.cat([torch.stack([loss.float() * len(chunk), loss.new_tensor(float(len(chunk)))]),
                                    metrics * len(chunk)])
            if run.dist:
                torch.distributed.all_reduce(total)
            out[split] = (total[0] / total[1]).item()
            self.val_metrics = total[2:] / total[1]
        self.model.train()
        return out

    def train(self):
        self.metric_sums = torch.zeros(len(METRICS), device=self.run.device)
        self.val_metrics, self.last_logged = None, self.iter_num
        super().train()

    def log_steps(self, lr, iters, dt):
        super().log_steps(lr, iters, dt)
        self.last_logged = self.iter_num

