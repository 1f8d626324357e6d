"""The time convention, shifts and schedules: round trips, monotonicity, and equality with the
diffusers scheduler FireRed ships with."""

import math

import pytest
import torch

from firered_core.sampling import flow, schedules


def test_parameterisation_round_trips():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    sigma = torch.tensor([0.1, 0.5, 0.93])
    x = flow.add_noise(x0, eps, sigma)
    v = flow.velocity(x0, eps)
    torch.testing.assert_close(flow.v_to_x0(x, v, sigma), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(flow.v_to_eps(x, v, sigma), eps, atol=1e-5, rtol=0)
    torch.testing.assert_close(flow.x0_to_v(x, x0, sigma), v, atol=1e-4, rtol=0)
    torch.testing.assert_close(flow.x0_to_eps(x, x0, sigma), eps, atol=1e-4, rtol=0)
    torch.testing.assert_close(flow.eps_to_x0(x, eps, sigma), x0, atol=1e-4, rtol=0)
    assert flow.timestep_to_sigma(flow.sigma_to_timestep(0.25)) == 0.25


def test_shifts_are_monotone_fix_endpoints_and_agree():
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (0.5, 1.0, 3.1):
        y = flow.shift_linear(s, shift)
        assert y[0] == 0 and y[-1] == 1
        assert torch.all(torch.diff(y) > 0)
        torch.testing.assert_close(flow.unshift_linear(y, shift), s)
    # exponential shift with mu = ln(s) is the linear shift s (why Lightning's ln 3 == AuraFlow 3)
    torch.testing.assert_close(flow.shift_exponential(s, math.log(3.0)), flow.shift_linear(s, 3.0))
    assert flow.shift_exponential(0.0, 0.7) == 0.0
    with pytest.raises(ValueError):
        flow.shift_linear(0.5, 0)


def test_mu_matches_the_release_figures():
    assert flow.mu_from_seq_len(256) == pytest.approx(0.5)
    assert flow.mu_from_seq_len(8192) == pytest.approx(0.9)
    assert flow.mu_from_seq_len(4096) == pytest.approx(0.6935, abs=1e-4)


@pytest.mark.parametrize("name", sorted(schedules.SCHEDULES))
@pytest.mark.parametrize("n", [1, 8, 40])
def test_every_schedule_is_descending_and_ends_in_zero(name, n):
    s = schedules.get_schedule(name)(n)
    assert s.dtype == torch.float32 and s.shape == (n + 1,)
    assert s[-1] == 0 and s[0] <= 1
    assert torch.all(torch.diff(s) < 0)


@pytest.mark.parametrize("n,seq", [(40, 4096), (8, 1024), (13, 2304), (2, 256)])
def test_flowmatch_is_bit_identical_to_diffusers(n, seq):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = schedules.FlowMatchConfig()
    ref = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=cfg.mu(seq))
    ours = schedules.flowmatch_sigmas(n, image_seq_len=seq, config=cfg)
    assert torch.equal(ours, ref.sigmas)
    assert ours[-2].item() == pytest.approx(0.02, abs=1e-6)


def test_lightning_is_a_fixed_shift_of_three():
    s = schedules.lightning_sigmas(8)
    grid = torch.linspace(1, 1 / 8, 8, dtype=torch.float64)
    torch.testing.assert_close(s[:-1].double(), flow.shift_linear(grid, 3.0), atol=1e-6, rtol=0)


def test_linear_shift_follows_comfyui_simple_table():
    # with 1000 divisible by n, ComfyUI's simple schedule lands exactly on linspace(1, 1/n, n)
    s = schedules.linear_shift_sigmas(40, shift=3.1)
    grid = torch.linspace(1, 1 / 40, 40, dtype=torch.float64)
    torch.testing.assert_close(s[:-1].double(), flow.shift_linear(grid, 3.1), atol=1e-6, rtol=0)
    # with n = 3 the table index is truncated: t = 1, 0.667, 0.334
    s3 = schedules.linear_shift_sigmas(3, shift=1.0)
    torch.testing.assert_close(s3, torch.tensor([1.0, 0.667, 0.334, 0.0]))


def test_denoise_truncation_and_bad_input():
    s = schedules.flowmatch_sigmas(10)
    assert torch.equal(schedules.truncate_for_denoise(s, 1.0), s)
    assert len(schedules.truncate_for_denoise(s, 0.5)) == 6
    with pytest.raises(ValueError, match="denoise"):
        schedules.truncate_for_denoise(s, 0.0)
    with pytest.raises(ValueError, match="steps"):
        schedules.flowmatch_sigmas(0)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedules.get_schedule("karras-ish")
