"""
The optimizers train.py steps: AdamW, or Muon for the blocks' matrices plus AdamW for the
rest, and the learning-rate schedule they share.

Muon orthogonalises each update with a Newton-Schulz iteration: 15 small matmuls per
matrix per step. torch.optim.Muon runs them in bfloat16, which is right on a GPU and on
CPUs with native bf16 (AVX-512 BF16, AMX), but on an AVX2-only CPU (most laptops, many
cloud cores) every bf16 matmul is emulated, ~50x slower than fp32: the demo's optimizer
step then cost 3-8x its forward and backward (benchmarks/README.md). So Muon here runs the
iteration in float32 on the CPU (pick_ns_dtype: a rule, recorded in the checkpoint).
"""
import math

import torch

from data_utils import UserError

NEWTON_SCHULZ = dict(coefficients=(3.4445, -4.7750, 2.0315), steps=5, eps=1e-7)  # torch.optim.Muon's defaults


def get_lr(it, c):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    decay_iters = c["lr_decay_iters"] or c["max_iters"]
    if not c["decay_lr"]:
        return c["learning_rate"]
    if it < c["warmup_iters"]:
        return c["learning_rate"] * (it + 1) / (c["warmup_iters"] + 1)
    if it >= decay_iters:
        return c["min_lr"]
    ratio = (it - c["warmup_iters"]) / max(1, decay_iters - c["warmup_iters"])
    return c["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c["learning_rate"] - c["min_lr"])


def orthogonalize(g, dtype, coefficients, steps, eps):
    """torch.optim.Muon's quintic Newton-Schulz iteration (same coefficients, same order of
    operations), run in `dtype` instead of always in bfloat16."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:  # iterate on the wide side: the Gram matrix is the smaller one
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= 1 (not in place: in fp32, x may be the momentum buffer)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon (its hyperparameters, state and checkpoints) with the Newton-Schulz
    iteration in ns_dtype. ns_dtype is an attribute, not a group setting: train.py records it
    in its checkpoints itself, and a resumed run keeps it (pick_ns_dtype)."""

    def __init__(self, params, ns_dtype=torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "Muon here takes no closure"
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                sharded = hasattr(update, "full_tensor")  # FSDP: Newton-Schulz needs the whole matrix
                update = orthogonalize(update.full_tensor() if sharded else update, self.ns_dtype,
                                       group["ns_coefficients"], group["ns_steps"], group["eps"])
                if sharded:  # every process orthogonalized the same matrix: each keeps its own rows
                    from torch.distributed.tensor import distribute_tensor  # (0.6 s to import: FSDP only)
                    update = distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None)
                rows, cols = p.shape[:2]  # torch's adjust_lr_fn: "original" (Keller Jordan's) or Moonshot's
                scale = 0.2 * math.sqrt(max(rows, cols)) if group["adjust_lr_fn"] == "match_rms_adamw" \
                    else math.sqrt(max(1, rows / cols))
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * scale)


def pick_ns_dtype(setting, device, recorded=None):
    """(dtype, why) for Muon's Newton-Schulz iteration. A resumed run keeps the dtype its
    checkpoint `recorded`, whatever the setting or the machine says now. 'auto': bfloat16 on
    CUDA, float32 everywhere else. A rule, not a stopwatch: the timing probe this replaced
    measured bf16 at x0.60, x0.60 and x0.82 of fp32 on one Zen 4 CPU, on both sides of its
    threshold, so identical commands trained differently and a resume switched mid-run. On a
    CPU bf16 saves little where it is native (x0.85 at the demo's shape with AMX) and costs
    ~x40 where it is emulated (AVX2): fp32 is the more exact and the same every time."""
    if recorded is not None:
        return getattr(torch, recorded), "recorded in the checkpoint: a resumed run keeps its precision"
    if setting in ("float32", "bfloat16"):
        return getattr(torch, setting), "set by muon_ns_dtype"
    if setting != "auto":
        raise UserError(f"muon_ns_dtype must be 'auto', 'float32' or 'bfloat16', got {setting!r}")
    return auto_ns_dtype(device)


def auto_ns_dtype(device):
    if device.startswith("cuda"):
        return torch.bfloat16, "auto: CUDA"
    return torch.float32, f"auto: float32 on {device.split(':')[0]}, exact and the same on every run"


def each_optimizer(optimizer):
    """The torch optimizers of configure_optimizers' result (one, or Muon and AdamW)."""
    return tuple(getattr(optimizer, "optimizers", [optimizer]))


class Optimizers:
    """Several optimizers stepped as one (Muon + AdamW): the parts of torch.optim.Optimizer
    that train.py and torch.amp.GradScaler use."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):  # read each time: load_state_dict replaces the optimizers' group dicts
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):  # train.py checks the kind first, with a one-line error
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)


def muon_matrices(model):
    """The parameters Muon steps: the transformer blocks' trainable matrices."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.startswith("transformer.h.")]


def configure_optimizers(model, weight_decay, learning_rate, betas, device_type, muon_lr=0.0, ns_dtype=torch.bfloat16):
    """AdamW; with muon_lr > 0, Muon (as nanochat and modded-nanogpt use) for the blocks'
    matrices and AdamW for the rest (embeddings, LayerNorm gains, biases), which Muon's
    orthogonalised update does not suit. Only parameters that require grad are stepped
    (adapters train with a frozen base). Each group's `lr_scale` is its learning rate over
    learning_rate: train.py's schedule multiplies it."""
    hidden = muon_matrices(model) if muon_lr > 0 else []
    ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    # decay the matrices (matmuls, embeddings); not the LayerNorm gains or biases
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    # fused: one pass over each parameter, its gradient and both moments (CUDA, and CPU since torch 2.4)
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))
    if not hidden:
        return adamw
    # Muon decays its matrices too (decoupled: lr x weight_decay per step), which helped the demo
    muon = Muon(
        [{"params": hidden, "lr_scale": muon_lr / learning_rate}],
        ns_dtype=ns_dtype,
        lr=muon_lr,
        weight_decay=weight_decay,
        adjust_lr_fn="original",
    )
    return Optimizers([muon, adamw])
