"""One training example and the loss of a batch: the collator that turns cached features into
:class:`Example` rows (SIA applied), the MM-DiT's velocity per row, the weighted flow-matching loss
with the optional consistency term, back-propagated group by group, and a fixed-draw eval loss."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import torch

from firered_core.model import latents
from firered_core.sampling import flow
from firered_core.sampling.denoiser import batch_texts, transformer_velocity

from . import cache as cache_mod
from .config import StageConfig
from .features import consistency_source, target_size
from .objective import flow_matching_loss, seed_of, stratified_uniform, training_sigmas


@dataclass
class Example:
    """One collated sample: x0 ``[N, 64]`` packed target latent, refs ``[N_ref, 64]`` or None,
    text (cached :class:`TextCond`), img_shapes (target's grid first). With the consistency loss
    on, and exactly one source picture at the target's size: ``src`` ``[N, 64]`` its packed latent at
    the target's training size and ``keep`` ``[N, 64]`` the keep mask (1 = should stay); else None."""

    x0: torch.Tensor
    refs: torch.Tensor | None
    text: object
    img_shapes: list
    src: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    @property
    def shape_key(self):
        return tuple(self.img_shapes)


def auto_keep_mask(src: torch.Tensor, tgt: torch.Tensor, threshold: float) -> torch.Tensor:
    """``consistency_mask: auto``: the keep region of a training pair, from the pair itself -- the
    latent cells (8x8 pixels each) where the source and target latents ``[16, h, w]`` (normalised,
    about unit variance) agree: mean over channels of ``|src - tgt|`` below ``threshold``.
    Returns ``[1, h, w]`` in {0, 1}."""
    return ((src.float() - tgt.float()).abs().mean(0, keepdim=True) < threshold).float()


def consistency_term(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, src: torch.Tensor,
                     keep: torch.Tensor, eta: float) -> torch.Tensor:
    """Per sample ``eta sigma^2 [sigma < 0.9] * region_consistency(x0_hat, src, keep)``, ``[B]``, with
    ``x0_hat = x_t - sigma v`` -- :func:`firered_trainer.rl.losses.consistency_loss` (the measure of
    consistency-guided editing, :func:`firered_core.editing.consistency.region_consistency`)."""
    from .rl.losses import consistency_loss, x0_estimate

    x0_hat = x0_estimate(x_t.to(v.device), v, sigma.to(v.device))
    return consistency_loss(x0_hat, src.to(v.device), keep.to(v.device), sigma.to(v.device), eta=eta,
                            schedule="sigma2", space="latent")


class Collator:
    """Turns a sample into an :class:`Example`: stochastic instruction alignment (instruction
    variant, reference shuffle & drop, renumbered text), then the cached embeddings and latents."""

    def __init__(self, cfg: StageConfig, feature_cache, mid: str, vae=None):
        self.cfg, self.cache, self.mid, self.vae = cfg, feature_cache, mid, vae

    def latent(self, path: str, w: int, h: int) -> torch.Tensor:
        key = cache_mod.latent_key(path, w, h, model_id=self.mid)
        if self.cache.has("latents", key):
            return self.cache.get_latent(key)
        if self.vae is None:
            raise KeyError(f"no cached latent for {path} at {w}x{h}")
        from firered_core.model import images
        from firered_core.model import vae as vae_mod

        px = images.pil_to_tensor(cache_mod.crop_resize(images.to_pil(path), w, h))
        return vae_mod.encode(self.vae, px)[0].float().cpu()

    def __call__(self, sample, rng: random.Random, allowed=None) -> Example:
        """``allowed``: the sample's :func:`cache.variant_budget` entry (``None``: no limit)."""
        c = self.cfg
        drawn = cache_mod.within_budget(cache_mod.draw_variant(sample, c.sia, rng), allowed)
        variant, target, pics = drawn.variant, drawn.target, drawn.variant.pictures
        cond = self.cache.get_text(cache_mod.text_key(variant, model_id=self.mid, vl_resolution=c.data.vl_resolution))
        sizes = {sample.target: sample.target_size, **dict(zip(sample.sources, sample.source_sizes))}
        tw, th = target_size(sizes[target], c.data.resolution)
        x0 = latents.pack(self.latent(target, tw, th).unsqueeze(0))[0]
        shapes = [latents.token_grid(th, tw)]
        refs = []
        for p in pics:
            rw, rh = target_size(sizes[p], c.data.ref_resolution)
            refs.append(latents.pack(self.latent(p, rw, rh).unsqueeze(0))[0])
            shapes.append(latents.token_grid(rh, rw))
        ex = Example(x0, torch.cat(refs, 0) if refs else None, cond, shapes)
        if consistency_source(c, sizes, drawn):
            src = self.latent(pics[0], tw, th)
            tgt = latents.unpack(x0.unsqueeze(0), src.shape[-2], src.shape[-1])[0]
            keep = auto_keep_mask(src, tgt, c.objective.consistency_threshold).expand_as(src)
            ex.src = latents.pack(src.unsqueeze(0).float())[0]
            ex.keep = latents.pack(keep.unsqueeze(0))[0]
        return ex


def predict_velocity(model, x_t, sigma, refs, texts, img_shapes, dtype):
    """The MM-DiT's velocity for target tokens ``x_t`` ``[B, N, 64]``, one text and one set of
    references per row: the inference :class:`firered_core.sampling.denoiser.Denoiser`'s own call
    (:func:`~firered_core.sampling.denoiser.transformer_velocity`)."""
    embeds, mask = batch_texts([t.to(x_t.device, dtype) for t in texts])
    return transformer_velocity(model, x_t, sigma, embeds, mask, img_shapes, dtype, refs)


def batch_loss_backward(model, examples: list[Example], *, accelerator, cfg: StageConfig, sched_cfg, step: int,
                        micro: int, dtype, positions: list[int] | None = None) -> float:
    """Loss of one micro-batch, back-propagated group by group (examples whose token layout
    differs after SIA run as separate forwards); returns the batch's mean loss. ``positions``:
    the examples' places in the global batch (default: rank x batch + j), which key their
    timestep and noise draws (see the module docstring)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if positions is None:
        positions = [rank * len(examples) + j for j in range(len(examples))]
    n_global = len(examples) * world
    gens = [torch.Generator().manual_seed(seed_of(cfg.seed, "noise", step, micro, g)) for g in positions]
    u = torch.cat([stratified_uniform(1, rank=g % n_global, world_size=n_global, step=step * cfg.grad_accum + micro,
                                      generator=gen) for g, gen in zip(positions, gens)])
    groups: dict[tuple, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.shape_key, []).append(i)
    total, dev = 0.0, accelerator.device
    for gi, idx in enumerate(groups.values()):
        exs = [examples[i] for i in idx]
        x0 = torch.stack([e.x0 for e in exs]).float()
        eps = torch.stack([torch.randn(x0.shape[1:], generator=gens[i]) for i in idx])
        sigma = training_sigmas(u[idx], image_seq_len=x0.shape[1], config=sched_cfg)
        x_t = flow.add_noise(x0, eps, sigma)
        refs = torch.stack([e.refs for e in exs]).to(dev) if exs[0].refs is not None else None
        last = gi == len(groups) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                v = predict_velocity(model, x_t.to(dev), sigma.to(dev), refs, [e.text for e in exs], exs[0].img_shapes, dtype)
            loss = flow_matching_loss(v, x0.to(dev), eps.to(dev), sigma.to(dev), weighting=cfg.objective.weighting,
                                      clip=cfg.objective.clip or None)
            sel = [k for k, e in enumerate(exs) if e.src is not None]
            if cfg.objective.consistency_weight > 0 and sel:
                # mean over the group's samples; those without a usable source contribute 0
                c = consistency_term(x_t[sel], v[sel], sigma[sel], torch.stack([exs[k].src for k in sel]),
                                     torch.stack([exs[k].keep for k in sel]), cfg.objective.consistency_weight)
                loss = loss + c.sum() / len(exs)
            accelerator.backward(loss * (len(exs) / len(examples)))
        total += loss.detach().item() * len(exs) / len(examples)
    return total


@torch.no_grad()
def eval_loss(model, examples: list[Example], *, sched_cfg, dtype, device, sigmas=(0.25, 0.5, 0.75), seed: int = 0) -> float:
    """Velocity MSE on fixed examples at fixed sigmas with fixed noise: a loss that only changes
    when the model does (the training loss also moves with the random timesteps)."""
    gen = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for ex in examples:
        x0 = ex.x0.unsqueeze(0).float()
        for s in sigmas:
            eps = torch.randn(x0.shape, generator=gen)
            sigma = torch.tensor([s])
            x_t = flow.add_noise(x0, eps, sigma)
            refs = ex.refs.unsqueeze(0).to(device) if ex.refs is not None else None
            v = predict_velocity(model, x_t.to(device), sigma.to(device), refs, [ex.text], ex.img_shapes, dtype)
            total += flow_matching_loss(v, x0.to(device), eps.to(device), sigma.to(device), clip=None).item()
            n += 1
    return total / max(n, 1)
