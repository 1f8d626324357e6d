"""The DPO stage with Asymmetric Gradient Optimization (FireRed report section 3.6.1, eq. 2).

Launch::

    python -m firered_trainer dpo --config firered_trainer/configs/dpo_lora.yaml data.jsonl=prefs.jsonl output_dir=runs/dpo

Data: JSONL, one preference pair a line (paths relative to the file)::

    {"source_image": "src/001.png", "instruction": "make the sky pink",
     "preferred": "win/001.png", "rejected": "lose/001.png"}

Each step: a batch of pairs; both edits of a pair are VAE-encoded (cached), noised with the *same*
sigma and noise; the policy's and the reference's velocity errors give
:func:`firered_trainer.rl.losses.dpo_loss` (beta, omega, lam); one optimizer step. The **reference** is
the base with the LoRA switched off, so no second model is held (full fine-tuning keeps a frozen
copy). The report trains 5K steps with 500 warm-up steps at 1024^2 with AdamW (0.9, 0.999),
weight decay 0.01 and clip 1 (Table 1): those are the defaults here except the step count
(1000) and the size (512^2); beta / omega / lam are not published (see :mod:`firered_trainer.rl.losses`
for the defaults chosen). Every random draw comes from a generator seeded by ``(seed, step)`` and,
for a pair's timestep and noise, its place in the step's global batch, so a resumed run continues
the same curve. Under ``accelerate launch`` / ``torchrun`` all processes draw the same global batch
of ``batch_size x N`` pairs, each trains on its slice, and gradients are averaged before the step:
N processes at batch b train what one process at batch N x b trains (a 2-process test compares the
LoRA).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from ..config import StageConfig
from . import common, losses


class DPORun:
    """One DPO run's state (editor, policy, cached encodings, optimizer)."""

    def __init__(self, cfg: StageConfig, *, editor=None):
        from firered_core.pipeline import EditRequest

        from ..optim import build_optimizer
        from .nft import _device, _dist

        self.cfg = cfg
        self.rank, self.world = _dist()
        self.pairs = common.read_preferences(cfg.data.jsonl, max_bad=cfg.data.max_bad)  # before the model: bad data is reported at once
        self.editor = editor or common.load_editor(cfg, _device(cfg.device))
        tr = self.editor.c.transformer
        self.policy = common.Policy(tr, lora_rank=common.lora_rank(cfg), lora_alpha=cfg.lora.alpha, targets=cfg.lora_modules(), need_reference=True, seed=cfg.seed)
        for p in self.policy.parameters():
            p.data = p.data.float()
        if cfg.model.gradient_checkpointing and hasattr(tr, "enable_gradient_checkpointing"):
            tr.enable_gradient_checkpointing()
        self.opt = build_optimizer(cfg.optim.name, self.policy.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / max(cfg.optim.warmup_steps, 1)))
        self.req = EditRequest(prompt="-", cfg=1.0, width=cfg.dpo.width, height=cfg.dpo.height, ref_area=cfg.data.ref_resolution ** 2,
                               vl_area=cfg.data.vl_resolution ** 2, negative_prompt=None)
        self._cache: dict[int, tuple] = {}
        self.step = 0

    @torch.no_grad()
    def encoded(self, i: int):
        """(EncodedEdit, preferred tokens [1, N, 64], rejected tokens) of pair ``i``, computed once."""
        if i not in self._cache:
            from firered_core.model import images, latents
            from firered_core.model import vae as vae_mod

            s = self.pairs[i]
            enc = self.editor.encode([s.source] if s.source else None, dataclasses.replace(self.req, prompt=s.instruction))
            w, h = enc.size

            def lat(path):
                px = images.pil_to_tensor(images.resize(images.to_pil(path), w, h))
                return latents.pack(vae_mod.encode(self.editor.c.vae, px)).float()

            self._cache[i] = (enc, lat(s.preferred), lat(s.rejected))
        return self._cache[i]

    def errors(self, i: int, sigma: torch.Tensor, eps: torch.Tensor, *, reference: bool = False):
        """Velocity errors ``[2]`` (preferred, rejected) of the policy (or the reference) on pair ``i``
        noised to ``sigma`` with the shared noise ``eps`` ``[1, N, 64]``."""
        from firered_core.sampling import flow
        from firered_core.sampling.denoiser import Denoiser

        enc, zw, zl = self.encoded(i)
        x0 = torch.cat([zw, zl]).to(self.editor.device)
        e = eps.expand_as(x0).to(x0.device)
        s2 = sigma.reshape(1).expand(2).to(x0.device)
        xt = flow.add_noise(x0, e, flow.broadcast_sigma(s2, x0)).to(self.editor.dtype)
        tr = self.editor.c.transformer
        if reference:
            with torch.no_grad(), self.policy.reference() as ref:
                v = Denoiser(ref, enc.cond).predict(xt, s2, [enc.positive])[0]
        else:
            v = Denoiser(tr, enc.cond).predict(xt, s2, [enc.positive])[0]
        return losses.velocity_errors(v, x0, e)

    def draw(self, i: int, gen: torch.Generator):
        from ..objective import training_sigmas

        _, zw, _ = self.encoded(i)
        u = torch.rand(1, generator=gen, dtype=torch.float64).float() * 0.99 + 0.005
        sigma = training_sigmas(u, image_seq_len=zw.shape[1], config=self.editor.c.scheduler_config)
        return sigma, torch.randn(zw.shape, generator=gen)

    def iteration(self) -> dict:
        cfg = self.cfg
        # one global batch of batch_size x world pairs drawn alike on every process; this process
        # takes its slice, and each pair's timestep and noise are keyed by its place in the global
        # batch (not the rank): N processes at batch b compute what one process at batch N x b does
        from ..objective import seed_of

        gen = torch.Generator().manual_seed(seed_of(cfg.seed, "pairs", self.step))
        everyone = torch.randint(0, len(self.pairs), (cfg.data.batch_size * self.world,), generator=gen).tolist()
        first = self.rank * cfg.data.batch_size
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        agg: dict[str, float] = {}
        for pos in range(first, first + cfg.data.batch_size):
            i = everyone[pos]
            sigma, eps = self.draw(i, torch.Generator().manual_seed(seed_of(cfg.seed, "noise", self.step, pos)))
            ref = self.errors(i, sigma, eps, reference=True)
            pol = self.errors(i, sigma, eps)
            loss, st = losses.dpo_loss(pol[:1], pol[1:], ref[:1], ref[1:], beta=cfg.dpo.beta, omega=cfg.dpo.omega, lam=cfg.dpo.lam)
            (loss / cfg.data.batch_size).backward()  # averaged over the processes below: the global batch's mean
            for k, v in dataclasses.asdict(st).items():
                agg[k] = agg.get(k, 0.0) + v / cfg.data.batch_size
        norm = common.average_and_clip(self.policy.parameters(), self.world, cfg.optim.grad_clip)
        if norm is not None:
            agg["grad_norm"] = norm
        agg["lr"] = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.step += 1
        return {"step": self.step, **{k: round(v, 6) for k, v in agg.items()}, "t_step": time.perf_counter() - t0}

    def state(self) -> dict:
        return {"step": self.step, "policy": self.policy.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "rng": common.rng_state(), "config": self.cfg.to_dict()}

    def load(self, state: dict) -> None:
        self.step = int(state["step"])
        self.policy.load_state_dict(state["policy"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        common.set_rng_state(state["rng"])


def run(
    config: StageConfig | str | dict,
    *,
    overrides=None,
    progress: Callable[[int, int, dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    editor=None,
) -> dict:
    """Train with DPO-AGO; returns ``{"lora": path, "steps": n, "curve": path, "run": DPORun}``.

    ``progress(step, total, metrics)`` after every step; ``should_stop()`` polled before each step
    (a stop saves a checkpoint first)."""
    cfg = common.stage_config("dpo", config, overrides)
    return common.run_stage(cfg, lambda: DPORun(cfg, editor=editor), stage="dpo", curve_keys=("loss", "win_diff", "lose_diff"),
                            progress=progress, should_stop=should_stop)


def show_progress(step: int, total: int, row: dict) -> None:
    """One line per step on the command line (``python -m firered_trainer dpo``)."""
    print(f"step {step}/{total} loss {row['loss']:.4f} acc {row['accuracy']:.2f} "
          f"win {row['win_diff']:+.2e} lose {row['lose_diff']:+.2e}", flush=True)
