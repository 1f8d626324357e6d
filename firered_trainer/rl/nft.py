"""The DiffusionNFT stage (FireRed report section 3.6.2): online RL on the forward process.

Launch::

    python -m firered_trainer nft --config firered_trainer/configs/nft_ocr_lora.yaml output_dir=runs/nft optim.lr=1e-4
    accelerate launch -m firered_trainer nft --config ...          # see "Scale-out" below

Each iteration (one optimizer step):

1. **Rollouts** -- for ``prompts_per_step`` prompts, ``group_size`` edits each, sampled by the core
   samplers (:mod:`firered_core.sampling.samplers`, any solver, the Lightning schedule included) at CFG 1
   with the **old policy** (an EMA of the trained weights). Only the clean latents are kept.
2. **Rewards** -- decoded pictures scored by :func:`firered_trainer.rl.rewards.build_reward`, standardised
   per prompt group and mapped to optimality probabilities ``r`` in [0, 1].
3. **Update** -- for each rollout a fresh ``sigma`` (:func:`train_sigmas`) and fresh noise; the
   trained, old and reference velocities at ``x_sigma`` give :func:`firered_trainer.rl.losses.nft_loss`;
   one AdamW step; the old policy moves toward the trained one by
   :func:`firered_trainer.rl.losses.old_policy_decay`.

Defaults are DiffusionNFT's published SD3.5 settings -- ``nft_beta`` 1.0 (use 0.1 for OCR, as
``nft_ocr_lora.yaml`` does), KL 1e-4, LoRA r32 / alpha 64 with Gaussian init, lr 3e-4, weight decay
1e-4, grad clip 1, advantages clipped at 5, old-policy decay "ramp" ("ocr" for OCR), and the KL
to the reference on velocities, ``kl_weight * |v_theta - v_ref|^2``, as the released code has it.

Departures, each stated:

* **Where it trains in sigma** (``train_timesteps``). DiffusionNFT's released code draws each
  training timestep from the sampler's own grid (the first ``timestep_fraction`` = 0.99 of its
  steps), with fresh noise. The default here, ``shift``, draws a fresh sigma from the training
  shift of :func:`firered_trainer.objective.training_sigmas` (the distribution SFT trains on)
  instead: an edit rollout has 8-10 steps, so the grid is only 8-10 values, and with the
  Lightning schedule most of them lie near sigma 1. ``train_timesteps: sampler`` is the released
  behaviour.
* one optimizer step per iteration over all rollouts (no inner epochs);
* the default solver is the pack's Euler (DiffusionNFT: DPM2), 10 steps;
* groups of 8 (DiffusionNFT: 24), because an edit rollout at 1024^2 costs far more than SD3.5 at
  512^2.

The **reference** for the KL is the base with the LoRA switched off (full fine-tuning keeps a frozen
copy). Everything random is drawn from generators seeded by ``(seed, step)`` and a group's place
in the step, so a run resumed from a checkpoint continues the same curve.

**Scale-out**: under ``accelerate launch`` / ``torchrun`` every process draws the same
``prompts_per_step x N`` prompts and rolls out its slice of them, each group's draws keyed by its
place (not the rank), and gradients are averaged over processes with ``torch.distributed`` before
the step (the LoRA is small: one all-reduce of its gradients). N processes thus train what one
process with N times ``prompts_per_step`` trains (a 2-process test compares the LoRA).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch

from ..config import StageConfig
from . import common, losses, rewards

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def train_sigmas(n: int, gen: torch.Generator, *, mode: str, grid: torch.Tensor, image_seq_len: int,
                 scheduler_config=None, timestep_fraction: float = 0.99) -> torch.Tensor:
    """``n`` training sigmas ``[n]`` for the NFT update.

    ``mode="shift"``: fresh values from the training shift (``u`` uniform in [0.005, 0.995]
    through :func:`firered_trainer.objective.training_sigmas`). ``mode="sampler"`` (DiffusionNFT's
    released behaviour): each one of the first ``max(1, int(steps * timestep_fraction))`` sigmas
    of the rollout's own descending ``grid`` (``steps + 1`` values ending in 0), uniformly."""
    if mode == "sampler":
        steps = len(grid) - 1
        k = max(1, int(steps * timestep_fraction))
        pick = torch.randint(0, k, (n,), generator=gen)
        return grid[:k].float().cpu()[pick]
    from ..objective import training_sigmas

    u = torch.rand(n, generator=gen, dtype=torch.float64).float() * 0.99 + 0.005
    return training_sigmas(u, image_seq_len=image_seq_len, config=scheduler_config)


# ---------------------------------------------------------------------------------------------
# Setup helpers
# ---------------------------------------------------------------------------------------------


def _device(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def _dist():
    """``(rank, world_size)``; under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE`` > 1) the
    process group is started here (NCCL on GPUs, Gloo on the CPU)."""
    d = torch.distributed
    if d.is_available() and not d.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        d.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def _source_pixels(path: str | None, size: tuple[int, int]) -> torch.Tensor | None:
    if path is None:
        return None
    from firered_core.model import images

    w, h = size
    return images.pil_to_tensor(images.resize(images.to_pil(path), w, h)).squeeze(0).permute(1, 2, 0).add(1).div(2)


class NFTRun:
    """One NFT run's state: the editor, the policy, the encoded prompts, the optimizer.

    Split so the benchmark (``bench/nft_cost.py``) and the ComfyUI node time and drive the same
    iteration as :func:`run`."""

    def __init__(self, cfg: StageConfig, *, editor=None, encoded=None):
        from firered_core.pipeline import EditRequest

        from ..optim import build_optimizer

        self.cfg = cfg
        self.rank, self.world = _dist()
        dev = _device(cfg.device)
        self.prompts = common.read_prompts(cfg.data.jsonl, max_bad=cfg.data.max_bad)  # before the model: bad data is reported at once
        self.editor = editor or common.load_editor(cfg, dev)
        self.reward_fn = rewards.build_reward(cfg.nft.reward)
        tr = self.editor.c.transformer
        self.policy = common.Policy(
            tr, lora_rank=common.lora_rank(cfg), lora_alpha=cfg.lora.alpha, targets=cfg.lora_modules(), need_reference=cfg.nft.kl_weight > 0, keep_old=True, seed=cfg.seed
        )
        for p in self.policy.parameters():  # float32 master weights for the trained part
            p.data = p.data.float()
        self.policy.old = {n: p.detach().float().clone() for n, p in self.policy.trainable()}
        if cfg.model.gradient_checkpointing and hasattr(tr, "enable_gradient_checkpointing"):
            tr.enable_gradient_checkpointing()
        self.opt = build_optimizer(cfg.optim.name, self.policy.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        # the frozen text encoder runs once per prompt; the encodings are kept
        self.req = EditRequest(
            prompt="-", cfg=1.0, steps=cfg.nft.sample_steps, width=cfg.nft.width, height=cfg.nft.height, sampler=cfg.nft.sampler,
            schedule=cfg.nft.schedule, ref_area=cfg.data.ref_resolution ** 2, vl_area=cfg.data.vl_resolution ** 2, negative_prompt=None,
        )  # fmt: skip
        self.encoded = list(encoded) if encoded is not None else []
        with torch.no_grad():
            for s in self.prompts[len(self.encoded):]:
                pics = [s.source] if s.source else None
                self.encoded.append(self.editor.encode(pics, dataclasses.replace(self.req, prompt=s.instruction)))
        self.step = 0

    # -- one iteration -------------------------------------------------------------------------

    def _generator(self, *parts) -> torch.Generator:
        """A generator keyed by the run's seed and ``parts`` (never the rank; see :meth:`iteration`)."""
        from ..objective import seed_of

        return torch.Generator().manual_seed(seed_of(self.cfg.seed, *parts))

    def _initial_noise(self, enc, n: int, gen: torch.Generator) -> torch.Tensor:
        w, h = enc.size
        z = torch.randn(n, 16, h // 8, w // 8, generator=gen)
        from firered_core.model import latents

        return latents.pack(z).to(self.editor.device, self.editor.dtype)

    @torch.no_grad()
    def rollout(self, idx: int, n: int, gen: torch.Generator, *, old: bool = True) -> torch.Tensor:
        """``n`` clean latents (packed ``[n, N, 64]``) for prompt ``idx`` at CFG 1."""
        from firered_core.sampling import samplers
        from firered_core.sampling.denoiser import Denoiser

        enc = self.encoded[idx]
        sig = self.editor.sigmas(self.req, enc.size)
        x = self._initial_noise(enc, n, gen)
        ctx = self.policy.old_policy() if old else contextlib.nullcontext()
        with ctx:
            den = Denoiser(self.editor.c.transformer, enc.cond)
            return samplers.get_sampler(self.cfg.nft.sampler)(den.model_fn(enc.positive), x, sig, generator=gen).float()

    @torch.no_grad()
    def score(self, idx: int, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded pictures ``[n, H, W, 3]`` and their rewards ``[n]``."""
        from firered_core.model import latents

        enc = self.encoded[idx]
        w, h = enc.size
        pix = self.editor.decode(latents.unpack(x0.to(self.editor.dtype), h // 8, w // 8)).float().cpu()
        s = self.prompts[idx]
        src = _source_pixels(s.source, (w, h))
        batch = rewards.RewardBatch(
            prompts=[s.instruction] * len(pix),
            sources=[src] * len(pix),
            target_texts=[s.target_text] * len(pix),
            target_boxes=[s.target_box] * len(pix),
        )
        return pix, self.reward_fn(pix, batch).float()

    def update(self, items: list[tuple[int, torch.Tensor, torch.Tensor, torch.Generator]]) -> losses.NFTStats:
        """One optimizer step on ``items`` = ``[(prompt idx, x0 [n, N, 64], r [n], generator of that
        group's training timesteps and noise)]``; gradients averaged over the processes."""
        from firered_core.sampling import flow
        from firered_core.sampling.denoiser import Denoiser

        cfg = self.cfg
        self.opt.zero_grad(set_to_none=True)
        total = sum(len(x) for _, x, _, _ in items) * cfg.nft.timesteps_per_sample
        agg: dict[str, float] = {}
        tr = self.editor.c.transformer
        for idx, x0_all, r_all, gen in items:
            enc = self.encoded[idx]
            den = Denoiser(tr, enc.cond)
            grid = self.editor.sigmas(self.req, enc.size) if cfg.nft.train_timesteps == "sampler" else None
            for _ in range(cfg.nft.timesteps_per_sample):
                for a in range(0, len(x0_all), cfg.nft.micro_batch):
                    x0 = x0_all[a : a + cfg.nft.micro_batch].to(self.editor.device)
                    r = r_all[a : a + cfg.nft.micro_batch]
                    b = len(x0)
                    sigma = train_sigmas(b, gen, mode=cfg.nft.train_timesteps, grid=grid, image_seq_len=x0.shape[1],
                                         scheduler_config=self.editor.c.scheduler_config,
                                         timestep_fraction=cfg.nft.timestep_fraction).to(x0.device)
                    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
                    xt = flow.add_noise(x0, eps, flow.broadcast_sigma(sigma, x0)).to(self.editor.dtype)
                    with torch.no_grad():
                        with self.policy.old_policy():
                            v_old = den.predict(xt, sigma, [enc.positive])[0]
                        v_ref = None
                        if cfg.nft.kl_weight > 0:
                            with self.policy.reference() as ref_tr:
                                ref_den = den if ref_tr is tr else Denoiser(ref_tr, enc.cond)
                                v_ref = ref_den.predict(xt, sigma, [enc.positive])[0]
                    v = den.predict(xt, sigma, [enc.positive])[0]
                    loss, st = losses.nft_loss(
                        v, v_old, x0, eps, sigma, r, beta=cfg.nft.beta, adv_clip_max=cfg.nft.adv_clip_max,
                        weighting=cfg.nft.weighting, v_ref=v_ref, kl_weight=cfg.nft.kl_weight,
                    )  # fmt: skip
                    (loss * (b / total)).backward()
                    for k, val in dataclasses.asdict(st).items():
                        agg[k] = agg.get(k, 0.0) + val * b / total
        norm = common.average_and_clip(self.policy.parameters(), self.world, cfg.optim.grad_clip)
        if norm is not None:
            agg["grad_norm"] = norm
        self.opt.step()
        self.policy.update_old(losses.old_policy_decay(self.step + 1, cfg.nft.old_decay))
        return agg

    def iteration(self) -> dict:
        """Rollout, reward, update; returns the step's metrics (with the time of each part)."""
        cfg = self.cfg
        # one global set of prompts_per_step x N prompts drawn alike on every process; this process
        # takes its slice, and each group's rollout and update draws are keyed by its place in the
        # global set (not the rank): N processes compute what one process with N times the prompts
        # computes (the optimality probabilities are per group, so they do not cross processes)
        everyone = torch.randint(0, len(self.prompts), (cfg.nft.prompts_per_step * self.world,),
                                 generator=self._generator("prompts", self.step)).tolist()
        mine = range(self.rank * cfg.nft.prompts_per_step, (self.rank + 1) * cfg.nft.prompts_per_step)
        idxs = [everyone[p] for p in mine]
        gens = [self._generator("group", self.step, p) for p in mine]
        t0 = time.perf_counter()
        x0s = [self.rollout(i, cfg.nft.group_size, g) for i, g in zip(idxs, gens)]
        t1 = time.perf_counter()
        scores = [self.score(i, x)[1] for i, x in zip(idxs, x0s)]
        t2 = time.perf_counter()
        allr = torch.cat(scores)
        groups = torch.arange(len(idxs)).repeat_interleave(cfg.nft.group_size)
        r = losses.optimality_probability(allr, groups, adv_clip_max=cfg.nft.adv_clip_max)
        items = [(i, x, r[k * cfg.nft.group_size : (k + 1) * cfg.nft.group_size], g)
                 for k, (i, x, g) in enumerate(zip(idxs, x0s, gens))]
        st = self.update(items)
        t3 = time.perf_counter()
        self.step += 1
        row = {"step": self.step, "reward": float(allr.mean()), "reward_std": float(allr.std(unbiased=False))}
        row.update({k: round(v, 6) for k, v in st.items()})
        row.update(t_rollout=t1 - t0, t_reward=t2 - t1, t_update=t3 - t2)
        return row

    @torch.no_grad()
    def validate(self, seeds: int | None = None) -> tuple[float, torch.Tensor]:
        """Mean reward of fresh samples of the *trained* policy over every prompt at fixed seeds."""
        n = seeds or self.cfg.nft.validation_seeds
        vals, pics = [], []
        for i in range(len(self.prompts)):
            gen = torch.Generator().manual_seed(10_000 + i)
            pix, s = self.score(i, self.rollout(i, n, gen, old=False))
            vals.append(s)
            pics.append(pix)
        return float(torch.cat(vals).mean()), torch.cat(pics)

    # -- state ---------------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "step": self.step,
            "policy": self.policy.state_dict(),
            "optimizer": self.opt.state_dict(),
            "rng": common.rng_state(),
            "config": self.cfg.to_dict(),
        }

    def load(self, state: dict) -> None:
        self.step = int(state["step"])
        self.policy.load_state_dict(state["policy"])
        self.opt.load_state_dict(state["optimizer"])
        common.set_rng_state(state["rng"])


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def run(
    config: StageConfig | str | dict,
    *,
    overrides=None,
    progress: Callable[[int, int, dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    editor=None,
    encoded=None,
) -> dict:
    """Train with DiffusionNFT; returns ``{"lora": path, "steps": n, "curve": path, ...}``.

    ``config``: a :class:`firered_trainer.config.StageConfig` (stage nft), a YAML path, or a dict of options. ``progress(step, total,
    metrics)`` is called after every step; ``should_stop()`` is polled before each step (a stop
    saves a checkpoint first). ``editor``: an already loaded :class:`firered_core.FireRedEditor`;
    ``encoded``: the prompts' :class:`firered_core.pipeline.EncodedEdit` from an earlier run.
    """
    cfg = common.stage_config("nft", config, overrides)

    def validate(nr, row, is_main):
        if cfg.validation.every and nr.step % cfg.validation.every == 0:
            row["val_reward"], pics = nr.validate()
            if is_main:
                _save_grid(pics, Path(cfg.output_dir) / "validation" / f"step_{nr.step}.png")

    return common.run_stage(cfg, lambda: NFTRun(cfg, editor=editor, encoded=encoded), stage="nft",
                            curve_keys=("reward", "val_reward", "loss", "kl"), progress=progress,
                            should_stop=should_stop, after_step=validate)


def _save_grid(pics: torch.Tensor, path: Path) -> None:
    from PIL import Image

    n = len(pics)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    h, w = pics.shape[1:3]
    grid = torch.ones(rows * h, cols * w, 3)
    for k in range(n):
        grid[(k // cols) * h : (k // cols + 1) * h, (k % cols) * w : (k % cols + 1) * w] = pics[k]
    img = Image.fromarray((grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    common.atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def show_progress(step: int, total: int, row: dict) -> None:
    """One line per step on the command line (``python -m firered_trainer nft``)."""
    print(f"step {step}/{total} reward {row['reward']:.4f} loss {row['loss']:.4f} "
          f"(rollout {row['t_rollout']:.1f}s reward {row['t_reward']:.1f}s update {row['t_update']:.1f}s)", flush=True)
