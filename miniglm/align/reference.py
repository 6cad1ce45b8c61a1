"""
What the alignment stages share: the frozen reference model they are held close to, and the
log-probabilities of an answer's tokens under a model.

The reference is a frozen copy of the starting model (init_from); under an adapter
(finetune='lora' or 'ptuning') it is the same model with its adapter switched off, as trl does
with a peft model: no second copy.
"""
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from data_utils import UserError, read_jsonl
from miniglm.adapters import LoRALinear, file_sha256
from miniglm.checkpoint import load_checkpoint, model_from_checkpoint
from miniglm.trainer import Trainer


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
    if logits.dim() == 3:  # (B, T, vocab): every position was projected
        logits = logits[keep]  # (trained tokens, vocab)
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (trained tokens, vocab)
    logp = logprobs.gather(-1, y[keep].unsqueeze(-1)).squeeze(-1)  # (trained tokens,)
    entropy = -(logprobs.exp() * logprobs).sum(-1)  # (trained tokens,)
    return logp, entropy.detach()


def sequence_logps(model, batch):
    """(summed log-probability of each row's trained tokens, their count), each (rows,)."""
    logp, _ = token_logps(model, batch)
    mask = batch["loss_mask"]
    row_of_token = mask.bool().nonzero()[:, 0]  # (trained tokens,)
    sums = torch.zeros(len(mask), dtype=logp.dtype, device=logp.device).index_add(0, row_of_token, logp)
    return sums, mask.sum(1).to(logp.dtype)


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


def train_questions(sft_data):
    """(question, reference, record) of the single-turn records of an SFT folder's *train* split,
    none whose question text is also a held-out one (those stay untouched by alignment)."""
    path, val = Path(sft_data) / "sft_train.jsonl", Path(sft_data) / "sft_val.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not found (the SFT folder whose train split gives the questions)")
    held_out = set()
    if val.is_file():
        held_out = {c["messages"][0]["content"] for _, c in read_jsonl(val)[0]}
    questions = []
    for n, c in read_jsonl(path)[0]:
        messages = c.get("messages", [])
        if len(messages) != 2 or messages[0]["role"] != "user" or messages[0]["content"] in held_out:
            continue
        question, reference = messages[0]["content"], messages[1]["content"]
        questions.append((question, reference, dict(c, reference=reference, source=f"{path}:{n}")))
    return questions


class ReferenceTrainer(Trainer):
    """A Trainer with the frozen reference model of the alignment stages (DPO, GRPO)."""

    def check_config(self, c):
        super().check_config(c)
        if c["parallel"] == "fsdp":
            raise UserError(f"stage={self.stage!r} runs in one process or under DDP; parallel='fsdp' is not "
                            f"supported for it yet")

    def build_model(self):
        resumed = self.c["init_from"] == "resume"
        super().build_model()
        if self.adapter:  # the reference is the model with its adapter off (adapter_off)
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
        if self.reference is None:
            switched = adapter_off(self.raw_model)
            model = self.raw_model
        else:
            switched = nullcontext()
            model = self.reference
        with switched:
            if per_token:
                return token_logps(model, batch)[0]
            return sequence_logps(model, batch)[0]
