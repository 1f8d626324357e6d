"""The data side of an SFT / pretrain run: the dataset, the SIA draws the run will make (planned
before the first step, keyed by step and position), and the frozen encoders' features for exactly
those draws, cached on disk (:mod:`firered_trainer.cache`)."""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

from firered_core.model.images import fit_to_area

from . import cache as cache_mod
from .buckets import BucketBatchSampler, aspect_bucket
from .config import DatasetEntry, StageConfig
from .data import LoadReport, load_dataset
from .objective import seed_of

log = logging.getLogger(__name__)


def load_data(cfg: StageConfig):
    """(samples, dataset names, dataset weights, report) of every configured dataset."""
    entries = cfg.data.mix or [DatasetEntry(path=cfg.data.jsonl)]
    report = LoadReport()
    samples, weights = [], {}
    for e in entries:
        ds = load_dataset(e.path, dataset=e.name or None, max_bad=cfg.data.max_bad, report=report)
        samples.extend(ds)
        weights[ds[0].dataset] = e.weight
    report.loaded = len(samples)
    return samples, [s.dataset for s in samples], weights, report


def _fingerprint(folder: Path) -> str:
    """A cheap content fingerprint of a model part (config + head and tail of each weight file)."""
    h = hashlib.sha256()
    files = sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            size = f.stat().st_size
            if size > 1 << 20:
                fh.seek(max(size - (1 << 20), 1 << 20))
                h.update(fh.read())
    return h.hexdigest()[:16]


def part_path(cfg: StageConfig, part: str) -> Path:
    given = getattr(cfg.model, part, "")
    if given:
        return Path(given)
    if not cfg.model.path:
        raise ValueError(f"model.path: no model folder (and no model.{part} file) given")
    return Path(cfg.model.path) / part


def model_id(cfg: StageConfig) -> str:
    name = cfg.model.id or Path(cfg.model.path or cfg.model.transformer).name
    return f"{name}:{_fingerprint(part_path(cfg, 'text_encoder'))}:{_fingerprint(part_path(cfg, 'vae'))}"


def target_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """Training size of a picture of ``size``: about ``resolution^2`` pixels at its aspect bucket."""
    return fit_to_area(resolution**2, aspect_bucket(*size))


def latent_jobs(sample, drawn: cache_mod.Drawn, cfg: StageConfig) -> list[tuple[str, int, int]]:
    """The ``(path, width, height)`` latents one draw of the sample reads (see :class:`Collator`)."""
    sizes = {sample.target: sample.target_size, **dict(zip(sample.sources, sample.source_sizes))}
    target, pics = drawn.target, drawn.variant.pictures
    jobs = [(target, *target_size(sizes[target], cfg.data.resolution))]
    jobs.extend((p, *target_size(sizes[p], cfg.data.ref_resolution)) for p in pics)
    if consistency_source(cfg, sizes, drawn):
        # the consistency loss compares x0_hat with the source at the target's training size
        jobs.append((pics[0], *target_size(sizes[target], cfg.data.resolution)))
    return list(dict.fromkeys(jobs))


def consistency_source(cfg: StageConfig, sizes: dict, drawn: cache_mod.Drawn) -> bool:
    """Whether the consistency loss applies to a draw: only a single source picture of the
    target's size has cell-by-cell correspondence with the target (several sources, or another
    size / aspect: no term)."""
    pics = drawn.variant.pictures
    return (cfg.objective.consistency_weight > 0 and len(drawn.sources) == 1 and len(pics) == 1
            and sizes[pics[0]] == sizes[drawn.target])


EVAL_SAMPLES = 4  # the fixed evaluation set: the first samples


def sia_rng(cfg: StageConfig, step: int, micro: int, position: int) -> random.Random:
    """The SIA generator of the sample at ``position`` of the global batch of ``micro`` at ``step``."""
    return random.Random(seed_of(cfg.seed, "sia", step, micro, position))


def eval_rng(cfg: StageConfig, k: int) -> random.Random:
    return random.Random(seed_of(cfg.seed, "eval", k))


def planned_draws(cfg: StageConfig, samples, sampler: BucketBatchSampler) -> list[tuple[int, cache_mod.Drawn]]:
    """Every ``(sample index, SIA draw)`` the run makes -- the fixed evaluation examples, then steps
    0 .. max_steps-1 of every process -- known before it starts: the draws are keyed by seed,
    step, micro-batch and position, and the sampler's order is fixed by its seed. The feature
    cache holds these and nothing else."""
    out = [(k, cache_mod.draw_variant(s, cfg.sia, eval_rng(cfg, k))) for k, s in enumerate(samples[:EVAL_SAMPLES])]
    batches = sampler.preview(cfg.max_steps * cfg.grad_accum)
    for step in range(cfg.max_steps):
        for micro in range(cfg.grad_accum):
            b = next(batches)
            out.extend((i, cache_mod.draw_variant(samples[i], cfg.sia, sia_rng(cfg, step, micro, g)))
                       for g, i in enumerate(b.all_indices))
    return out


def validation_variants(cfg: StageConfig) -> tuple[list, list]:
    pos = [cache_mod.TextVariant(tuple(p.pictures), p.prompt) for p in cfg.validation.prompts]
    neg = [cache_mod.TextVariant(tuple(p.pictures), " ") for p in cfg.validation.prompts]
    return pos, neg


def extract_features(cfg: StageConfig, samples, accelerator, feature_cache, mid: str, dtype, vae,
                     draws: list[tuple[int, cache_mod.Drawn]]) -> dict[str, float]:
    """Fill the cache with what the run's ``draws`` (:func:`planned_draws`) read -- texts, and
    latents when configured -- split across processes; the text encoder is loaded only when
    something is missing and freed afterwards. Returns :func:`cache.size_report` of the draws
    (logged on the main process)."""
    from firered_core.formats.text_encoder_files import find_processor, load_text_encoder
    from firered_core.model import conditioning
    from firered_core.model import vae as vae_mod

    rank, world = accelerator.process_index, accelerator.num_processes
    pos, neg = validation_variants(cfg)
    vl = cfg.data.vl_resolution
    variants = list(dict.fromkeys([d.variant for _, d in draws] + pos + neg))
    mine = variants[rank::world]
    if any(not feature_cache.has("text", cache_mod.text_key(v, model_id=mid, vl_resolution=vl)) for v in mine):
        te_path = part_path(cfg, "text_encoder")
        processor = find_processor(tokenizer_dir=cfg.model.tokenizer or None, model_dir=Path(cfg.model.path) if cfg.model.path else None)
        te = load_text_encoder(te_path, dtype=dtype, device=accelerator.device, processor=processor).eval()

        def encode(text, pics):
            return conditioning.encode_prompt(te, processor, text, pics, dtype=dtype)

        stats = cache_mod.extract_texts(mine, feature_cache, encode, model_id=mid, vl_resolution=vl)
        log.info("rank %d: %d of %d text variants encoded", rank, stats["encoded"], stats["total"])
        del te
    # the latents each distinct draw reads (a run repeats draws: computed once per draw)
    distinct = list(dict.fromkeys(draws))
    jobs_of = {x: latent_jobs(samples[x[0]], x[1], cfg) for x in distinct} if cfg.data.cache_latents else {}
    if jobs_of:
        jobs = list(dict.fromkeys(j for js in jobs_of.values() for j in js))
        cache_mod.extract_latents(jobs[rank::world], feature_cache, lambda px: vae_mod.encode(vae, px), model_id=mid)
    accelerator.wait_for_everyone()
    per_sample: dict[int, dict[cache_mod.TextVariant, set]] = {}
    for i, d in distinct:
        entries = {("text", cache_mod.text_key(d.variant, model_id=mid, vl_resolution=vl))}
        entries |= {("latents", cache_mod.latent_key(p, w, h, model_id=mid)) for p, w, h in jobs_of.get((i, d), ())}
        per_sample.setdefault(i, {})[d.variant] = entries
    report = cache_mod.size_report(feature_cache, {i: list(v.values()) for i, v in per_sample.items()})
    eager = sum(cache_mod.possible_variants(samples[i], cfg.sia) for i in per_sample) / max(len(per_sample), 1)
    report["variants_per_sample"] = sum(len(v) for v in per_sample.values()) / max(len(per_sample), 1)
    report["possible_per_sample"] = eager
    if accelerator.is_main_process:
        log.info("feature cache: %d samples drawn, %.1f text variants each (of %.1f possible), %.3f MB per sample = "
                 "%.2fx one variant's %.3f MB (largest %.2fx)", report["samples"], report["variants_per_sample"], eager,
                 report["per_sample"] / 1e6, report["ratio"], report["variant"] / 1e6, report["max_ratio"])
    return report
