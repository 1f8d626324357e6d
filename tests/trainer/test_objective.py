"""The flow-matching objective's components."""

import math

import pytest
import torch

from firered_core.sampling import flow
from firered_trainer.objective import EMA, flow_matching_loss, logit_normal_weight, stratified_uniform, training_sigmas


def test_stratified_draws_rotate_through_disjoint_sub_intervals():
    g = torch.Generator().manual_seed(0)
    world = 4
    for step in range(6):
        bins = []
        for rank in range(world):
            u = stratified_uniform(64, rank=rank, world_size=world, step=step, generator=g)
            k = (rank + step) % world
            assert torch.all(u >= k / world) and torch.all(u < (k + 1) / world)
            bins.append(k)
        assert sorted(bins) == list(range(world))  # each step covers the whole range across ranks
    # one rank visits every sub-interval over world_size steps
    visited = {int(stratified_uniform(1, rank=1, world_size=world, step=s, generator=g).item() * world) for s in range(world)}
    assert visited == set(range(world))


def test_training_sigmas_use_the_inference_shift():
    u = torch.linspace(0.05, 1.0, 20)
    s = training_sigmas(u, image_seq_len=4096)
    assert torch.all(torch.diff(s) > 0) and torch.all(s > u - 1e-6)  # shifted toward noise (mu > 0)
    torch.testing.assert_close(s, flow.shift_exponential(u.double(), 0.5 + (4096 - 256) * 0.4 / (8192 - 256)).float())


def test_training_sigmas_follow_a_linear_time_shift():
    """A scheduler config with ``time_shift_type: linear`` trains at ``mu / (mu + 1/u - 1)`` (what
    its inference schedule samples at), not the exponential shift."""
    from firered_core.sampling.schedules import FlowMatchConfig

    cfg = FlowMatchConfig(time_shift_type="linear")
    u = torch.linspace(0.05, 1.0, 20)
    mu = cfg.mu(4096)
    want = (mu / (mu + (1 / u.double() - 1))).float()
    torch.testing.assert_close(training_sigmas(u, image_seq_len=4096, config=cfg), want)
    assert not torch.allclose(training_sigmas(u, image_seq_len=4096), want)  # the exponential shift differs


def test_logit_normal_weight_is_a_density():
    x = torch.linspace(0, 1, 200001)[1:-1]
    integral = torch.trapezoid(logit_normal_weight(x.double()), x.double()).item()
    assert integral == pytest.approx(1.0, abs=2e-3)
    assert logit_normal_weight(torch.tensor(0.5)) > logit_normal_weight(torch.tensor(0.05))


def test_loss_is_zero_for_the_true_velocity_and_grows_with_error():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 16, 64, generator=g), torch.randn(3, 16, 64, generator=g)
    sig = torch.rand(3, generator=g)
    v = flow.velocity(x0, eps)
    assert flow_matching_loss(v, x0, eps, sig).item() == 0.0
    assert flow_matching_loss(v + 0.1, x0, eps, sig).item() == pytest.approx(0.01, rel=1e-4)
    assert flow_matching_loss(v + 0.1, x0, eps, sig, weighting="logit_normal").item() > 0
    # the outlier guard ignores absurd errors, like the released trainer
    bad = v.clone()
    bad[0, 0, 0] += 1000
    assert flow_matching_loss(bad, x0, eps, sig).item() == 0.0
    with pytest.raises(ValueError, match="unknown loss weighting"):
        flow_matching_loss(v, x0, eps, sig, weighting="cosmap2")


def test_ema_follows_the_closed_form():
    m = torch.nn.Linear(2, 2)
    ema = EMA(m, decay=0.9)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.fill_(1.0)
    for _ in range(5):
        ema.update(m)
    expected = w0 * 0.9**5 + 1.0 * (1 - 0.9**5)
    torch.testing.assert_close(ema.shadow["weight"], expected)
    m2 = torch.nn.Linear(2, 2)
    ema2 = EMA(m2)
    ema2.load_state_dict(ema.state_dict())
    ema2.copy_to(m2)
    torch.testing.assert_close(m2.weight.detach(), expected)
    assert math.isclose(ema2.decay, 0.9)
