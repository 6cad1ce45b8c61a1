"""Muon with its Newton-Schulz iteration in a chosen dtype (miniglm/optimizers.py): the same steps as
torch.optim.Muon, the dtype picked per device, and start-up probes that leave the RNG alone."""
import os
from unittest import mock

import pytest
import torch

from conftest import run_script
from data_utils import UserError
from miniglm import distributed
from miniglm.optimizers import Muon, orthogonalize, pick_ns_dtype

SHAPES = [(24, 40), (40, 24), (32, 32)]  # wide, tall (iterated transposed) and square


def muon_pair(ns_dtype):
    """The same matrices and gradients under torch.optim.Muon and optimizers.Muon."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(3)]
    ours, theirs = ([torch.nn.Parameter(w.clone()) for w in weights] for _ in range(2))
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="original")
    return (Muon(ours, ns_dtype=ns_dtype, **kw), ours), (torch.optim.Muon(theirs, **kw), theirs), grads


def run_steps(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def test_muon_in_bf16_is_torchs_muon_bit_for_bit():
    (ours, p1), (theirs, p2), grads = muon_pair(torch.bfloat16)
    run_steps(ours, p1, grads)
    run_steps(theirs, p2, grads)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    # the state is torch's too: a checkpoint of either loads into the other
    assert ours.state_dict()["param_groups"] == theirs.state_dict()["param_groups"]
    assert all(
        torch.equal(ours.state[a]["momentum_buffer"], theirs.state[b]["momentum_buffer"]) for a, b in zip(p1, p2)
    )


def test_muon_in_fp32_is_torchs_iteration_without_the_bf16_cast():
    """torch's own _zeropower_via_newtonschulz with its bf16 cast made a no-op is the fp32
    reference: the step's update matches it to fp32 rounding, and differs from bf16's."""
    from torch.optim import _muon

    (ours, p1), (theirs, p2), grads = muon_pair(torch.float32)
    with mock.patch.object(torch.Tensor, "bfloat16", lambda self: self.clone()):
        run_steps(theirs, p2, grads)
        g = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
        reference = _muon._zeropower_via_newtonschulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7)
    assert reference.dtype == torch.float32
    torch.testing.assert_close(
        orthogonalize(g, torch.float32, (3.4445, -4.7750, 2.0315), 5, 1e-7), reference, rtol=1e-5, atol=1e-6
    )
    run_steps(ours, p1, grads)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    in_bf16 = orthogonalize(g, torch.bfloat16, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
    assert (in_bf16 - reference).abs().max() > 1e-3  # bf16 rounding is visible: the dtype really changed
    torch.testing.assert_close(in_bf16, reference, rtol=0.05, atol=0.02)  # both orthogonalise


def test_ns_dtype_is_a_rule_per_device_and_a_recorded_one_wins():
    assert pick_ns_dtype("auto", "cuda:0")[0] == torch.bfloat16
    assert pick_ns_dtype("auto", "mps")[0] == torch.float32
    assert pick_ns_dtype("auto", "cpu")[0] == torch.float32
    assert pick_ns_dtype("bfloat16", "cpu") == (torch.bfloat16, "set by muon_ns_dtype")
    assert pick_ns_dtype("float32", "cuda")[0] == torch.float32
    assert pick_ns_dtype("auto", "cpu", recorded="bfloat16")[0] == torch.bfloat16  # a resumed run keeps its own
    assert pick_ns_dtype("float32", "cuda", recorded="bfloat16")[0] == torch.bfloat16
    with pytest.raises(UserError, match="muon_ns_dtype must be 'auto', 'float32' or 'bfloat16', got 'fp8'"):
        pick_ns_dtype("fp8", "cpu")


@pytest.mark.slow
def test_the_cpu_choice_does_not_depend_on_the_cpus_bf16_speed():
    """An AVX2-only CPU (oneDNN capped) and this one choose alike: no stopwatch decides."""
    code = "import torch; from miniglm.optimizers import pick_ns_dtype; print(*pick_ns_dtype('auto', 'cpu'))"
    outs = {run_script("-c", code, env=dict(os.environ, **isa)).stdout for isa in ({}, {"ONEDNN_MAX_CPU_ISA": "AVX2"})}
    assert len(outs) == 1 and outs.pop().startswith("torch.float32 auto: float32 on cpu")


def test_start_up_probe_leaves_the_rng_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    distributed.measure_peak_flops("cpu", torch.float32)
    assert torch.equal(torch.get_rng_state(), before)
