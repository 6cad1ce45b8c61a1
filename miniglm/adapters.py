"""
Parameter-efficient fine-tuning of model.py's GPT: the base weights stay frozen and a few
new parameters learn the task. Two methods, as in ChatGLM3's fine-tuning demo, written
so that peft loads what they train (export_hf.py):

LoRA (Hu et al., 2021): each targeted linear layer W gets a rank-r update,
    y = W x + b + (alpha / r) · B A dropout(x),   A: (r, in), B: (out, r), B = 0 at the start,
so before the first step the model is the base model exactly; A and B train. For the demo's
model at r = 8 that is ~3% of the parameters, and a merged adapter (W + (alpha/r) B A) costs
nothing at inference.

P-Tuning v2 (Liu et al., 2021; prefix tuning, Li & Liang, 2021): every attention layer gets
N learned keys and values in front of the text's, which every position attends to (each
segment of a packed row too). The text's positions start at N, as in peft: prefix plus text
must fit in block_size. With prefix_projection the N x (layers x 2 x width) table is made by
an MLP from N small embeddings (trains more stably; at export the table is what is saved).

A checkpoint of an adapter run holds only the adapter's weights, with the path and sha256 of
the base checkpoint it was trained on (miniglm/checkpoint.py loads the base first, then the adapter).
"""
import hashlib
import math

import torch
import torch.nn as nn

from data_utils import UserError

METHODS = ("full", "lora", "ptuning")
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # every linear layer of a block
# each method's config keys (train.py): valid only when finetune names that method
ADAPTER_CONFIG = {
    "full": {},
    "lora": dict(
        lora_r=8,  # the rank of the update B @ A
        lora_alpha=16.0,  # the update is scaled by alpha / r
        lora_dropout=0.05,  # dropout on the update's input
        lora_targets="all",  # 'all' or some of LORA_TARGETS (a list, or comma-separated)
    ),
    "ptuning": dict(
        num_virtual_tokens=16,  # P-Tuning v2: the prefix's keys and values per layer
        prefix_projection=False,  # make the prefix with an MLP (as peft's prefix_projection)
        encoder_hidden_size=512,  # that MLP's width
    ),
}


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus its trained rank-r update. The weight and bias are the base
    layer's own parameters, under the same state-dict names; lora_A and lora_B are new."""

    def __init__(self, base, r, alpha, dropout):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft (and nn.Linear) initialise it
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x):  # the order of peft's: dropout, A, B, then the scale
        return super().forward(x) + (self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged(self):
        """A plain nn.Linear computing the same: W + (alpha / r) B A."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.scaling * (self.lora_B @ self.lora_A))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


class Prefix(nn.Module):
    """P-Tuning v2's per-layer keys and values. The table has one row per virtual token:
    layer 0's key (all heads), layer 0's value, layer 1's key, ... : the layout of peft's
    PrefixEncoder, so export_hf.py saves it as it is."""

    def __init__(self, config, num_virtual_tokens, projection=False, hidden_size=512):
        super().__init__()
        self.n, self.n_layer, self.n_head = num_virtual_tokens, config.n_layer, config.n_head
        width = config.n_layer * 2 * config.n_embd
        self.embedding = nn.Embedding(num_virtual_tokens, config.n_embd if projection else width)
        self.transform = nn.Sequential(nn.Linear(config.n_embd, hidden_size), nn.Tanh(),
                                       nn.Linear(hidden_size, width)) if projection else None

    def table(self):
        """(num_virtual_tokens, layers x 2 x width): what peft calls the prompt embeddings."""
        w = self.embedding.weight
        return self.transform(w) if self.transform is not None else w

    def forward(self):
        """[(keys, values)] per layer, each (heads, num_virtual_tokens, head_dim)."""
        t = self.table().view(self.n, 2 * self.n_layer, self.n_head, -1).permute(1, 2, 0, 3)
        return [(t[2 * i], t[2 * i + 1]) for i in range(self.n_layer)]


def adapter_settings(c):
    """The adapter a training config asks for (None for full fine-tuning), checked: a
    one-line error names what is wrong."""
    method = c["finetune"]
    if method not in METHODS:
        raise UserError(f"finetune must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "full":
        return None
    if c["init_from"] == "scratch":
        raise UserError(f"finetune={method!r} adapts a trained model: set init_from to its checkpoint "
                        f"(init_from='scratch' leaves nothing to adapt)")
    if method == "lora":
        targets = c["lora_targets"]
        targets = list(LORA_TARGETS) if targets == "all" else [t.strip() for t in (
            targets.split(",") if isinstance(targets, str) else targets)]
        if (
            not isinstance(c["lora_r"], int)
            or c["lora_r"] <= 0
            or c["lora_alpha"] <= 0
            or not 0 <= c["lora_dropout"] < 1
        ):
            raise UserError(
                f"LoRA needs lora_r > 0 (a whole number), lora_alpha > 0 and 0 <= lora_dropout < 1; got "
                f"lora_r={c['lora_r']!r}, lora_alpha={c['lora_alpha']!r}, lora_dropout={c['lora_dropout']!r}"
            )
        return dict(
            method="lora",
            r=c["lora_r"],
            alpha=float(c["lora_alpha"]),
            dropout=float(c["lora_dropout"]),
            targets=targets,
        )
    if not isinstance(c["num_virtual_tokens"], int) or c["num_virtual_tokens"] <= 0:
        raise UserError(f"P-Tuning v2 needs num_virtual_tokens > 0 (a whole number), got {c['num_virtual_tokens']!r}")
    return dict(
        method="ptuning",
        num_virtual_tokens=c["num_virtual_tokens"],
        prefix_projection=bool(c["prefix_projection"]),
        encoder_hidden_size=int(c["encoder_hidden_size"]),
    )


def add_adapter(model, settings):
    """Freeze the model and give it the adapter of `settings` (adapter_settings); the new
    parameters alone require grad. Returns the model."""
    for p in model.parameters():
        p.requires_grad_(False)
    if settings["method"] == "ptuning":
        model.prefix = Prefix(
            model.config, settings["num_virtual_tokens"], settings["prefix_projection"], settings["encoder_hidden_size"]
        ).to(model.lm_head.weight.device)
        return model
    linear = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".h." in f".{name}"}
    for target in settings["targets"]:
        if not any(name.endswith("." + target) for name in linear):
            raise UserError(f"lora_targets: {target!r} matches no layer; valid: {', '.join(LORA_TARGETS)} (or 'all')")
    for name, layer in linear.items():
        if any(name.endswith("." + t) for t in settings["targets"]):
            parent, attr = name.rsplit(".", 1)
            setattr(
                model.get_submodule(parent),
                attr,
                LoRALinear(layer, settings["r"], settings["alpha"], settings["dropout"]),
            )
    return model


def adapter_state(model, weights):
    """The adapter's weights out of the whole model's state dict `weights`: every parameter
    that trains (the base is frozen)."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: w for n, w in weights.items() if n in trained}


def load_adapter_state(model, state, where):
    """Put an adapter checkpoint's weights into a model that add_adapter has prepared."""
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        raise UserError(
            f"{where}: its adapter weights ({len(state)}) do not fit the adapter its settings make "
            f"({len(expected)}): missing {sorted(expected - set(state))[:3]}, extra "
            f"{sorted(set(state) - expected)[:3]}"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def merge_lora(model):
    """Fold every LoRA update into its layer (W + (alpha/r) B A): a plain model again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), attr, module.merged())
    return model


def trained_fraction(model):
    """(parameters that train, all parameters), each counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
