"""
A decoder-only GPT in the style of nanoGPT: pre-LayerNorm blocks, causal attention through
F.scaled_dot_product_attention, a GELU MLP, tied input/output embeddings and scaled
residual init; positions are learned (GPT-2) or rotary (rope=True: RoPE as GPT-NeoX and
Llama apply it, no position table). forward() takes an optional loss_mask (SFT) and
optional segment ids (packed SFT blocks: attention and positions stay inside each sample);
with loss_chunk_rows set, its loss runs through LinearCrossEntropy (chunked, the full
logits never held).
forward() takes a KVCache for incremental decoding; decode_step is one decode step over a
fixed-shape cache (static_cache), compiled to a CUDA graph per step on a GPU. The decode
loop itself, sampling and the penalties are in miniglm/generation.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

DECODE_MODES = ("eager", "static", "compiled")  # GPT.decode_mode: see GPT.__init__ and miniglm/generation.py


@dataclass
class GPTConfig:
    block_size: int = 512
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.0
    bias: bool = False  # biases in Linear/LayerNorm: slightly slower, no better at this size
    rope: bool = False  # rotary positions instead of a learned table (export_hf writes GPT-NeoX then)


def rotary_cos_sin(pos, head_dim, base=10000.0):
    """RoPE's angles for positions pos, (T,) or (B, T): cos and sin that broadcast over
    (B, heads, T, head_dim / 2). Computed in fp32, as HF's GPT-NeoX does."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angles = pos.float()[..., None] * inv_freq
    if angles.dim() == 3:  # per-row positions (packed or left-padded batches)
        angles = angles[:, None]
    return angles.cos(), angles.sin()


def apply_rotary(t, cos, sin):
    """Rotate each head's two halves (GPT-NeoX's rotate_half convention)."""
    t1, t2 = t.chunk(2, dim=-1)
    cos, sin = cos.to(t.dtype), sin.to(t.dtype)
    return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], dim=-1)


class KVCache:
    """Per-layer keys/values for incremental decoding; `length` tokens are filled. With
    `tensors` (lists of per-layer k and v), it fills those (GPT.static_cache). With
    `lengths` (B,), each row has its own length instead (GPT.decode_ragged)."""

    def __init__(self, config, batch_size, device, dtype, tensors=None):
        shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        if tensors is None:
            tensors = [[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
                       for _ in "kv"]
        self.k, self.v = tensors  # each a list of (B, nh, block_size, hs), one per layer
        self.length = 0
        self.lengths = None

    def update(self, layer, k, v, attn_mask):
        """Write the new keys and values (B, nh, T, hs) of `layer` and return what attention reads:
        (keys, values, mask, is_causal) over the cached tokens and the new ones."""
        if self.lengths is not None:  # one token per row, each row at its own length
            B = k.size(0)
            rows = torch.arange(B, device=k.device)
            S = attn_mask.size(-1)  # the longest row's length after this token
            self.k[layer][rows, :, self.lengths] = k[:, :, 0]
            self.v[layer][rows, :, self.lengths] = v[:, :, 0]
            return self.k[layer][:B, :, :S], self.v[layer][:B, :, :S], attn_mask, False
        T = k.size(2)
        start = self.length
        self.k[layer][:, :, start:start + T] = k
        self.v[layer][:, :, start:start + T] = v
        k = self.k[layer][:, :, :start + T]  # (B, nh, start + T, hs)
        v = self.v[layer][:, :, :start + T]
        if start == 0 or attn_mask is not None:
            return k, v, attn_mask, attn_mask is None
        # the new queries see the cached prefix, plus a causal part of themselves
        if T > 1:
            attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=k.device).tril(start)
        return k, v, attn_mask, False


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        # looking inside the model (miniglm/inside.py) sets keep_probs: the same attention, written out,
        # its probabilities (B, nh, T, S) kept in self.probs; every other path runs SDPA's fused kernel
        self.keep_probs = False
        self.probs = None
        # the fixed-shape cache of GPT.static_cache: buffers, so that a compiled decode step
        # (CUDA graphs) may write them in place; not saved with the weights
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def forward(self, x, attn_mask=None, cache=None, layer=0, slot=None, rope=None, prefix=None):
        B, T, C = x.size()  # batch, time (tokens), channels (n_embd)
        hs = C // self.n_head  # head size
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if rope is not None:  # keys are cached rotated, so a cached prefix needs no recomputing
            q = apply_rotary(q, *rope)
            k = apply_rotary(k, *rope)
        is_causal = attn_mask is None
        if slot is not None:  # GPT.decode_step: one token, written at `slot`; attn_mask says which slots count
            self.k_cache.index_copy_(2, slot, k)
            self.v_cache.index_copy_(2, slot, v)
            k, v, is_causal = self.k_cache, self.v_cache, False  # (B, nh, block_size, hs)
        elif cache is not None:  # the cache writes k and v and gives back all it holds: (B, nh, S, hs)
            k, v, attn_mask, is_causal = cache.update(layer, k, v, attn_mask)
        if prefix is not None:  # P-Tuning v2 (miniglm/adapters.py): learned keys and values, seen by every query
            k, v, attn_mask = prefixed(k, v, attn_mask, T, *prefix)
            is_causal = False
        # no dropout on the attention probabilities: on the CPU it forces SDPA's slow path (+16-30% a
        # step); dropout on the residual branches regularised the demo as well (benchmarks/README.md)
        if self.keep_probs:
            y = self.attention_with_probs(q, k, v, attn_mask, is_causal)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): the heads side by side
        return self.resid_dropout(self.c_proj(y))

    def attention_with_probs(self, q, k, v, attn_mask, is_causal):
        """What F.scaled_dot_product_attention computes, written out, keeping the probabilities."""
        T, S = q.size(-2), k.size(-2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, S)
        if is_causal:  # (only where T == S) query i sees keys 0..i
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        if attn_mask is not None:  # True = attend
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        self.probs = scores.softmax(dim=-1)  # (B, nh, T, S): each query's weights over the keys
        return self.probs @ v  # (B, nh, T, hs)


def prefixed(k, v, attn_mask, T, prefix_k, prefix_v):
    """Keys and values (B, heads, S, head_dim) with the prefix's N in front, and a mask
    (True = attend) that lets each of the T queries see the whole prefix. Without a mask the
    queries are the last T of the S tokens, causal (S > T when a KV cache holds the rest)."""
    B, _, S, _ = k.shape
    k = torch.cat([prefix_k.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
    v = torch.cat([prefix_v.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
    if attn_mask is None:
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=k.device).tril(S - T)
    seen = torch.ones(*attn_mask.shape[:-1], prefix_k.size(1), dtype=torch.bool, device=k.device)
    return k, v, torch.cat([seen, attn_mask], dim=-1)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None, layer=0, slot=None, rope=None, prefix=None):
        x = x + self.attn(self.ln_1(x), attn_mask, cache, layer, slot, rope, prefix)
        return x + self.mlp(self.ln_2(x))


def packed_positions_and_mask(segment_ids):
    """For packed blocks: positions restart at 0 in each segment, and a token attends only
    to earlier tokens of its own segment (block-diagonal causal mask, True = attend)."""
    B, T = segment_ids.shape
    t = torch.arange(T, device=segment_ids.device)
    starts_here = torch.ones_like(segment_ids, dtype=torch.bool)
    starts_here[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    segment_start = torch.where(starts_here, t, 0).cummax(dim=1).values
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return t - segment_start, (same_segment & causal)[:, None]


def left_padded_positions_and_mask(pad, start, T):
    """Row b starts with pad[b] padding tokens: its positions count from its first real
    token, and no query attends to padding. A padding query attends to itself only, so
    its (unused) output stays finite instead of NaN from an empty softmax."""
    t = torch.arange(start, start + T, device=pad.device)
    keys = torch.arange(start + T, device=pad.device)
    pos = (t[None, :] - pad[:, None]).clamp(min=0)
    causal = keys[None, :] <= t[:, None]  # (T, S)
    real_key = keys[None, None, :] >= pad[:, None, None]  # (B, 1, S)
    itself = keys[None, :] == t[:, None]
    return pos, ((causal & real_key) | itself)[:, None]


def masked_cross_entropy(logits, targets, loss_mask=None):
    """Mean cross-entropy; with a 0/1 loss_mask (aligned to targets), the mean over the
    positions where the mask is 1 only."""
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                             reduction="none", ignore_index=-100)
    if loss_mask is None:
        return losses.sum() / (targets != -100).sum().clamp(min=1)
    mask = loss_mask.reshape(-1).to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1)


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x @ weight.T against targets (-100 = ignored) without ever
    holding the (N, vocab) logits: rows go through in chunks, and each chunk's gradient
    (softmax - one-hot) becomes the gradients of x and weight right away, in forward.
    Same three matmuls as the plain path, but the logits are written once and read twice
    instead of going through log_softmax, nll_loss and their backward passes, which on a
    CPU cost a sixth of a 45M-model step (benchmarks/README.md).
    compute_dtype (autocast's bf16/fp16; default x's dtype): the matmuls run in it, the
    softmax, the loss and the weight gradient's sum in fp32. No data-dependent branch, so
    torch.compile traces it whole."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows, compute_dtype=None, with_grads=True):
        compute_dtype = compute_dtype or x.dtype
        low = compute_dtype != torch.float32
        xl, wl = (x.to(compute_dtype), weight.to(compute_dtype)) if low else (x, weight)
        valid = targets != -100
        count = valid.sum().clamp(min=1)
        # forward always runs with grad mode off, and needs_input_grad stays True under the
        # caller's torch.no_grad(): with_grads (the caller's grad mode) spares an evaluation
        # both gradient matmuls (3x the output layer's work otherwise)
        need_gx, need_gw = (with_grads and ctx.needs_input_grad[i] for i in (0, 1))  # frozen weight: no gw
        grads = need_gx or need_gw
        gx = torch.empty_like(x) if need_gx else None
        gw = None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        buf = None if low else torch.empty(min(chunk_rows, x.size(0)), weight.size(0), dtype=x.dtype, device=x.device)
        for s in range(0, x.size(0), chunk_rows):
            xc, tc, vc = xl[s:s + chunk_rows], targets[s:s + chunk_rows].clamp(min=0), valid[s:s + chunk_rows]
            rows = torch.arange(xc.size(0), device=x.device)
            # fp32: one reused buffer, no fresh pages per chunk; low precision: fp32 logits for the softmax
            logits = (xc @ wl.t()).float() if low else torch.mm(xc, wl.t(), out=buf[:xc.size(0)])
            target_logit = logits[rows, tc]
            # softmax in place, in plain passes (torch.logsumexp plus exp allocates and reads more)
            top = logits.amax(dim=-1, keepdim=True)
            total_exp = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)
            lse = (top + total_exp.log()).squeeze(1)
            total += ((lse - target_logit) * vc).sum()
            if grads:  # (softmax - one-hot) on valid rows, 0 on ignored ones; / count in backward
                probs = logits.mul_(vc[:, None] / total_exp)
                probs[rows, tc] -= vc.float()
                p = probs.to(compute_dtype) if low else probs  # fp16: magnitudes <= 1, no underflow from / count
                if need_gx:
                    gx[s:s + chunk_rows] = p @ wl
                if need_gw:
                    if gw is None:
                        gw = (p.t() @ xc).float()
                    elif low:
                        gw += p.t() @ xc  # accumulated in fp32
                    else:
                        gw.addmm_(p.t(), xc)
        ctx.save_for_backward(gx, None if gw is None else gw.to(weight.dtype), count)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        gx, gw, count = ctx.saved_tensors
        scale = grad_loss / count
        return (None if gx is None else gx * scale), (None if gw is None else gw * scale), None, None, None, None


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **({} if config.rope else {"wpe": nn.Embedding(config.block_size, config.n_embd)}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.loss_chunk_rows = 512  # rows per chunk of LinearCrossEntropy; 0 = the plain full-logits loss
        # generation's decode steps: "eager" (a cache that grows, finished rows leave the
        # batch), "static" (decode_step at a fixed shape) or "compiled" (decode_step under
        # torch.compile(mode="reduce-overhead"): one CUDA graph per step on a GPU)
        self.decode_mode = "eager"
        self.prefix = None  # P-Tuning v2's per-layer keys and values (adapters.Prefix), when one is added
        self.apply(self._init_weights)
        # GPT-2 scaled init: each residual branch adds to the stream, so shrink its output
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False):
        """All parameters (the tied embedding counted once); non_embedding drops the
        position embedding too, as nanoGPT's FLOP estimate does."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding and not self.config.rope else n

    @property
    def context_size(self):
        """Tokens of text the model takes at once: block_size, less a P-Tuning prefix's
        positions (the text starts after them, as in peft)."""
        return self.config.block_size - (self.prefix.n if self.prefix is not None else 0)

    def layer_prefixes(self):
        """Each layer's (keys, values) of a P-Tuning prefix, or None per layer without one."""
        return self.prefix() if self.prefix is not None else [None] * len(self.transformer.h)

    def embed(self, idx, pos):
        """Token embeddings plus learned positions, or the tokens alone and RoPE's (cos, sin).
        With a prefix, the text's positions start after its N virtual tokens."""
        if self.prefix is not None:
            pos = pos + self.prefix.n
        if self.config.rope:
            return self.transformer.wte(idx), rotary_cos_sin(pos, self.config.n_embd // self.config.n_head)
        return self.transformer.wte(idx) + self.transformer.wpe(pos), None

    def forward(self, idx, targets=None, loss_mask=None, segment_ids=None, kv_cache=None,
                last_logits_only=False, pad=None):
        B, T = idx.size()
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.context_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}"
                             + (f" less the prefix's {self.prefix.n}" if self.prefix is not None else ""))
        attn_mask = None
        if segment_ids is not None:
            pos, attn_mask = packed_positions_and_mask(segment_ids)
        elif pad is not None:  # a batch of left-padded prompts (batched generation)
            pos, attn_mask = left_padded_positions_and_mask(pad, start, T)
        else:
            pos = torch.arange(start, start + T, device=idx.device)
        x, rope = self.embed(idx, pos)
        x = self.transformer.drop(x)
        for i, (block, prefix) in enumerate(zip(self.transformer.h, self.layer_prefixes())):
            x = block(x, attn_mask, kv_cache, i, rope=rope, prefix=prefix)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.transformer.ln_f(x)
        if last_logits_only:  # generation needs only the next-token distribution
            return self.lm_head(x[:, [-1], :]), None
        if loss_mask is not None and targets is not None and not torch.compiler.is_compiling():
            # SFT: only answer positions count, so project only those onto the vocabulary.
            # Same loss, a fraction of the lm_head + softmax work (most of a small model's
            # cost); the returned logits are then those of the masked positions only.
            # (Under torch.compile the data-dependent shape would recompile: full path there.)
            keep = loss_mask.bool()
            x, targets, loss_mask = x[keep], targets[keep], None
        if targets is not None and self.loss_chunk_rows:
            # the loss without the full logits, which come back None
            if loss_mask is not None:  # (under compile) untrained positions become ignored targets
                targets = targets.masked_fill(loss_mask == 0, -100)
            dev = x.device.type
            low = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
            flat = x.reshape(-1, x.size(-1))
            return None, LinearCrossEntropy.apply(flat, self.lm_head.weight, targets.reshape(-1),
                                                  self.loss_chunk_rows, low, torch.is_grad_enabled())
        logits = self.lm_head(x)
        loss = None if targets is None else masked_cross_entropy(logits, targets, loss_mask)
        return logits, loss

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), PaLM appendix B style."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * c.block_size

    def static_cache(self, batch_size):
        """A KVCache over fixed-shape buffers in every attention layer, made once per batch
        size, dtype and device and then reused, as CUDA graphs need. They belong to the
        model, so it runs one static generation at a time (sample_gradio queues users)."""
        c, w = self.config, self.lm_head.weight
        shape = (batch_size, c.n_head, c.block_size, c.n_embd // c.n_head)
        for block in self.transformer.h:
            a = block.attn
            cache = a.k_cache
            if cache is None or cache.shape != shape or cache.dtype != w.dtype or cache.device != w.device:
                a.k_cache = torch.zeros(shape, device=w.device, dtype=w.dtype)
                a.v_cache = torch.zeros(shape, device=w.device, dtype=w.dtype)
        attn = [block.attn for block in self.transformer.h]
        return KVCache(c, batch_size, w.device, w.dtype, tensors=([a.k_cache for a in attn], [a.v_cache for a in attn]))

    def decode_step(self, idx, slot, pad):
        """Logits (B, vocab) of one new token per row, idx (B, 1), written at cache position
        slot (a 1-element tensor) of static_cache(): every step has the same shapes, with
        the not-yet-filled slots and each row's pad (B,) left-padding masked out, so the
        step compiles to one graph. The same computation as forward() with a KVCache."""
        slots = torch.arange(self.config.block_size, device=idx.device)
        attend = ((slots[None, :] <= slot) & (slots[None, :] >= pad[:, None]))[:, None, None, :]
        x, rope = self.embed(idx, (slot - pad)[:, None])
        for block, prefix in zip(self.transformer.h, self.layer_prefixes()):
            x = block(x, attend, slot=slot, rope=rope, prefix=prefix)
        return self.lm_head(self.transformer.ln_f(x))[:, -1, :]

    def decode_ragged(self, idx, cache):
        """Logits (B, vocab) of one new token per row, idx (B, 1), for the first B rows of a
        KVCache whose row b holds cache.lengths[b] tokens (miniglm/batching.py: requests that started
        at different times in one batch). The same computation as forward() with a KVCache."""
        keys = torch.arange(int(cache.lengths.max()) + 1, device=idx.device)
        attend = (keys[None, :] <= cache.lengths[:, None])[:, None, None, :]
        x, rope = self.embed(idx, cache.lengths[:, None])
        for i, (block, prefix) in enumerate(zip(self.transformer.h, self.layer_prefixes())):
            x = block(x, attend, cache, i, rope=rope, prefix=prefix)
        return self.lm_head(self.transformer.ln_f(x))[:, -1, :]

    def compiled_decode_step(self):
        if getattr(self, "_compiled_step", None) is None:
            self._compiled_step = torch.compile(self.decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
        return self._compiled_step
