"""LoRA and P-Tuning v2 (miniglm/adapters.py) in the model and in generation: step 0 is the base model
(LoRA), the prefix reaches every position and every decode path, merging changes nothing."""
import pytest
import torch

from data_utils import UserError
from miniglm.adapters import LoRALinear, add_adapter, merge_lora, trained_fraction
from miniglm.generation import generate
from model import GPT, GPTConfig

LORA = dict(
    method="lora", r=4, alpha=8.0, dropout=0.0, targets=["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
)
PTUNING = dict(method="ptuning", num_virtual_tokens=5, prefix_projection=False, encoder_hidden_size=16)


def tiny(rope=False, **kw):
    torch.manual_seed(0)
    return GPT(
        GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=64, rope=rope), **kw})
    ).eval()


def trained(model, scale=0.5):
    """Give the adapter's parameters values a trained one might have (B is zero at the start)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("chunk", [0, 16])
def test_lora_at_step_zero_is_the_base_model_exactly(rope, chunk):
    base = tiny(rope)
    base.loss_chunk_rows = chunk
    x, y = torch.randint(0, 64, (3, 20)), torch.randint(0, 64, (3, 20))
    mask = (torch.rand(3, 20) > 0.5).long()
    seg = torch.tensor([[1] * 8 + [2] * 12] * 3)  # packed rows
    want = [base(x, y)[1], base(x, y, mask, seg)[1], base(x)[0]]
    model = add_adapter(base, dict(LORA, dropout=0.1))
    model.train()  # LoRA's dropout is on: the update is still exactly zero
    got = [model(x, y)[1], model(x, y, mask, seg)[1]]
    model.eval()
    got.append(model(x)[0])
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4 * 2


def test_lora_trains_only_the_adapter_and_merges_to_the_same_function():
    model = add_adapter(tiny(), LORA)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)
    n_trained, total = trained_fraction(model)
    assert n_trained == 2 * (4 * (32 + 96) + 4 * (32 + 32) + 4 * (32 + 128) + 4 * (128 + 32))
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    model.loss_chunk_rows = 8
    model(x, y)[1].backward()  # through the chunked loss, with the output layer frozen
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    trained(model)
    before = model(x)[0]
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(x)[0], before, rtol=1e-4, atol=1e-4)


def test_bad_targets_name_the_valid_ones():
    with pytest.raises(
        UserError,
        match=r"lora_targets: 'attn.q_proj' matches no layer; valid: attn.c_attn, "
        r"attn.c_proj, mlp.c_fc, mlp.c_proj",
    ):
        add_adapter(tiny(), dict(LORA, targets=["attn.q_proj"]))


@pytest.mark.parametrize("rope", [False, True])
def test_prefix_reaches_every_segment_of_a_packed_row(rope):
    model = trained(add_adapter(tiny(rope), PTUNING))
    a, b = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 11))
    packed = torch.cat([a, b, torch.zeros(1, 1, dtype=torch.long)], dim=1)
    seg = torch.tensor([[1] * 7 + [2] * 11 + [0]])
    logits, _ = model(packed, segment_ids=seg)
    for sample, start in ((a, 0), (b, 7)):
        alone, _ = model(sample)
        torch.testing.assert_close(logits[:, start : start + sample.size(1)], alone, rtol=1e-5, atol=1e-5)
    model.prefix = None
    assert (model(b)[0] - alone).abs().max() > 1e-2  # the prefix does change what the model computes


@pytest.mark.parametrize("rope", [False, True])
def test_generation_under_a_prefix_cached_static_and_batched(rope):
    """The prefix's N positions come first: the text gets block_size - N (19 of 24) tokens.
    The growing cache, a full recompute, the static decode step and a left-padded batch give
    the same greedy tokens; past the context the window slides, as without a prefix."""
    model = trained(add_adapter(tiny(rope), PTUNING), scale=1.0)
    assert model.context_size == 19
    prompts, pad = torch.randint(0, 64, (3, 9)), torch.tensor([0, 4, 7])
    one_by_one = [
        generate(model, prompts[i : i + 1, p:], 8, temperature=0)[0, 9 - p :] for i, p in enumerate(pad.tolist())
    ]
    batched = generate(model, prompts, 8, temperature=0, pad=pad)[:, 9:]
    assert all(torch.equal(batched[i], one_by_one[i]) for i in range(3))
    model.decode_mode = "static"
    assert torch.equal(generate(model, prompts, 8, temperature=0, pad=pad)[:, 9:], batched)
    model.decode_mode = "eager"
    long = generate(model, prompts[:1], 16, temperature=0)  # runs past the 19-token context
    assert torch.equal(long, generate(model, prompts[:1], 16, temperature=0, use_cache=False))
    with pytest.raises(ValueError, match="exceeds block_size 24 less the prefix's 5"):
        model(torch.zeros(1, 20, dtype=torch.long))


@pytest.mark.slow
@pytest.mark.parametrize("settings", [LORA, PTUNING], ids=["lora", "ptuning"])
def test_adapters_compile_to_the_eager_loss_and_gradients(settings):
    """torch.compile (the CUDA default; inductor here) traces both adapters: the same loss and
    adapter gradients as eager."""
    model = trained(add_adapter(tiny(rope=True), settings), scale=0.3)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    grads = []
    for step_model in (model, torch.compile(model)):
        model.zero_grad()
        _, loss = step_model(x, y)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
