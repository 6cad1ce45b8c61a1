"""Iteration-matched variants of the demo's pretraining (3x128, BPE 8192, batch 8x256, Muon .01
+ AdamW 2e-3, 1,400 iterations), full-val bits/char. A standalone loop over model.py in fp32,
so that many variants run side by side (the tables in benchmarks/README.md came from an H100,
six processes at a time, and the 2-core CPU):

  python benchmarks/sweep_pretrain.py --name rope_drop --rope 1 --dropout 0.05 --mwd 0.1 --device cpu
  python benchmarks/sweep_pretrain.py --name relu2 --rope 1 --dropout 0.05 --mwd 0.1 --act relu2 --iters 1500
  python data/prepare.py fortunes-zh --bpe_vocab_size 4096 8192   # then --vocab 4096
  python benchmarks/sweep_pretrain.py --name split --rope 1 --dropout 0.05 --mwd 0.1 --iters 1500 \\
      --device cpu --threads 1 --split 0.3
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import GPT, GPTConfig  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--name", default="base")
p.add_argument("--iters", type=int, default=1400)
p.add_argument("--lr", type=float, default=2e-3)
p.add_argument("--mlr", type=float, default=0.01)
p.add_argument("--L", type=int, default=3)
p.add_argument("--d", type=int, default=128)
p.add_argument("--H", type=int, default=2)
p.add_argument("--bs", type=int, default=8)
p.add_argument("--T", type=int, default=256)
p.add_argument("--dropout", type=float, default=0.0)
p.add_argument("--rope", type=int, default=0)
p.add_argument("--docmask", type=int, default=0)
p.add_argument("--wd", type=float, default=0.1)
p.add_argument("--mwd", type=float, default=0.0)
p.add_argument("--minfrac", type=float, default=0.1)
p.add_argument("--sched", default="cos")
p.add_argument("--ema", type=float, default=0.0)
p.add_argument("--data", default="data/fortunes-zh")
p.add_argument("--train", help="train token file (default <data>/train.bpe-8192.bin)")
p.add_argument("--seed", type=int, default=1337)
p.add_argument("--vocab", type=int, default=8192)
p.add_argument("--act", default="gelu", choices=["gelu", "relu2"])
p.add_argument("--untied", type=int, default=0)
p.add_argument("--embdrop", type=float, default=0.0)
p.add_argument("--clip", type=float, default=1.0)
p.add_argument("--drop_from", type=float, default=0.0)
p.add_argument("--split", type=float, default=0.0)
p.add_argument("--split_until", type=float, default=1.0)
p.add_argument("--device", default="cuda")
p.add_argument("--threads", type=int, default=0)
a = p.parse_args()
dev = a.device
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(a.seed)
if a.threads:
    torch.set_num_threads(a.threads)
T, V = a.T, a.vocab
EOT = V - 3  # <|endoftext|> is the first special token after the ranks
d = a.data
train = np.fromfile(a.train or f"{d}/train.bpe-{V}.bin", dtype=np.uint16).astype(np.int64)
val = np.fromfile(f"{d}/val.bpe-{V}.bin", dtype=np.uint16).astype(np.int64)
meta = json.loads(Path(d, "meta.json").read_text())
val_chars = meta["val_chars"]
assert meta["vocabularies"][f"bpe-{V}"]["val_tokens"] == len(val)
if a.act == "relu2":  # ReLU squared (modded-nanogpt) in place of GELU
    import types

    import model as model_module

    model_module.F = types.SimpleNamespace(**vars(torch.nn.functional))
    model_module.F.gelu = lambda t: torch.relu(t).square()


m = GPT(
    GPTConfig(block_size=T, vocab_size=V, n_layer=a.L, n_head=a.H, n_embd=a.d, dropout=a.dropout, rope=bool(a.rope))
).to(dev)
if a.untied:  # a separate input embedding (the output layer keeps the tied init's weights)
    m.transformer.wte.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())
if a.embdrop:  # embedding dropout (AWD-LSTM): whole token types dropped from the input per batch
    wte, wte_forward = m.transformer.wte, m.transformer.wte.forward

    def dropped(idx):
        e = wte_forward(idx)
        if not m.training:
            return e
        keep = (torch.rand(V, device=idx.device) >= a.embdrop).to(e.dtype) / (1 - a.embdrop)
        return e * keep[idx][..., None]

    wte.forward = dropped
m.loss_chunk_rows = 512 if dev == "cpu" else 0  # as train.py's auto
hidden = [q for n, q in m.named_parameters() if q.requires_grad and q.dim() == 2 and n.startswith("transformer.h.")]
rest = [q for n, q in m.named_parameters() if q.requires_grad and not (q.dim() == 2 and n.startswith("transformer.h."))]
opts = [
    torch.optim.Muon(hidden, lr=a.mlr, weight_decay=a.mwd, adjust_lr_fn="original"),
    torch.optim.AdamW(
        [
            {"params": [q for q in rest if q.dim() >= 2], "weight_decay": a.wd},
            {"params": [q for q in rest if q.dim() < 2], "weight_decay": 0.0},
        ],
        lr=a.lr,
        betas=(0.9, 0.99),
    ),
]
for o in opts:
    for g in o.param_groups:
        g["base"] = g["lr"]
ema = [q.detach().clone() for q in m.parameters()] if a.ema else None
gen = torch.Generator().manual_seed(a.seed)


def segs(x):  # a document's <|endoftext|> ends its segment; the next document starts at 0
    e = (x == EOT).long()
    return torch.cumsum(e, 1) - e


if a.split:  # each token of a training window split into its BPE merge's two parts with probability p, recursively
    from miniglm.tokenizer import merge_parts, tokenizer_from_state

    tok = tokenizer_from_state(json.loads(Path(d, f"bpe-{V}.json").read_text()))
    ranks = {t: i for i, t in enumerate(tok.token_bytes[: tok.eot])}
    left, right = np.full(V, -1), np.full(V, -1)
    for t, (x, y) in merge_parts(ranks).items():
        try:  # split only between whole characters
            x.decode("utf-8"), y.decode("utf-8")
            left[ranks[t]], right[ranks[t]] = ranks[x], ranks[y]
        except UnicodeDecodeError:
            pass
    nprng = np.random.default_rng(a.seed)


def split(w, p):  # a token kept whole is final; the two parts of a split one may split again
    open_ = np.ones(len(w), bool)
    while True:
        cut = open_ & (left[w] >= 0) & (nprng.random(len(w)) < p)
        if not cut.any():
            return w
        w = np.repeat(w, 1 + cut)
        open_ = np.repeat(cut, 1 + cut)
        first = np.flatnonzero(open_)[::2]
        w[first] = left[w[first]]
        w[first + 1] = right[w[first + 1]]


def batch(it=0):
    ix = torch.randint(len(train) - T - 1, (a.bs,), generator=gen)
    if a.split and it < a.split_until * a.iters:
        ws = torch.stack([torch.from_numpy(split(train[i : i + T + 1], a.split)[: T + 1]) for i in ix]).to(dev)
        return ws[:, :-1], ws[:, 1:]
    x = torch.stack([torch.from_numpy(train[i : i + T]) for i in ix]).to(dev)
    y = torch.stack([torch.from_numpy(train[i + 1 : i + 1 + T]) for i in ix]).to(dev)
    return x, y


@torch.no_grad()
def evalbpc():
    m.eval()
    tot = 0.0
    v = torch.from_numpy(val).to(dev)
    n = (len(v) - 1) // T
    xs = v[: n * T].view(n, T)
    ys = v[1 : n * T + 1].view(n, T)
    for s in range(0, n, 32):
        x, y = xs[s : s + 32], ys[s : s + 32]
        _, loss = m(x, y, segment_ids=segs(x) if a.docmask else None)
        tot += loss.item() * y.numel()
    r = len(v) - 1 - n * T
    if r:
        x = v[n * T : n * T + r][None]
        y = v[n * T + 1 :][None]
        _, loss = m(x, y, segment_ids=segs(x) if a.docmask else None)
        tot += loss.item() * y.numel()
    m.train()
    return tot / val_chars / math.log(2)


t0 = time.time()
w = 30
gnorms = []
for it in range(a.iters):
    if it < w:
        r = (it + 1) / (w + 1)
    elif a.sched == "cos":
        r = a.minfrac + (1 - a.minfrac) * 0.5 * (1 + math.cos(math.pi * (it - w) / (a.iters - w)))
    elif a.sched == "wsd":  # constant, then linear to minfrac over the last 30%
        f = max(0.0, (it - 0.7 * a.iters) / (0.3 * a.iters))
        r = 1 - (1 - a.minfrac) * f
    else:  # linear decay
        r = 1 - (1 - a.minfrac) * (it - w) / (a.iters - w)
    for o in opts:
        for g in o.param_groups:
            g["lr"] = g["base"] * r
    for mod in m.modules():  # dropout on from iteration drop_from x iters ("late dropout")
        if isinstance(mod, torch.nn.Dropout):
            mod.p = a.dropout if it >= a.drop_from * a.iters else 0.0
    x, y = batch(it)
    _, loss = m(x, y, segment_ids=segs(x) if a.docmask else None)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(m.parameters(), a.clip if a.clip > 0 else float("inf"))
    gnorms.append(gn.item())
    for o in opts:
        o.step()
        o.zero_grad(set_to_none=True)
    if ema is not None:
        with torch.no_grad():
            for e_, q in zip(ema, m.parameters()):
                e_.lerp_(q, 1 - a.ema)
    if (it + 1) % 350 == 0:
        print(
            a.name,
            it + 1,
            f"loss {loss.item():.3f} grad norm {np.mean(gnorms[-350:]):.2f} "
            f"(over 1: {np.mean(np.array(gnorms[-350:]) > 1):.0%}) val bpc {evalbpc():.4f} t {time.time() - t0:.0f}s",
            flush=True,
        )
final = evalbpc()
if ema is not None:
    with torch.no_grad():
        for e_, q in zip(ema, m.parameters()):
            q.copy_(e_)
    print(a.name, "ema", f"{evalbpc():.4f}")
print(f"RESULT {a.name} bpc {final:.4f} time {time.time() - t0:.0f}s", flush=True)
