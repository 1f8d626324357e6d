"""The on-disk feature cache: frozen Qwen2.5-VL embeddings (and VAE latents) computed once, so a
training step never runs the 7B encoder.

Keys are content hashes, so a cache folder is shared by later runs and other datasets:

* text: sha256 of the ordered pictures' bytes, the instruction as the model reads it (after
  stochastic instruction alignment), the chat template (text + tokens dropped), the VL area and
  the model id;
* latents: sha256 of one picture's bytes, the size it is encoded at and the model id.

Entries are ``<root>/<kind>/<k[:2]>/<k>.safetensors``, each written to a temporary file and
renamed into place (``os.replace``), so an interrupted extraction leaves only whole entries and a
rerun does the missing ones. Training prompts are built by :func:`firered_core.model.conditioning.encode_prompt`
itself -- the inference template with its ``Picture N:`` blocks.

Only the variants a run draws are encoded. Stochastic instruction alignment can show a
3-picture sample in 45 ways (:func:`text_variants`: English / Chinese / empty, times the 15
orders and drops of its pictures) -- encoding them all costs 45 Qwen2.5-VL passes and ~150 MB
per sample at release size (``bench/sia_cache_size.py``), while a run of E epochs shows each
sample about E times. Every draw
of a run is a pure function of (seed, step, micro-batch, position in the global batch) and of the
sampler's deterministic order, so the trainer lists them before it starts
(:func:`firered_trainer.features.planned_draws`, :func:`draw_variant`) and extracts exactly those: a
sample drawn d times holds at most d text entries (one text entry per distinct variant drawn)
and its latents once per picture and size. A resumed run plans the same draws (nothing new is
encoded); a run given more steps encodes the new draws at its start; training itself never needs
the text encoder. :func:`size_report` gives the cache bytes per sample against one variant's.
A sample shown E times holds up to E text entries; ``data.cache_variants = k`` bounds that at k
for runs of many epochs (:func:`variant_budget`: the first k distinct draws of the plan; a later
draw outside them is replaced by one of them).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from PIL import Image

from firered_core.model import images
from firered_core.model.conditioning import TextCond, template_for

from . import sia as sia_mod


@dataclass(frozen=True)
class TextVariant:
    """One way a sample is shown to the model: ``pictures`` (paths, in order) and the instruction
    ``text`` as rendered (renumbered for that order)."""

    pictures: tuple[str, ...]
    text: str


_DIGESTS: dict[tuple[str, float, int], str] = {}


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (memoised by path, mtime and size)."""
    st = os.stat(path)
    k = (str(path), st.st_mtime, st.st_size)
    d = _DIGESTS.get(k)
    if d is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        d = _DIGESTS[k] = h.hexdigest()
    return d


def _hash(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def text_key(variant: TextVariant, *, model_id: str, vl_resolution: int) -> str:
    tpl = template_for(len(variant.pictures))
    # v2: the picture tokens' 2-D M-RoPE positions (conditioning.picture_token_types); a v1 entry
    # was encoded with 1-D positions under transformers 5 and is not reused
    return _hash("text/v2", model_id, str(vl_resolution), tpl.text, str(tpl.drop_tokens), variant.text,
                 *[file_digest(p) for p in variant.pictures])


def latent_key(path: str, width: int, height: int, *, model_id: str) -> str:
    return _hash("latent/v1", model_id, f"{width}x{height}", file_digest(path))


class FeatureCache:
    """A folder of cached tensors keyed by content (see the module docstring)."""

    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def has(self, kind: str, key: str) -> bool:
        return self.path(kind, key).is_file()

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        p = self.path(kind, key)
        if not p.is_file():
            raise KeyError(f"{kind} entry {key[:12]}... is not in the cache {self.root}: extract features first")
        return load_file(str(p))

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
        from safetensors.torch import save_file

        p = self.path(kind, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{key[:12]}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return p

    def get_text(self, key: str) -> TextCond:
        return TextCond(self.get("text", key)["embeds"].unsqueeze(0))

    def get_latent(self, key: str) -> torch.Tensor:
        return self.get("latents", key)["z"]


# ---------------------------------------------------------------------------------------------
# which texts and latents a sample needs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drawn:
    """One SIA draw of a sample: the ``variant`` the model is shown (pictures in order, the
    renumbered text), the instruction's ``sources`` before shuffle and drop, and the ``target``
    (paths; an inverse edit swaps source and target)."""

    variant: TextVariant
    sources: tuple[str, ...]
    target: str


def draw_variant(sample, sia, rng) -> Drawn:
    """The stochastic instruction alignment of one sample for one step (instruction variant, then
    reference shuffle & drop with the text renumbered): what training collates and what the cache
    plan lists -- one function, so the two cannot disagree."""
    text, sources, target = sia_mod.choose_instruction(sample, rng, chinese_prob=sia.chinese_prob,
                                                       inverse_prob=sia.inverse_prob, text_dropout=sia.text_dropout)
    al = sia_mod.shuffle_and_drop(text, len(sources), rng, drop_prob=sia.drop_prob, shuffle=sia.shuffle)
    return Drawn(TextVariant(tuple(sources[i] for i in al.order), al.text), tuple(sources), target)


def variant_budget(draws: Iterable[tuple[int, Drawn]], k: int) -> dict[int, list[Drawn]]:
    """The first ``k`` distinct draws of each sample in a run's plan (``{}`` for ``k == 0``: no limit).
    With a budget a sample costs at most ``k`` text entries however many epochs the run has; SIA
    still varies the instruction between samples and within those ``k`` (see :func:`within_budget`)."""
    if k <= 0:
        return {}
    out: dict[int, list[Drawn]] = {}
    for i, d in draws:
        mine = out.setdefault(i, [])
        if len(mine) < k and d not in mine:
            mine.append(d)
    return out


def within_budget(drawn: Drawn, allowed: Sequence[Drawn] | None) -> Drawn:
    """``drawn`` if the sample's budget holds it (or there is none), else one of the budget's draws,
    picked by a hash of the drawn variant (the same in the plan and in training)."""
    if not allowed or drawn in allowed:
        return drawn
    from .objective import seed_of

    return allowed[seed_of(drawn.variant.text, *drawn.variant.pictures, drawn.target) % len(allowed)]


def text_variants(sample, sia) -> list[TextVariant]:
    """Every variant SIA can draw for the sample (what encoding up front would cost; the cache
    holds only the drawn ones)."""
    out = []
    for text, sources, _ in sia_mod.instruction_choices(sample, sia):
        for order in sia_mod.possible_orders(text, len(sources), sia):
            mapping = {old + 1: new + 1 for new, old in enumerate(order)}
            out.append(TextVariant(tuple(sources[i] for i in order), sia_mod.renumber(text, mapping)))
    return list(dict.fromkeys(out))


def possible_variants(sample, sia) -> int:
    """How many variants SIA can draw for the sample (:func:`text_variants` without building them):
    what encoding every one up front costs, in text-encoder passes and cache entries."""
    return sum(len(sia_mod.possible_orders(text, len(sources), sia))
               for text, sources, _ in sia_mod.instruction_choices(sample, sia))


def vl_pictures(paths: Sequence[str], vl_resolution: int) -> list[Image.Image]:
    """The pictures as Qwen2.5-VL sees them: ``vl_resolution^2`` pixels at their own aspect (the
    inference rule of :func:`firered_core.model.images.plan_sizes`)."""
    out = []
    for p in paths:
        pil = images.to_pil(p)
        out.append(images.resize(pil, *images.fit_to_area(vl_resolution**2, pil.width / pil.height)))
    return out


def crop_resize(pil: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-crop to the aspect of ``width x height``, then resize (no distortion)."""
    aspect = width / height
    w, h = pil.size
    if w / h > aspect:
        cw, ch = round(h * aspect), h
    else:
        cw, ch = w, round(w / aspect)
    left, top = (w - cw) // 2, (h - ch) // 2
    return images.resize(pil.crop((left, top, left + cw, top + ch)), width, height)


def extract_texts(
    variants: Iterable[TextVariant],
    cache: FeatureCache,
    encode: Callable[[str, list[Image.Image]], TextCond],
    *,
    model_id: str,
    vl_resolution: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Encode every variant not yet in the cache (duplicates once); returns ``{"total", "encoded"}``.

    ``encode(text, vl_pictures) -> TextCond`` runs the frozen encoder (see
    :func:`firered_core.model.conditioning.encode_prompt`)."""
    todo = list(dict.fromkeys(variants))
    done = 0
    for i, v in enumerate(todo):
        key = text_key(v, model_id=model_id, vl_resolution=vl_resolution)
        if not cache.has("text", key):
            cond = encode(v.text, vl_pictures(v.pictures, vl_resolution))
            cache.put("text", key, {"embeds": cond.embeds[0]}, {"text": v.text[:2000], "pictures": str(len(v.pictures))})
            done += 1
        if progress is not None:
            progress(i + 1, len(todo))
    return {"total": len(todo), "encoded": done}


def extract_latents(
    jobs: Iterable[tuple[str, int, int]],
    cache: FeatureCache,
    encode: Callable[[torch.Tensor], torch.Tensor],
    *,
    model_id: str,
) -> dict[str, int]:
    """VAE-encode every ``(path, width, height)`` not yet in the cache. ``encode([1, 3, H, W] in
    [-1, 1]) -> [1, 16, H/8, W/8]`` normalised latents (:func:`firered_core.model.vae.encode`)."""
    jobs = list(dict.fromkeys(jobs))
    done = 0
    for path, w, h in jobs:
        key = latent_key(path, w, h, model_id=model_id)
        if not cache.has("latents", key):
            pixels = images.pil_to_tensor(crop_resize(images.to_pil(path), w, h))
            cache.put("latents", key, {"z": encode(pixels)[0]})
            done += 1
    return {"total": len(jobs), "encoded": done}


def size_report(cache: FeatureCache, drawn: dict[int, list[set]]) -> dict[str, float]:
    """Bytes on disk. ``drawn`` maps each sample to the distinct variants its draws showed, each
    as the set of cache entries ``(kind, key)`` that variant reads (its text entry and latents).
    Returns ``{"samples", "per_sample"`` (mean bytes of a sample's entries, shared latents counted
    once), ``"variant"`` (mean bytes of one variant), ``"ratio"`` (mean over samples of the sample's
    bytes / its own variants' mean bytes), ``"max_ratio"}``: what the cache costs a sample against
    what one way of showing it costs (encoding every possible variant: up to 60x for 3 pictures)."""
    sizes: dict[tuple[str, str], int] = {}

    def nbytes(entries) -> int:
        total = 0
        for e in entries:
            if e not in sizes:
                p = cache.path(*e)
                sizes[e] = p.stat().st_size if p.is_file() else 0
            total += sizes[e]
        return total

    per_sample, per_variant, ratios = [], [], []
    for variants in drawn.values():
        mine = nbytes(set().union(*variants))
        one = [nbytes(v) for v in variants]
        per_sample.append(mine)
        per_variant.extend(one)
        if sum(one):
            ratios.append(mine / (sum(one) / len(one)))
    n = max(len(per_sample), 1)
    return {"samples": len(per_sample), "per_sample": sum(per_sample) / n,
            "variant": sum(per_variant) / max(len(per_variant), 1),
            "ratio": sum(ratios) / max(len(ratios), 1), "max_ratio": max(ratios, default=0.0)}
