import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from miniglm.generation import generate, sample_next
from model import GPT, GPTConfig, LinearCrossEntropy, masked_cross_entropy
from train import load_config


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=64), **kw})).eval()


def test_45m_config_parameter_count():
    c = load_config([str(ROOT / "config/train_config.py")])
    model = GPT(GPTConfig(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["block_size"]))
    assert 44e6 < model.num_params() < 46e6, model.num_params()


def test_masked_loss_is_mean_over_mask_ones():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])
    targets = torch.tensor([[0, 2, 2]])
    mask = torch.tensor([[0, 1, 1]])
    by_hand = (-math.log(math.exp(0) / (math.exp(0) + math.exp(1) + 1))
               - math.log(math.exp(3) / (2 + math.exp(3)))) / 2
    assert abs(masked_cross_entropy(logits, targets, mask).item() - by_hand) < 1e-6
    assert abs(masked_cross_entropy(logits, targets).item() - F.cross_entropy(logits[0], targets[0]).item()) < 1e-6


def test_linear_cross_entropy_equals_the_plain_loss_and_its_gradients():
    torch.manual_seed(0)
    x, w = torch.randn(70, 16, requires_grad=True), torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 37, (70,))
    targets[::9] = -100  # ignored rows: no loss, no gradient
    (3 * F.cross_entropy(x @ w.t(), targets)).backward()
    want = x.grad.clone(), w.grad.clone()
    for chunk in (8, 70, 256):  # chunks that split the rows unevenly, exactly, or not at all
        x.grad = w.grad = None
        loss = LinearCrossEntropy.apply(x, w, targets, chunk)
        (3 * loss).backward()  # the gradient flowing in is applied
        assert torch.allclose(loss, F.cross_entropy(x @ w.t(), targets), atol=1e-6)
        assert torch.allclose(x.grad, want[0], atol=1e-6) and torch.allclose(w.grad, want[1], atol=1e-6)
    assert not x.grad[::9].any()
    with torch.no_grad():  # evaluation: the loss alone
        assert torch.allclose(
            LinearCrossEntropy.apply(x, w, targets, 8, None, False), F.cross_entropy(x @ w.t(), targets)
        )


class CountMatmuls(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in ("mm", "matmul", "__matmul__", "addmm_")
        return func(*args, **(kwargs or {}))


def test_linear_cross_entropy_under_no_grad_skips_the_gradient_matmuls():
    """Evaluation (no_grad) pays for the logits alone: one matmul per chunk, not three."""
    x, w = torch.randn(64, 16, requires_grad=True), torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 37, (64,))
    for grad, want in ((True, 3 * 4), (False, 4)):
        with torch.set_grad_enabled(grad), CountMatmuls() as counted:
            LinearCrossEntropy.apply(x, w, targets, 16, None, torch.is_grad_enabled())
        assert counted.count == want, (grad, counted.count)
    model = tiny()  # the model passes its grad mode on: evaluation loops (train.py, evaluations.py) gain
    model.loss_chunk_rows = 16
    x, y = torch.randint(0, 64, (2, 24)), torch.randint(0, 64, (2, 24))
    for grad, want in ((True, 3 * 3), (False, 3)):
        with torch.set_grad_enabled(grad), CountMatmuls() as counted:
            model(x, y)
        assert counted.count == want, (grad, counted.count)


def test_model_chunked_loss_trains_like_the_full_logits():
    """The same loss and the same gradients (tied embedding included) with and without
    LinearCrossEntropy, for pretraining and for an SFT mask."""
    x, y = torch.randint(0, 64, (3, 24)), torch.randint(0, 64, (3, 24))
    mask = (torch.rand(3, 24) > 0.6).long()
    for loss_mask in (None, mask):
        grads = []
        for rows in (0, 16):
            model = tiny().train()
            model.loss_chunk_rows = rows
            logits, loss = model(x, y, loss_mask)
            assert (logits is None) == (rows > 0)
            loss.backward()
            grads.append((loss.detach(), [p.grad for p in model.parameters()]))
        assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_linear_cross_entropy_under_autocast_matches_the_plain_autocast_loss():
    """bf16/fp16 matmuls (what autocast gives the plain path) with an fp32 softmax: the same
    loss and gradients as the plain loss under autocast, to that precision, and gradients
    in the parameters' own dtype."""
    torch.manual_seed(0)
    x, w = torch.randn(70, 16, requires_grad=True), torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 37, (70,))
    targets[::9] = -100
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            (3 * F.cross_entropy((x @ w.t()).float(), targets)).backward()
        want = x.grad.clone(), w.grad.clone()
        x.grad = w.grad = None
        with torch.autocast("cpu", dtype=dtype):
            loss = LinearCrossEntropy.apply(x, w, targets, 16, dtype)
        (3 * loss).backward()
        assert loss.dtype == x.grad.dtype == w.grad.dtype == torch.float32
        assert abs(loss.item() - F.cross_entropy(x.detach() @ w.detach().t(), targets).item()) < 0.02
        for got, ref in zip((x.grad, w.grad), want):
            assert (got - ref).abs().max() < 0.02 * ref.abs().max(), dtype
        assert not x.grad[::9].any()
        x.grad = w.grad = None
    # a model cast to bf16 (no autocast): its softmax still runs in fp32
    xb, wb = x.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    loss = LinearCrossEntropy.apply(xb, wb, targets, 16)
    loss.backward()
    assert xb.grad.dtype == wb.grad.dtype == torch.bfloat16
    assert abs(loss.item() - F.cross_entropy(xb.float() @ wb.float().t(), targets).item()) < 0.02


@pytest.mark.slow
def test_chunked_loss_compiles_whole_and_trains_like_eager():
    """Under torch.compile(fullgraph=True), in fp32 and under bf16 autocast (the GPU's
    training setting), the chunked loss traces without a graph break (an SFT mask included:
    untrained positions become ignored targets there) and gives the eager plain loss's value
    and gradients (to bf16 precision under autocast)."""
    x, y = torch.randint(0, 64, (3, 24)), torch.randint(0, 64, (3, 24))
    mask = (torch.rand(3, 24, generator=torch.Generator().manual_seed(0)) > 0.6).long()
    for dtype, tol in ((None, 1e-6), (torch.bfloat16, 0.03)):
        runs = []
        for rows, wrap in ((0, lambda m: m), (16, lambda m: torch.compile(m, fullgraph=True))):
            model = tiny().train()
            model.loss_chunk_rows = rows
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                _, loss = wrap(model)(x, y, mask)
            loss.backward()
            runs.append((loss.detach(), [p.grad for p in model.parameters()]))
        torch._dynamo.reset()
        assert torch.allclose(runs[0][0], runs[1][0], atol=1e-6 if dtype is None else 1e-3)
        for a, b in zip(runs[0][1], runs[1][1]):
            assert (a - b).abs().max() <= tol * b.abs().max(), dtype


def test_model_loss_mask_path_equals_full_logits():
    model = tiny()
    x, y = torch.randint(0, 64, (3, 24)), torch.randint(0, 64, (3, 24))
    mask = (torch.rand(3, 24) > 0.6).long()
    _, fast = model(x, y, mask)
    logits, _ = model(x)
    assert torch.allclose(fast, masked_cross_entropy(logits, y, mask), atol=1e-6)


@pytest.mark.parametrize("rope", [False, True])
def test_kv_cache_generation_equals_recompute(rope):
    model = tiny(rope=rope)
    prompt = torch.randint(0, 64, (2, 5))
    cached = generate(model, prompt, 30, temperature=0, use_cache=True)  # runs past block_size (24) too
    plain = generate(model, prompt, 30, temperature=0, use_cache=False)
    assert torch.equal(cached, plain)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = generate(model, prompt, 15, temperature=1.0, top_k=10, generator=g1)
    s2 = generate(model, prompt, 15, temperature=1.0, top_k=10, generator=g2, use_cache=False)
    assert torch.equal(s1, s2)


def sharp(model):
    """Larger weights than at init, so greedy choices are far from ties and a float
    rounding difference between two equal computations cannot flip a token."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8 if p.dim() > 1 else 1)
    return model


@pytest.mark.parametrize("rope", [False, True])
def test_static_decode_step_equals_the_growing_cache(rope):
    model = sharp(tiny(rope=rope))
    prompts = torch.randint(0, 64, (3, 9))
    pad = torch.tensor([0, 4, 7])  # left padding: rows of 9, 5 and 2 real tokens
    eager = generate(model, prompts, 12, temperature=0, pad=pad)
    cache = model.static_cache(3)
    model(prompts, kv_cache=cache, pad=pad, last_logits_only=True)
    context = prompts
    for t in eager[:, 9:].T:  # each decode_step's logits equal a full recompute of the context so far
        logits = model.decode_step(t[:, None], torch.tensor([cache.length]), pad)
        cache.length += 1
        context = torch.cat([context, t[:, None]], dim=1)
        full, _ = model(context, pad=pad)
        assert torch.allclose(logits, full[:, -1], atol=1e-4)
    model.decode_mode = "static"
    assert torch.equal(generate(model, prompts, 12, temperature=0, pad=pad), eager)
    one = torch.randint(0, 64, (1, 5))
    model.decode_mode = "eager"
    want = generate(model, one, 30, temperature=0)  # past block_size (24): the context is cropped and recomputed
    model.decode_mode = "static"
    assert torch.equal(generate(model, one, 30, temperature=0), want)
    assert "k_cache" not in str(model.state_dict().keys())  # the buffers are not saved with the weights


@pytest.mark.slow
def test_compiled_decode_step_is_one_graph_and_gives_the_same_tokens():
    """decode_mode "compiled" (torch.compile, mode="reduce-overhead": CUDA graphs on a GPU;
    here inductor on the CPU): one compilation serves every step (a second one would fail),
    and greedy tokens equal the eager path's, for a padded batch."""
    model = sharp(tiny())
    prompts, pad = torch.randint(0, 64, (3, 9)), torch.tensor([0, 4, 7])
    want = generate(model, prompts, 12, temperature=0, pad=pad)
    model.decode_mode = "compiled"
    with torch._dynamo.config.patch(recompile_limit=1):
        assert torch.equal(generate(model, prompts, 12, temperature=0, pad=pad), want)
        assert torch.equal(generate(model, prompts, 12, temperature=0, pad=pad), want)  # the same graph again


def test_generation_stops_at_stop_token():
    model = tiny()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    free = generate(model, prompt, 12, temperature=0)[0, 3:].tolist()
    stop = free[4]
    first = free.index(stop)
    out = generate(model, prompt, 12, temperature=0, stop_token=stop)[0, 3:].tolist()
    assert out == free[: first + 1]  # same tokens up to and including the first stop token


@pytest.mark.parametrize("rope", [False, True])
def test_packed_block_equals_samples_run_alone(rope):
    model = tiny(rope=rope)
    a, b, c = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 10)), torch.randint(0, 64, (1, 5))
    packed = torch.cat([a, b, c, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    seg = torch.tensor([[1] * 7 + [2] * 10 + [3] * 5 + [0] * 2])
    logits, _ = model(packed, segment_ids=seg)
    for sample, start in ((a, 0), (b, 7), (c, 17)):
        alone, _ = model(sample)
        assert torch.allclose(logits[:, start : start + sample.size(1)], alone, atol=1e-5)


def test_top_k_and_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {sample_next(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(i)).item() for i in range(200)}
    assert draws == {0, 1}
    draws = {sample_next(logits, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(i)).item() for i in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is the first two
    assert sample_next(logits, 0).item() == 0
