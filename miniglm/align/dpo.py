"""
The third stage: preference alignment with DPO (Rafailov et al. 2023), run by train.py with
stage='dpo' on pairs from data/prepare_pairs.py, starting from an SFT checkpoint.

For each pair the policy's and the frozen reference's log-probabilities of the chosen and the
rejected answer are summed over the answer tokens (and the end token), as trl and minimind do;
with h = (logp_c - ref_c) - (logp_r - ref_r):

  sigmoid  -log sigmoid(beta h)                 (DPO)
  hinge    relu(1 - beta h)                     (SLiC)
  ipo      (h' - 1 / (2 beta))^2                (IPO; h' from per-token means: trl's form)

plus rpo_alpha times the chosen answer's mean token NLL (trl's rpo_alpha). The reference is
reference.py's: a frozen copy of the starting model, or the model with its adapter off.
log.jsonl gets trl's metric names: rewards/chosen, rewards/rejected (beta x the log-ratios),
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected.
"""
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_utils import SFTData, UserError, require_file, to_device
from miniglm import distributed
from miniglm.align.reference import ReferenceTrainer, sequence_logps

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
# trl's names for what log.jsonl records of each batch of pairs
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
            raise UserError(
                f"pair rows in {data_dir} are {meta['block_size']} tokens but the model takes {block_size}: "
                f"re-run data/prepare_pairs.py --block_size={block_size + 1} or less"
            )
        self.meta, self.row_len, self.packed, self.chars = meta, meta["block_size"], False, meta.get("chars")
        for split in ("train", "val"):
            require_file(self.data_dir / f"pairs_{split}.bin", "run data/prepare_pairs.py first")

    def _arrays(self, split):
        def open_(suffix, dtype):
            return np.memmap(self.data_dir / f"pairs_{split}{suffix}.bin", dtype=dtype, mode="r").reshape(
                -1, self.row_len
            )

        return open_("", np.uint16), open_("_mask", np.uint8), None

    def num_rows(self, split):  # pairs
        return len(self._arrays(split)[0]) // 2

    def load(self, split, pairs, device):
        ids, mask, _ = self._arrays(split)
        rows = np.concatenate([2 * pairs.numpy(), 2 * pairs.numpy() + 1])
        ids, mask = (torch.from_numpy(a[rows].astype(np.int64)) for a in (ids, mask))
        return to_device(dict(x=ids[:, :-1], y=ids[:, 1:], loss_mask=mask[:, 1:]), device)


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
    metrics = torch.stack(
        [
            r_chosen.mean(),
            r_rejected.mean(),
            (r_chosen > r_rejected).float().mean(),
            (r_chosen - r_rejected).mean(),
            chosen.detach().mean(),
            rejected.detach().mean(),
        ]
    )
    return loss, metrics


class DPOTrainer(ReferenceTrainer):
    """DPO: the data are preference pairs, the loss dpo_loss against the reference; best.pt is
    chosen by the held-out DPO loss (Trainer.selection's val loss is it here)."""

    stage = "dpo"
    CONFIG = dict(
        beta=0.1,  # the strength of the pull towards the reference (the implicit KL's weight)
        dpo_loss="sigmoid",  # one of LOSS_TYPES
        rpo_alpha=0.0,  # + this x the chosen answer's NLL (trl's rpo_alpha): keeps the chosen likely
    )

    def check_config(self, c):
        super().check_config(c)
        if c["init_from"] == "scratch":
            raise UserError(
                "stage='dpo' aligns a trained model: set init_from to an SFT checkpoint "
                "(init_from='scratch' has nothing to align)"
            )
        if isinstance(c["beta"], bool) or not isinstance(c["beta"], (int, float)) or not c["beta"] > 0:
            raise UserError(f"beta must be a positive number, got {c['beta']!r}")
        if c["dpo_loss"] not in LOSS_TYPES:
            raise UserError(f"dpo_loss must be one of {', '.join(LOSS_TYPES)}, got {c['dpo_loss']!r}")

    def open_data(self, data_dir, block_size, tok):
        if not (Path(data_dir) / "pairs_train.bin").exists():
            raise UserError(f"{data_dir}: no preference pairs (pairs_train.bin): make them with data/prepare_pairs.py")
        return PairData(data_dir, block_size, tok)

    def build_model(self):
        super().build_model()
        self.kind = "dpo"
        self.block = 2 * (self.data.row_len - 1)  # the chosen and the rejected row of a pair

    def logps(self, model, batch):
        """The policy's (with grad) and the reference's (none) summed log-probabilities."""
        logps, counts = sequence_logps(model, batch)
        return logps, self.reference_logps(batch), counts

    def loss(self, model, batch):
        c = self.c
        return dpo_loss(*self.logps(model, batch), c["beta"], c["dpo_loss"], c["rpo_alpha"])

    def step_loss(self, model, batch):
        """A micro-step's DPO loss (Trainer.accumulate_gradients runs the rest); its metrics are summed."""
        loss, metrics = self.loss(model, batch)
        self.metric_sums += metrics / self.run.local_accum
        return loss

    def log_extras(self, record, line):
        """Each train and eval record gains DPO's metrics (trl's names)."""
        if record["kind"] == "train":
            means = distributed.all_mean(self.metric_sums, self.run) / self.iters_since_log
            record.update(zip(METRICS, means.tolist()))
            record["grad_norm"] = float(getattr(self, "grad_norm", 0.0))
            line += f", reward acc {record['rewards/accuracies']:.2f}, margin {record['rewards/margins']:.3f}"
            self.metric_sums.zero_()
        elif record["kind"] == "eval" and self.val_metrics is not None:
            record.update({f"val_{k}": v for k, v in zip(METRICS, self.val_metrics.tolist())})
            line += f", val reward acc {self.val_metrics[2]:.2f}, margin {self.val_metrics[3]:.3f}"
        return line

    @torch.no_grad()
    def estimate_loss(self):
        """DPO loss over eval_iters batches of pairs per split, and the val pairs' metrics."""
        c, run = self.c, self.run
        self.model.eval()
        out = {}
        for split in ("train", "val"):
            n = min(c["eval_iters"] * c["batch_size"], self.data.num_rows(split))
            pairs = torch.arange(self.data.num_rows(split))[:n]
            total = torch.zeros(2 + len(METRICS), device=run.device)  # (summed loss, pairs, summed metrics)
            for chunk in pairs.split(c["batch_size"])[run.rank :: run.world]:
                with run.amp:
                    loss, metrics = self.loss(self.raw_model, self.data.load(split, chunk, run.device))
                weight = float(len(chunk))
                total += torch.cat([torch.stack([loss.float() * weight, loss.new_tensor(weight)]), metrics * weight])
            if run.dist:
                torch.distributed.all_reduce(total)
            out[split] = (total[0] / total[1]).item()
            self.val_metrics = total[2:] / total[1]
        self.model.train()
        return out

    def train(self):
        self.metric_sums = torch.zeros(len(METRICS), device=self.run.device)
        self.val_metrics = None
        super().train()
