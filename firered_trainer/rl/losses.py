"""The RL stage's objectives as pure functions of tensors (FireRed report section 3.6-3.7).

Convention (:mod:`firered_core.sampling.flow`): ``x_sigma = (1 - sigma) x0 + sigma eps``, velocity target
``v = eps - x0``. Every loss returns a scalar and a small stats dataclass for the curves.

**DPO with Asymmetric Gradient Optimization** (report eq. 2). With the per-sample velocity errors
``L^w = ||v - v(x^w_sigma)||^2``, ``L^l`` likewise, of the policy (theta) and of the frozen
reference (the base with the LoRA switched off), on the *same* sigma and noise for both samples
of a pair::

    L = -log sigmoid( beta * [ (L^l_theta - L^l_ref) - omega * (L^w_theta - L^w_ref) ] ) + lam * L^w_theta

``omega > 1`` scales the preferred ("win") term inside the sigmoid, so its gradient is ``omega``
times the rejected one's (the report's fix for the "double degradation" of Diffusion-DPO, where
both diffs rise); ``lam`` is the SFT anchor on the preferred sample. The report prints
``- lam L^w`` inside the expectation's minus; distributing it gives the ``+ lam L^w`` above (the
only reading in which the anchor fits the preferred sample). None of beta, omega, lam is
published. Defaults here: ``beta = 100`` (the flow-matching scale Flow-GRPO's DPO uses; note
Diffusion-DPO writes ``-0.5 beta [...]``, so its beta B is B/2 here), ``omega = 1.5``, ``lam = 1``
(the SFT loss at its own weight: once the sigmoid saturates it is what keeps the winner fitted).
Errors are means over elements (as :func:`firered_trainer.objective.flow_matching_loss`), which sets
beta's scale.

**DiffusionNFT** (report eq. 3; Zheng et al.). For a clean rollout ``x0`` of the old policy with
optimality probability ``r`` in [0, 1] (:func:`optimality_probability`), fresh ``sigma``, ``eps``::

    v+ = (1 - beta) v_old + beta v_theta          (implicit positive policy)
    v- = (1 + beta) v_old - beta v_theta          (implicit negative policy)
    L  = r ||v+ - v||^2 + (1 - r) ||v- - v||^2     (+ kl_weight ||v_theta - v_ref||^2)

It is forward-process (no trajectories, no log-probabilities) and CFG-free. ``weighting``:
``"adaptive"`` (DiffusionNFT's released code, the default) measures each error in x0 space,
``x0_hat - x0 = sigma (v - v_pm)``, and divides its square by its own detached mean absolute
value; ``"velocity"`` is eq. 3 literally. The policy term is multiplied by ``adv_clip_max / beta``
as in the released code (a constant rescaling that keeps the published learning rate meaningful).
The KL term is measured on velocities, ``|v_theta - v_ref|^2``, as in DiffusionNFT's released code.

**Consistency loss** (report eqs. 6-8): :func:`consistency_loss` and :func:`identity_loss` call the
same measures as consistency-guided editing (:mod:`firered_core.editing.consistency`) and weight them with
its sigma schedules (``"sigma2"`` = the report's ``eta sigma^2`` below sigma 0.9, else 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from firered_core.editing import consistency
from firered_core.sampling import flow

# ---------------------------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------------------------


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension, ``[B]``, in float32."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(1)


def velocity_errors(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``||v_pred - (eps - x0)||^2`` per sample (mean over elements), ``[B]``."""
    return per_sample_mse(v_pred, flow.velocity(x0.float(), eps.float()))


# ---------------------------------------------------------------------------------------------
# DPO with Asymmetric Gradient Optimization
# ---------------------------------------------------------------------------------------------


@dataclass
class DPOStats:
    """Means over the batch. win_diff / lose_diff: ``L_theta - L_ref`` of the preferred / rejected
    sample (both should not rise: the report's "double degradation" check); accuracy: the share
    of pairs whose sigmoid argument is positive (Diffusion-DPO's "implicit accuracy")."""

    loss: float
    dpo: float
    sft: float
    win_diff: float
    lose_diff: float
    accuracy: float


def dpo_loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    *,
    beta: float = 100.0,
    omega: float = 1.5,
    lam: float = 1.0,
) -> tuple[torch.Tensor, DPOStats]:
    """Report eq. 2 on per-sample errors ``[B]`` (policy: with gradients; reference: without).

    ``omega = 1, lam = 0`` is plain flow-matching Diffusion-DPO.
    """
    if beta <= 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    if omega <= 0:
        raise ValueError(f"DPO omega must be > 0 (the report uses omega > 1), got {omega}")
    if lam < 0:
        raise ValueError(f"DPO lam (the SFT anchor weight) must be >= 0, got {lam}")
    win = err_w.float() - ref_err_w.detach().float()
    lose = err_l.float() - ref_err_l.detach().float()
    inside = beta * (lose - omega * win)
    dpo = -F.logsigmoid(inside).mean()
    sft = err_w.float().mean()
    loss = dpo + lam * sft
    stats = DPOStats(
        loss=float(loss.detach()),
        dpo=float(dpo.detach()),
        sft=float(sft.detach()),
        win_diff=float(win.detach().mean()),
        lose_diff=float(lose.detach().mean()),
        accuracy=float((inside.detach() > 0).float().mean()),
    )
    return loss, stats


# ---------------------------------------------------------------------------------------------
# DiffusionNFT
# ---------------------------------------------------------------------------------------------


def optimality_probability(
    rewards: torch.Tensor,
    groups: torch.Tensor | None = None,
    *,
    adv_clip_max: float = 5.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Rewards ``[B]`` -> optimality probabilities ``r`` in [0, 1], ``[B]``.

    Within each group (samples of one prompt; ``groups`` holds a group id per sample, ``None`` =
    one group) the reward is standardised, ``A = (R - mean) / (std + eps)`` (population std),
    clipped to ``+-adv_clip_max`` and mapped to ``r = A / adv_clip_max / 2 + 1/2`` (DiffusionNFT's
    mapping). A group of one sample, or of equal rewards, gives ``r = 1/2``: no signal.
    """
    R = rewards.detach().double().reshape(-1)
    if groups is None:
        groups = torch.zeros_like(R, dtype=torch.long)
    groups = torch.as_tensor(groups).reshape(-1)
    if groups.shape != R.shape:
        raise ValueError(f"groups {tuple(groups.shape)} must give one id per reward {tuple(R.shape)}")
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")
    adv = torch.zeros_like(R)
    for g in torch.unique(groups):
        m = groups == g
        x = R[m]
        adv[m] = (x - x.mean()) / (x.std(unbiased=False) + eps)
    adv = adv.clamp(-adv_clip_max, adv_clip_max)
    return (adv / adv_clip_max / 2 + 0.5).clamp(0, 1).float()


@dataclass
class NFTStats:
    """Means over the batch: the positive / negative errors, the KL term, mean r."""

    loss: float
    policy: float
    positive: float
    negative: float
    kl: float
    r: float


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    sigma: torch.Tensor,
    r: torch.Tensor,
    *,
    beta: float = 1.0,
    adv_clip_max: float = 5.0,
    weighting: str = "adaptive",
    v_ref: torch.Tensor | None = None,
    kl_weight: float = 0.0,
) -> tuple[torch.Tensor, NFTStats]:
    """DiffusionNFT's objective (see the module docstring).

    v_theta: the trained policy's velocity at ``x_sigma`` (with gradients); v_old: the old (EMA)
    policy's, v_ref: the reference's (both without); x0: the rollout's clean latent; eps: the noise
    that made ``x_sigma``; sigma: ``[B]``; r: ``[B]`` optimality probabilities.
    """
    if not 0 < beta:
        raise ValueError(f"NFT beta must be > 0, got {beta}")
    v_old = v_old.detach().float()
    vt = v_theta.float()
    target = flow.velocity(x0.float(), eps.float())
    v_pos = (1 - beta) * v_old + beta * vt
    v_neg = (1 + beta) * v_old - beta * vt
    if weighting == "adaptive":
        s = flow.broadcast_sigma(sigma.float(), vt)

        def err(v_pm):
            d = s * (v_pm - target)  # = x0_hat(v_pm) - x0
            w = d.detach().abs().flatten(1).mean(1).clamp_min(1e-5)
            return (d**2).flatten(1).mean(1) / w

    elif weighting == "velocity":

        def err(v_pm):
            return ((v_pm - target) ** 2).flatten(1).mean(1)

    else:
        raise ValueError(f"unknown NFT weighting {weighting!r}; expected 'adaptive' or 'velocity'")
    r = r.to(vt.device).float().reshape(-1)
    if r.shape[0] != vt.shape[0]:
        raise ValueError(f"r has {r.shape[0]} values for a batch of {vt.shape[0]}")
    lp, ln = err(v_pos), err(v_neg)
    policy = (r * lp + (1 - r) * ln).mean() * (adv_clip_max / beta)
    kl = per_sample_mse(vt, v_ref.detach()).mean() if (v_ref is not None and kl_weight > 0) else vt.new_zeros(())
    loss = policy + kl_weight * kl
    stats = NFTStats(
        loss=float(loss.detach()),
        policy=float(policy.detach()),
        positive=float(lp.detach().mean()),
        negative=float(ln.detach().mean()),
        kl=float(kl.detach()),
        r=float(r.mean()),
    )
    return loss, stats


def old_policy_decay(step: int, kind: str = "ramp") -> float:
    """EMA decay of the old policy after ``step`` updates (DiffusionNFT's two published rules).

    ``"ramp"`` (type 1): ``min(0.001 step, 0.5)``; ``"ocr"`` (type 2): 0 for 75 steps, then
    ``min(0.0075 (step - 75), 0.999)``; ``"none"``: 0 (old policy = current policy).
    """
    if kind == "ramp":
        return min(0.001 * step, 0.5)
    if kind == "ocr":
        return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)
    if kind == "none":
        return 0.0
    raise ValueError(f"unknown old-policy decay {kind!r}; expected 'ramp', 'ocr' or 'none'")


# ---------------------------------------------------------------------------------------------
# Consistency loss (report eqs. 6-8) over the shared measures
# ---------------------------------------------------------------------------------------------


def x0_estimate(x_sigma: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The one-step clean estimate ``x_sigma - sigma v`` (differentiable in ``v``)."""
    return flow.v_to_x0(x_sigma.float(), v.float(), flow.broadcast_sigma(sigma.float(), v.float()))


def consistency_loss(
    x0_hat: torch.Tensor,
    x_src: torch.Tensor,
    keep_mask: torch.Tensor,
    sigma: torch.Tensor,
    *,
    eta: float = 1.0,
    schedule: str = "sigma2",
    space: str = "latent",
    vae=None,
) -> torch.Tensor:
    """``lambda(sigma) * region_consistency(x0_hat, x_src, keep_mask)`` per sample, ``[B]``.

    The measure is :func:`firered_core.editing.consistency.region_consistency` (the one consistency-guided
    editing uses) and ``lambda`` the named schedule of :mod:`firered_core.editing.consistency`."""
    m = consistency.region_consistency(x0_hat, x_src, keep_mask, space=space, vae=vae)
    w = consistency.get_weight_schedule(schedule)(sigma.float().to(m.device), eta)
    return w * m


def identity_loss(
    x0_pixels: torch.Tensor,
    ref_pixels: torch.Tensor,
    faces,
    embedder: torch.nn.Module,
    sigma: torch.Tensor,
    *,
    eta: float = 1.0,
    schedule: str = "sigma2",
) -> torch.Tensor:
    """The report's identity consistency loss, ``lambda_id(sigma) * L_id`` per sample, ``[B]``,
    with ``L_id`` = :func:`firered_core.editing.consistency.identity_consistency`."""
    m = consistency.identity_consistency(x0_pixels, ref_pixels, faces, embedder)
    w = consistency.get_weight_schedule(schedule)(sigma.float().to(m.device), eta)
    return w * m
