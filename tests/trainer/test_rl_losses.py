"""The RL losses against hand-computed values on tiny tensors, and their gradient directions."""

import math

import pytest
import torch

from firered_core.editing import consistency
from firered_trainer.rl import losses as L

# ---------------------------------------------------------------------------------------------
# DPO with Asymmetric Gradient Optimization
# ---------------------------------------------------------------------------------------------


def test_dpo_loss_hand_value():
    # win diff = 0.5 - 0.6 = -0.1, lose diff = 0.7 - 0.6 = 0.1
    # inside = beta (lose - omega win) = 10 (0.1 + 2 * 0.1) = 3
    # loss = log(1 + e^-3) + lam * L^w = 0.0485874 + 0.5 * 0.5
    t = lambda v: torch.tensor([v])  # noqa: E731
    loss, st = L.dpo_loss(t(0.5), t(0.7), t(0.6), t(0.6), beta=10.0, omega=2.0, lam=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-3.0)) + 0.25, abs=1e-6)
    assert st.accuracy == 1.0
    assert st.win_diff == pytest.approx(-0.1, abs=1e-6) and st.lose_diff == pytest.approx(0.1, abs=1e-6)


def test_dpo_reduces_to_diffusion_dpo():
    ew, el, rw, rl = (torch.rand(4) for _ in range(4))
    loss, _ = L.dpo_loss(ew, el, rw, rl, beta=7.0, omega=1.0, lam=0.0)
    ref = -torch.nn.functional.logsigmoid(-7.0 * ((ew - el) - (rw - rl))).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_dpo_gradient_direction_and_asymmetry():
    """Two velocity predictions as leaves with residuals of equal norm: the loss's gradient makes
    the preferred error fall and the rejected one rise, and the preferred gradient is omega times
    the rejected one (lam = 0), as eq. 2 defines the asymmetry."""
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 8)
    eps = torch.randn(2, 4, 8)
    target = eps - x0
    noise = torch.randn(1, 4, 8)
    for omega in (1.0, 3.0):
        v_w = (target[:1] + 0.3 * noise).requires_grad_(True)
        v_l = (target[1:] + 0.3 * noise).requires_grad_(True)
        ref_w = L.velocity_errors(target[:1] + 0.3 * noise, x0[:1], eps[:1])
        ref_l = L.velocity_errors(target[1:] + 0.3 * noise, x0[1:], eps[1:])
        ew, el = L.velocity_errors(v_w, x0[:1], eps[:1]), L.velocity_errors(v_l, x0[1:], eps[1:])
        loss, _ = L.dpo_loss(ew, el, ref_w, ref_l, beta=100.0, omega=omega, lam=0.0)
        gw, gl = torch.autograd.grad(loss, [v_w, v_l])
        assert (gw.norm() / gl.norm()).item() == pytest.approx(omega, rel=1e-5)
        with torch.no_grad():
            ew2 = L.velocity_errors(v_w - 0.01 * gw, x0[:1], eps[:1])
            el2 = L.velocity_errors(v_l - 0.01 * gl, x0[1:], eps[1:])
        assert ew2 < ew.detach() and el2 > el.detach()


def test_dpo_sft_anchor_keeps_pulling_when_saturated():
    # inside = 100 (1 + 1.5) -> the sigmoid is saturated; only the anchor's gradient is left
    ew = torch.tensor([0.5], requires_grad=True)
    loss, _ = L.dpo_loss(ew, torch.tensor([1.6]), torch.tensor([0.6]), torch.tensor([0.6]), beta=100.0, omega=1.5, lam=1.0)
    (g,) = torch.autograd.grad(loss, ew)
    assert g.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kw", [{"beta": 0.0}, {"omega": -1.0}, {"lam": -0.1}])
def test_dpo_rejects_bad_options(kw):
    t = torch.zeros(1)
    with pytest.raises(ValueError):
        L.dpo_loss(t, t, t, t, **kw)


# ---------------------------------------------------------------------------------------------
# DiffusionNFT
# ---------------------------------------------------------------------------------------------


def _one(v):
    return torch.tensor([[v]])


def test_nft_loss_hand_values():
    # v_theta 1, v_old 0.5, x0 0, eps 1 -> target 1; beta 0.5: v+ = 0.75, v- = 0.25; r = 0.8
    args = (_one(1.0), _one(0.5), _one(0.0), _one(1.0), torch.tensor([0.5]), torch.tensor([0.8]))
    loss, st = L.nft_loss(*args, beta=0.5, adv_clip_max=5.0, weighting="velocity")
    # (0.8 * 0.25^2 + 0.2 * 0.75^2) * 5 / 0.5
    assert loss.item() == pytest.approx((0.8 * 0.0625 + 0.2 * 0.5625) * 10, abs=1e-6)
    # adaptive: x0 errors sigma (v -+ target) = -0.125 / -0.375, each squared over its own |.|
    loss, st = L.nft_loss(*args, beta=0.5, adv_clip_max=5.0, weighting="adaptive")
    assert loss.item() == pytest.approx((0.8 * 0.125 + 0.2 * 0.375) * 10, abs=1e-6)
    # KL to a reference at 0: + kl_weight * 1^2
    loss_kl, st = L.nft_loss(*args, beta=0.5, weighting="adaptive", v_ref=_one(0.0), kl_weight=0.1)
    assert loss_kl.item() == pytest.approx(loss.item() + 0.1, abs=1e-6) and st.kl == pytest.approx(1.0)


@pytest.mark.parametrize("weighting", ["adaptive", "velocity"])
def test_nft_gradient_direction(weighting):
    """At v_theta = v_old (the start of an update): r = 1 pulls v_theta toward the flow target
    (the sample's likelihood rises), r = 0 pushes it away, r = 1/2 gives no gradient."""
    torch.manual_seed(1)
    x0, eps = torch.randn(3, 6, 8), torch.randn(3, 6, 8)
    target = eps - x0
    v_old = target + 0.5 * torch.randn(3, 6, 8)
    sigma = torch.tensor([0.3, 0.6, 0.9])
    for r_val, sign in ((1.0, -1), (0.0, +1), (0.5, 0)):
        vt = v_old.clone().requires_grad_(True)
        loss, _ = L.nft_loss(vt, v_old, x0, eps, sigma, torch.full((3,), r_val), beta=1.0, weighting=weighting)
        (g,) = torch.autograd.grad(loss, vt)
        before = L.per_sample_mse(vt.detach(), target)
        after = L.per_sample_mse(vt.detach() - 1e-3 * g, target)
        if sign == 0:
            assert g.abs().max().item() < 1e-6
        else:
            assert torch.all(torch.sign(after - before) == sign)


def test_optimality_probability():
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0, 0.0, 0.0, 0.0, 100.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    r = L.optimality_probability(rewards, groups, adv_clip_max=5.0)
    a = 1.0 / (1.0 + 1e-4)  # +-1 std, over (std + eps)
    assert r[:2].tolist() == pytest.approx([0.5 - a / 10, 0.5 + a / 10], abs=1e-6)
    assert r[2:4].tolist() == [0.5, 0.5]  # equal rewards: no signal
    # group 2: the outlier's advantage is sqrt(3) (population std) -> not clipped
    assert r[7].item() == pytest.approx(0.5 + math.sqrt(3) / (1 + 1e-4 / 43.3) / 10, abs=1e-4)
    assert L.optimality_probability(torch.tensor([0.0, 10.0]), adv_clip_max=0.5).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError):
        L.optimality_probability(torch.zeros(3), torch.zeros(2))


def test_old_policy_decay():
    assert L.old_policy_decay(10) == pytest.approx(0.01)
    assert L.old_policy_decay(10_000) == 0.5
    assert L.old_policy_decay(74, "ocr") == 0.0 and L.old_policy_decay(175, "ocr") == pytest.approx(0.75)
    assert L.old_policy_decay(10_000, "ocr") == 0.999
    with pytest.raises(ValueError):
        L.old_policy_decay(1, "cosine")


# ---------------------------------------------------------------------------------------------
# Consistency loss
# ---------------------------------------------------------------------------------------------


def test_consistency_loss_is_the_shared_measure_times_the_schedule():
    torch.manual_seed(2)
    x0_hat, src = torch.randn(3, 4, 64), torch.randn(3, 4, 64)
    keep = torch.zeros(1, 4, 64)
    keep[:, :2] = 1
    sigma = torch.tensor([0.2, 0.5, 0.95])
    got = L.consistency_loss(x0_hat, src, keep, sigma, eta=2.0)
    m = consistency.region_consistency(x0_hat, src, keep)
    assert got.tolist() == pytest.approx((2.0 * sigma**2 * m * (sigma < 0.9)).tolist(), rel=1e-6)
    assert got[2].item() == 0.0  # the report's cutoff above sigma 0.9
    # its gradient only moves the kept region, toward the source
    xh = x0_hat.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(L.consistency_loss(xh, src, keep, sigma, eta=2.0).sum(), xh)
    assert g[:, 2:].abs().max() == 0 and g[:2, :2].abs().max() > 0
    assert torch.all(g[:2, :2] * (x0_hat[:2, :2] - src[:2, :2]) >= 0)
    with pytest.raises(ValueError):
        L.consistency_loss(x0_hat, src, keep, sigma, schedule="cosine")


def test_identity_loss_uses_the_shared_measure():
    torch.manual_seed(3)
    emb = consistency.tiny_face_embedder()
    ref = torch.rand(1, 3, 128, 128) * 2 - 1
    face = consistency.Face.from_box((24, 24, 104, 104))
    x = (ref + 0.3 * torch.randn_like(ref)).clamp(-1, 1)
    sigma = torch.tensor([0.5])
    got = L.identity_loss(x, ref, [[face]], emb, sigma, eta=4.0)
    want = 4.0 * 0.25 * consistency.identity_consistency(x, ref, [[face]], emb)
    assert got.item() == pytest.approx(want.item(), rel=1e-6) and got.item() > 0


def test_nft_train_sigmas_released_grid_mode_and_shift_mode():
    """``train_timesteps: sampler`` (DiffusionNFT's released code) trains only at the rollout grid's
    first 99% of steps, each about equally often; ``shift`` draws fresh sigmas off the grid."""
    from firered_core.sampling import schedules
    from firered_trainer.objective import training_sigmas
    from firered_trainer.rl import common, nft

    grid = schedules.get_schedule("flowmatch")(10, image_seq_len=1024)
    drawn = nft.train_sigmas(4000, torch.Generator().manual_seed(0), mode="sampler", grid=grid, image_seq_len=1024)
    values, counts = torch.unique(drawn, return_counts=True)
    assert torch.equal(torch.sort(values, descending=True).values, grid[:9].float())  # int(10 * 0.99) = 9 steps
    assert counts.min() > 4000 / 9 * 0.8 and counts.max() < 4000 / 9 * 1.2
    half = nft.train_sigmas(500, torch.Generator().manual_seed(0), mode="sampler", grid=grid, image_seq_len=1024,
                            timestep_fraction=0.5)
    assert set(half.tolist()) <= set(grid[:5].tolist())

    g = torch.Generator().manual_seed(1)
    shifted = nft.train_sigmas(64, g, mode="shift", grid=grid, image_seq_len=1024)
    u = torch.rand(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float() * 0.99 + 0.005
    assert torch.equal(shifted, training_sigmas(u, image_seq_len=1024, config=None))
    assert not set(shifted.tolist()) & set(grid.tolist())
    from firered_trainer.config import load_config

    with pytest.raises(common.ConfigError, match=r"nft\.train_timesteps: expected shift or sampler"):
        load_config({"model.path": "m", "data.jsonl": "p", "output_dir": "o", "nft.train_timesteps": "grid"}, stage="nft")
