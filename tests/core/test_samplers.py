"""Samplers on a toy flow whose exact answer is known.

Data ~ N(m, c^2) per element. The probability-flow ODE of x_sigma = (1 - sigma) x0 + sigma eps
maps noise z (at sigma = 1) to m + c z (at sigma = 0) along
x_sigma = (1 - sigma) m + std(sigma) z,  std = sqrt((1 - sigma)^2 c^2 + sigma^2),
so its velocity is v(x, sigma) = -m + d std/d sigma * (x - (1 - sigma) m) / std.
"""

import math

import pytest
import torch

from firered_core.sampling import flow, samplers, schedules

M, C = 0.7, 0.3


def toy_model(x, sigma):
    s = flow.broadcast_sigma(sigma.to(torch.float64), x.to(torch.float64))
    std = torch.sqrt((1 - s) ** 2 * C**2 + s**2)
    dstd = (s - (1 - s) * C**2) / std
    z = (x.to(torch.float64) - (1 - s) * M) / std
    return (-M + dstd * z).to(x.dtype)


def run(name, n, z):
    sig = schedules.plain_sigmas(n)
    # avoid sigma = 1 exactly being special for the toy: it is not (std(1) = 1)
    return samplers.get_sampler(name)(toy_model, z.clone(), sig)


@pytest.fixture
def z():
    return torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_euler_converges_at_first_order(z):
    exact = M + C * z
    errs = [(run("euler", n, z) - exact).abs().max().item() for n in (10, 20, 40)]
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert errs[2] < 0.06 and min(rates) > 0.9, (errs, rates)


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m"])
def test_higher_order_samplers_converge_faster_than_euler(name, z):
    exact = M + C * z
    euler40 = (run("euler", 40, z) - exact).abs().max().item()
    errs = [(run(name, n, z) - exact).abs().max().item() for n in (40, 80, 160, 320)]
    assert errs[0] < euler40 / 5, (errs[0], euler40)
    # asymptotically second order: the error falls about 4x per halving of the step
    assert math.log2(errs[1] / errs[3]) / 2 > 1.5, errs


def test_euler_step_matches_reference_scheduler_arithmetic():
    x = torch.randn(1, 4, 64, dtype=torch.bfloat16)
    v = torch.randn(1, 4, 64, dtype=torch.bfloat16)
    out = samplers.euler_step(x, v, torch.tensor(0.8), torch.tensor(0.6))
    assert out.dtype == torch.bfloat16
    ref = (x.float() + (torch.tensor(0.6) - torch.tensor(0.8)) * v).to(torch.bfloat16)
    assert torch.equal(out, ref)


def test_callback_sees_every_step_and_can_cancel(z):
    seen = []
    samplers.sample_euler(toy_model, z, schedules.plain_sigmas(5), callback=lambda info: seen.append(info.i))
    assert seen == [0, 1, 2, 3, 4]

    class Stop(Exception):
        pass

    def cancel(info):
        if info.i == 1:
            raise Stop

    with pytest.raises(Stop):
        samplers.sample_euler(toy_model, z, schedules.plain_sigmas(5), callback=cancel)


def test_sde_sampler_reaches_the_data_distribution():
    z = torch.randn(4000, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    out = samplers.sample_euler_sde(toy_model, z, schedules.plain_sigmas(200), generator=g, eta=0.5)
    assert out.mean().item() == pytest.approx(M, abs=0.03)
    assert out.std().item() == pytest.approx(C, abs=0.03)


def test_sde_step_log_prob_is_the_gaussian_density_of_its_own_draw():
    x = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(2))
    v = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(3))
    nxt, logp, mean = samplers.sde_step_with_logprob(x, v, 0.6, 0.5, eta=0.7, generator=torch.Generator().manual_seed(4))
    # rescoring the same transition gives the same log-prob; a far-away sample scores lower
    _, logp2, _ = samplers.sde_step_with_logprob(x, v, 0.6, 0.5, eta=0.7, prev_sample=nxt)
    torch.testing.assert_close(logp, logp2)
    _, logp_far, _ = samplers.sde_step_with_logprob(x, v, 0.6, 0.5, eta=0.7, prev_sample=nxt + 1.0)
    assert torch.all(logp_far < logp)
    # the log-prob equals torch.distributions.Normal's
    std = 0.7 * math.sqrt(0.6 / 0.4) * math.sqrt(0.1)
    ref = torch.distributions.Normal(mean, std).log_prob(nxt).flatten(1).sum(1)
    torch.testing.assert_close(logp, ref, atol=1e-3, rtol=1e-5)
    # gradients flow through the mean to v (what the RL objective needs)
    vv = v.clone().requires_grad_(True)
    _, lp, _ = samplers.sde_step_with_logprob(x, vv, 0.6, 0.5, prev_sample=nxt)
    lp.sum().backward()
    assert vv.grad is not None and vv.grad.abs().sum() > 0


def test_unknown_sampler_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        samplers.get_sampler("ddim")
