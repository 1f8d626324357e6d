"""The on-disk feature cache: frozen Qwen2.5-VL embeddings (and VAE latents) computed once, so a
training step never runs the 7B encoder.

Keys are content hashes, so a cache folder is shared by later runs and other datasets:

* text: sha256 of the ordered pictures' bytes, the instruction as the model reads it (after
  stochastic instruction alignment), the chat template (text + tokens dropped), the VL area and
  the model id;
* latents: sha256 of one picture's bytes, the size it is encoded at and the model id.

Entries are ``<root>/<kind>/<k[:2]>/<k>.safetensors``, each written to a temporary file and
renamed into place (``os.replace``), so an interrupted extraction leaves only whole entries and a
rerun does the missing ones. Training prompts are built by :func:`firered_core.conditioning.encode_prompt`
itself -- the inference template with its ``Picture N:`` blocks.

Which instructions a sample can be shown as is known in advance (:func:`text_variants`: English /
Chinese / inverse / empty, times every picture order and drop that stochastic instruction
alignment can produce), so all of them are extracted up front.
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

from firered_core import images
from firered_core.conditioning import TextCond, template_for

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
    return _hash("text/v1", model_id, str(vl_resolution), tpl.text, str(tpl.drop_tokens), variant.text,
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


def text_variants(sample, sia) -> list[TextVariant]:
    out = []
    for text, sources, _ in sia_mod.instruction_choices(sample, sia):
        for order in sia_mod.possible_orders(text, len(sources), sia):
            mapping = {old + 1: new + 1 for new, old in enumerate(order)}
            out.append(TextVariant(tuple(sources[i] for i in order), sia_mod.renumber(text, mapping)))
    return list(dict.fromkeys(out))


def vl_pictures(paths: Sequence[str], vl_resolution: int) -> list[Image.Image]:
    """The pictures as Qwen2.5-VL sees them: ``vl_resolution^2`` pixels at their own aspect (the
    inference rule of :func:`firered_core.images.plan_sizes`)."""
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
    samples: Iterable,
    sia,
    cache: FeatureCache,
    encode: Callable[[str, list[Image.Image]], TextCond],
    *,
    model_id: str,
    vl_resolution: int,
    extra: Iterable[TextVariant] = (),
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Encode every text variant not yet in the cache; returns ``{"total", "encoded"}``.

    ``encode(text, vl_pictures) -> TextCond`` runs the frozen encoder (see
    :func:`firered_core.conditioning.encode_prompt`)."""
    todo = [v for s in samples for v in text_variants(s, sia)] + list(extra)
    todo = list(dict.fromkeys(todo))
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
    [-1, 1]) -> [1, 16, H/8, W/8]`` normalised latents (:func:`firered_core.vae.encode`)."""
    jobs = list(dict.fromkeys(jobs))
    done = 0
    for path, w, h in jobs:
        key = latent_key(path, w, h, model_id=model_id)
        if not cache.has("latents", key):
            pixels = images.pil_to_tensor(crop_resize(images.to_pil(path), w, h))
            cache.put("latents", key, {"z": encode(pixels)[0]})
            done += 1
    return {"total": len(jobs), "encoded": done}
