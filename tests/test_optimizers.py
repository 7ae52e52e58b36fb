"""The client's optimizer options against torch.optim.AdamW, and the optimizer step taken in backward.

Tolerances: the relative distance ||dw - dw_ref|| / ||dw_ref|| between the weight change of an option and
of torch.optim.AdamW over 5 steps on bytes-small (lr 1e-3, same batches). Measured here: in-backward 0
(bit-identical); torchao 8-bit state 0.012; bf16 weights with stochastic rounding 0.071 (torch AdamW's
own bf16 rounding of the starting weights included); 4-bit state 0.22 (its first steps are noisy: the
second moment is quantized from its first value). Bounds with margin below. torchao compiles its step
with torch.compile (~15-30 s once per process on a CPU), so those cases are in the slow tier.
"""

import copy
import itertools

import pytest
import torch
from conftest import assert_same_steps

import fedtp_flwr.training.loop as training
from fedtp_flwr.config import ConfigError, RunConfig
from fedtp_flwr.model import build_model, preset_args
from fedtp_flwr.training import InBackwardOptimizer, TrainSettings, train_local

STEPS = 5


@pytest.fixture(scope="module")
def base():
    return build_model(preset_args("bytes-small"), seed=1)


def batches():
    tok = torch.randint(0, 260, (4, 65), generator=torch.Generator().manual_seed(0))
    return itertools.repeat((tok[:, :-1], tok[:, 1:]))


def update(base, dtype=torch.float32, **kw) -> torch.Tensor:
    """The flat weight change after STEPS local steps with these TrainSettings."""
    model = copy.deepcopy(base).to(dtype)
    train_local(model, batches(), TrainSettings(learning_rate=1e-3, local_steps=STEPS, max_grad_norm=0, seed=0, **kw))
    ref = base.state_dict()
    return torch.cat([(v.float() - ref[k]).flatten() for k, v in model.state_dict().items()])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_step_in_backward_equals_the_ordinary_step_bit_for_bit(base):
    assert torch.equal(update(base, optimizer_in_backward=True), update(base))


def test_step_in_backward_in_row_blocks_is_the_same_update(base, monkeypatch):
    """Row blocks of 16,384 values (bytes-small's matrices have 65,536-720,896, so each is stepped in 4-44 blocks):
    the same result."""
    whole = update(base, optimizer_in_backward=True)
    monkeypatch.setattr(training, "STEP_BLOCK_VALUES", 16384)
    assert torch.equal(update(base, optimizer_in_backward=True), whole)


def test_step_in_backward_leaves_no_gradient_and_no_hook(base):
    model = copy.deepcopy(base)
    opt = InBackwardOptimizer(model, TrainSettings(max_grad_norm=0, optimizer_in_backward=True))
    tok = torch.randint(0, 260, (1, 9))
    model(tok).sum().backward()
    assert all(p.grad is None for p in model.parameters())  # each was stepped and freed in backward
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt.remove()
    model(tok).sum().backward()
    assert all(p.grad is not None for p in model.parameters())  # no hook any more
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fedprox_term_is_applied_in_backward_too(base):
    plain = update(base, optimizer_in_backward=True)
    prox = update(base, optimizer_in_backward=True, proximal_mu=1.0)
    ref_prox = update(base, proximal_mu=1.0)
    assert not torch.equal(prox, plain)
    start = torch.cat([v.flatten() for v in base.state_dict().values()])
    assert_same_steps({"update": prox}, {"update": ref_prox}, {"update": start}, lr=1e-3, steps=STEPS)


def test_settings_that_cannot_work_in_backward_are_refused():
    with pytest.raises(ValueError, match="max_grad_norm = 0"):
        TrainSettings(optimizer_in_backward=True)  # default clipping 1.0
    with pytest.raises(ValueError, match="grad_accum_steps = 1"):
        TrainSettings(optimizer_in_backward=True, max_grad_norm=0, grad_accum_steps=2)
    with pytest.raises(ConfigError, match="'max-grad-norm' = 0"):
        RunConfig.from_run_config({"optimizer-in-backward": True})
    RunConfig.from_run_config({"optimizer-in-backward": True, "max-grad-norm": 0.0})
    with pytest.raises(ValueError, match="optimizer"):
        TrainSettings(optimizer="sgd")


@pytest.mark.slow
@pytest.mark.parametrize("option, dtype, bound", [
    (dict(optimizer="adamw8bit"), torch.float32, 0.05),
    (dict(optimizer="adamw4bit"), torch.float32, 0.4),
    (dict(optimizer="adamw"), torch.bfloat16, 0.15),
    (dict(optimizer="adamw8bit", optimizer_in_backward=True), torch.bfloat16, 0.15),
])
def test_low_bit_and_bf16_options_track_torch_adamw(base, option, dtype, bound):
    ref = update(base)
    got = update(base, dtype, **option)
    assert 0 < rel(got, ref) < bound
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.95


@pytest.mark.slow
def test_bf16_weights_move_below_their_rounding_step(base):
    """Stochastic rounding: with an update far below bf16's resolution (lr 1e-6 on weights ~0.02, whose
    bf16 step is ~1e-4), plain rounding would leave every weight as it was; the mean change follows the
    float32 update instead."""
    model = copy.deepcopy(base).to(torch.bfloat16)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(model, batches(), TrainSettings(learning_rate=1e-6, local_steps=3, max_grad_norm=0, seed=0))
    w, w0 = model.layers[0].feed_forward.w1.weight, start["layers.0.feed_forward.w1.weight"]
    assert (w != w0).float().mean() > 0.001  # some weights moved by a whole bf16 step


def test_a_cpu_without_a_compiler_is_told_what_works(base, monkeypatch):
    """torchao's step is compiled; without a C++ compiler the client stops at its first round with an error
    naming the option and what runs anywhere (not a compiler traceback mid-training)."""
    monkeypatch.setattr(training.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="adamw4bit.*C\\+\\+ compiler.*'adamw' with float32"):
        training.make_optimizer(copy.deepcopy(base), TrainSettings(optimizer="adamw4bit"))
    training.make_optimizer(copy.deepcopy(base), TrainSettings(optimizer="adamw"))  # torch's: no compiler needed
