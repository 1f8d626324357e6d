"""Edit every case with one editor configuration and score it.

An editor configuration is a small JSON or YAML file (paths relative to it), with ``key=value``
overrides on the command line (dotted keys, YAML values: ``request.steps=8``)::

    name: lightning-fp8          # the label in the report
    model: /models/FireRed-Image-Edit-1.1   # release folder; omit (or "tiny") for a tiny random model
    transformer: null            # single files instead of the folder's (ComfyUI, fp8, GGUF ...)
    text_encoder: null
    vae: null
    tokenizer: null
    loras: ["/models/loras/lightning-8step.safetensors:1.0"]   # FILE[:STRENGTH], or [file, strength]
    weight_dtype: fp8_scaled     # auto | fp8_e4m3fn | fp8_e5m2 | dequantize | fp8_scaled | int8
    device: null                 # default cuda if available
    dtype: null                  # default bf16 on GPU, fp32 on CPU
    speed: {cache_threshold: 0.1}            # firered_core.runtime.speed.SpeedOptions fields (step cache ...)
    memory: null                 # firered_core.runtime.memory.MemoryOptions fields, e.g. {plan: block_swap}
    request: {schedule: lightning}           # firered_core.pipeline.EditRequest fields
    seed: 43                     # each case's seed unless the case sets one

Examples for each configuration kind lie in ``bench/quality/configs/`` (base, lora, fp8, gguf,
step_cache, lightning, tiny). ``steps`` / ``cfg`` default as in the CLI: 8 / 1.0 with the Lightning schedule, else 40 / 4.0.
Every option is the core's own (:class:`~firered_core.pipeline.FireRedEditor`), so base, +LoRA,
fp8, GGUF, step cache and Lightning are configurations of one runner.

Scores per case (``None`` where a score does not apply or is switched off):

* ``following`` / ``consistency`` -- the VLM judge of the NFT stage
  (:class:`firered_trainer.rl.rewards.VLMJudge`, eq. 4's logit-weighted 1-5 rating), once with
  the instruction-following rubric and once with the consistency rubric (a case's own ``rubric`` /
  ``rubric_consistency`` replace them);
* ``ocr`` -- the NFT stage's layout-aware OCR reward (:class:`~firered_trainer.rl.rewards.OCRReward`)
  for cases with a ``target_text`` (its ``target_box`` gives the layout term), with ``ocr_read``;
* ``psnr`` (dB, capped at :data:`PSNR_CAP`) / ``ssim`` outside the edit region
  (:mod:`bench.quality.metrics`; the keep mask read as kept where it is at least half white; the
  whole picture without a keep mask).

The edit is scored at the source picture's size: an output of another size is resized to it
(Lanczos) first. Everything but ``seconds`` is reproducible to the last digit with the same
configuration, cases, judge and machine.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .cases import Case

PSNR_CAP = 100.0
METRICS = ("following", "consistency", "ocr", "psnr", "ssim")

FOLLOWING_RUBRIC = (
    "You are judging an image edit. The first picture is the source, the last one the result of the "
    "instruction: \"{instruction}\". Judge only whether the instruction was carried out completely and "
    "precisely; ignore the rest of the picture and the visual quality. Reason briefly, then end with a "
    "line 'Score: N', where N is an integer from 1 (not done) to 5 (done exactly as asked)."
)
CONSISTENCY_RUBRIC = (
    "You are judging an image edit. The first picture is the source, the last one the result of the "
    "instruction: \"{instruction}\". Judge only whether everything the instruction did not ask to change "
    "was kept as in the source: the identity of people and objects, the layout, colours, text and "
    "background. Reason briefly, then end with a line 'Score: N', where N is an integer from 1 (much "
    "changed) to 5 (everything else identical)."
)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class EditorConfig:
    """One editor configuration (see the module docstring for every key)."""

    name: str = "base"
    model: str | None = None
    tiny_seed: int = 0
    transformer: str | None = None
    text_encoder: str | None = None
    vae: str | None = None
    tokenizer: str | None = None
    loras: list = field(default_factory=list)
    weight_dtype: str = "auto"
    device: str | None = None
    dtype: str | None = None
    speed: dict | None = None
    memory: dict | None = None
    request: dict = field(default_factory=dict)
    seed: int = 43

    def resolved_request(self) -> dict:
        from firered_core.pipeline import EditRequest

        req = dict(self.request or {})
        bad = sorted(set(req) - {f.name for f in fields(EditRequest)} | ({"prompt"} & set(req)))
        if bad:
            raise ValueError(f"config {self.name!r}: request keys {bad} are not EditRequest options "
                             f"({', '.join(f.name for f in fields(EditRequest) if f.name != 'prompt')})")
        lightning = req.get("schedule") == "lightning"
        req.setdefault("steps", 8 if lightning else 40)
        req.setdefault("cfg", 1.0 if lightning else 4.0)
        return req

    def lora_list(self) -> list[tuple[str, float]]:
        from firered_core.formats.lora import parse_lora_spec

        out = []
        for item in self.loras or []:
            if isinstance(item, str):
                out.append(parse_lora_spec(item))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                out.append((str(item[0]), float(item[1])))
            else:
                raise ValueError(f"config {self.name!r}: a LoRA is 'FILE[:STRENGTH]' or [file, strength], got {item!r}")
        return out

    def describe(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def load_config(path=None, overrides=()) -> EditorConfig:
    """An :class:`EditorConfig` from a JSON / YAML file (optional) and ``key=value`` overrides."""
    import yaml

    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}  # YAML reads JSON too
        if not isinstance(data, dict):
            raise ValueError(f"{p}: a config is a mapping of keys, got {type(data).__name__}")
        base = p.parent
        data.setdefault("name", p.stem)
    for item in overrides:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value, e.g. request.steps=8")
        parts = key.split(".")
        d = data
        for k in parts[:-1]:
            if d.get(k) is None:
                d[k] = {}
            if not isinstance(d[k], dict):
                raise ValueError(f"override {item!r}: {k} is not a mapping")
            d = d[k]
        d[parts[-1]] = _parse_value(val)
    known = {f.name for f in fields(EditorConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; expected some of {sorted(known)}")
    cfg = EditorConfig(**data)
    for k in ("transformer", "text_encoder", "vae", "tokenizer"):
        if getattr(cfg, k):
            setattr(cfg, k, str((base / getattr(cfg, k)).resolve()))
    if cfg.model and cfg.model != "tiny":
        cfg.model = str((base / cfg.model).resolve())
    cfg.loras = [[str((base / f).resolve()), s] for f, s in cfg.lora_list()]
    cfg.resolved_request()  # fail early on a bad request key
    return cfg


def build_editor(cfg: EditorConfig, *, tiny_dir=None):
    """The core's :class:`~firered_core.pipeline.FireRedEditor` for ``cfg`` (a tiny random model,
    made in ``tiny_dir``, when the config names none)."""
    import tempfile

    import torch

    from firered_core.pipeline import FireRedEditor
    from firered_core.runtime.memory import MemoryOptions
    from firered_core.runtime.speed import SpeedOptions

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    speed = SpeedOptions(**cfg.speed) if cfg.speed else None
    memory = MemoryOptions(**cfg.memory) if cfg.memory else None
    files = {k: getattr(cfg, k) for k in ("transformer", "text_encoder", "vae", "tokenizer") if getattr(cfg, k)}
    model = cfg.model
    if model in (None, "tiny") and not files:
        from firered_core.tiny import make_tiny

        tiny_dir = Path(tiny_dir or tempfile.mkdtemp(prefix="firered-bench-tiny-"))
        model = tiny_dir / f"tiny-seed{cfg.tiny_seed}"
        if not (model / "transformer").is_dir():  # made once per run folder (same seed, same weights)
            make_tiny(model, seed=cfg.tiny_seed)
        model = str(model)
    loras = cfg.lora_list()
    if files or loras or cfg.weight_dtype != "auto":
        return FireRedEditor.from_files(model, device=device, dtype=dtype, loras=loras, weight_dtype=cfg.weight_dtype,
                                        speed=speed, memory=memory, **files)
    return FireRedEditor.from_pretrained(model, device=device, dtype=dtype, speed=speed, memory=memory)


# ---------------------------------------------------------------------------------------------
# Judge and scoring
# ---------------------------------------------------------------------------------------------


def build_judge(spec: dict | None):
    """The NFT stage's VLM judge from its options (``None`` / ``{}``: no judge). ``spec`` holds
    :class:`~firered_trainer.rl.rewards.VLMJudge` keywords: ``backend`` ("local" with ``model_path``
    -- Qwen2.5-VL-7B-Instruct, EditScore-7B, EditReward-Qwen2.5-VL-7B ... -- or with ``model`` /
    ``processor`` objects; "http" with ``url``, ``model_name`` and ``api_key_env``), ``passes``,
    ``max_new_tokens``, ``temperature``, ``image_size``, ``seed``."""
    if not spec:
        return None
    from firered_trainer.rl import rewards

    return rewards.REWARDS["vlm_judge"](**spec)


def _unit(img):
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)


def _finite(x):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return float(x)


def score_case(case: Case, source, output, *, judge=None, ocr=None) -> dict:
    """The scores of one edit. ``source`` / ``output``: RGB PIL pictures (``output`` resized to the
    source's size when they differ); ``judge``: a VLMJudge or None; ``ocr``: an OCRReward or None."""
    import numpy as np
    from PIL import Image

    from firered_trainer.rl import rewards

    from . import metrics

    if output.size != source.size:
        output = output.resize(source.size, Image.LANCZOS)
    src, out = _unit(source), _unit(output)
    keep = None
    if case.keep_mask:
        m = Image.open(case.keep_mask).convert("L")
        if m.size != source.size:
            raise ValueError(f"case {case.id!r}: keep mask {case.keep_mask} is {m.size[0]}x{m.size[1]}, "
                             f"the picture {source.size[0]}x{source.size[1]}")
        keep = (np.asarray(m, dtype=np.float64) / 255.0 >= 0.5).astype(np.float64)
    psnr = metrics.masked_psnr(out.numpy(), src.numpy(), keep)
    s: dict[str, Any] = {
        "psnr": None if math.isnan(psnr) else min(psnr, PSNR_CAP),
        "ssim": _finite(metrics.masked_ssim(out.numpy(), src.numpy(), keep)),
        "following": None, "consistency": None, "ocr": None,
    }
    if judge is not None:
        for key, rubric in (("following", case.rubric or FOLLOWING_RUBRIC),
                            ("consistency", case.rubric_consistency or CONSISTENCY_RUBRIC)):
            batch = rewards.RewardBatch(prompts=[case.instruction], sources=[src], rubrics=[rubric])
            s[key] = float(judge(out[None], batch)[0])
    if ocr is not None and case.target_text:
        batch = rewards.RewardBatch(prompts=[case.instruction], target_texts=[case.target_text],
                                    target_boxes=[tuple(case.target_box)] if case.target_box else None)
        s["ocr"] = float(ocr(out[None], batch)[0])
        s["ocr_read"] = ocr.last[0]["read"]
    return s


def summarise(records: list[dict]) -> dict:
    """Per-category and overall means of every metric (cases where it is ``None`` left out)."""
    out: dict[str, dict] = {}
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["category"], []).append(r)
    groups["overall"] = list(records)
    for name, rs in groups.items():
        row: dict[str, Any] = {"n": len(rs)}
        for m in METRICS:
            vals = [r["scores"][m] for r in rs if r["scores"].get(m) is not None]
            row[m] = sum(vals) / len(vals) if vals else None
        out[name] = row
    return out


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run_cases(cases: list[Case], cfg: EditorConfig, out_dir, *, editor=None, judge=None, ocr=None,
              judge_spec: dict | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Edit and score every case; writes ``out_dir/images/<id>.png``, ``results.jsonl`` (one record
    per case: id, category, instruction, source, output, seed, scores, the editor's info, seconds) and ``summary.json``
    (the config, the judge options, per-category means). Returns the records."""
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    req = cfg.resolved_request()
    t0 = time.perf_counter()
    if editor is None:
        editor = build_editor(cfg, tiny_dir=out / "_tiny")
    t_load = time.perf_counter() - t0
    records = []
    tmp = out / "results.jsonl.part"
    with open(tmp, "w", encoding="utf-8") as fh:
        for i, c in enumerate(cases):
            pics = [Image.open(p).convert("RGB") for p in c.images]
            seed = c.seed if c.seed is not None else cfg.seed
            t = time.perf_counter()
            res = editor.edit(pics, c.instruction, seed=seed, **req)
            t_edit = time.perf_counter() - t
            op = out / "images" / f"{c.id}.png"
            res.images[0].save(op)
            t = time.perf_counter()
            scores = score_case(c, pics[-1], res.images[0], judge=judge, ocr=ocr)
            rec = {"id": c.id, "category": c.category, "instruction": c.instruction, "source": c.image,
                   "output": str(op.resolve()), "seed": seed, "scores": scores,
                   "info": json.loads(json.dumps(res.info, default=str)),  # output size, step-cache counts, memory plan
                   "seconds": {"edit": round(t_edit, 3), "score": round(time.perf_counter() - t, 3)}}
            records.append(rec)
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float))
            log(f"[{i + 1}/{len(cases)}] {c.id} ({c.category}): {shown}")
    tmp.replace(out / "results.jsonl")
    judge_desc = {k: v for k, v in (judge_spec or {}).items() if k not in ("model", "processor")}
    summary = {"config": cfg.describe(), "request": req, "judge": judge_desc or None, "ocr": ocr is not None,
               "cases": len(records), "means": summarise(records),
               "seconds": {"load": round(t_load, 3), "total": round(time.perf_counter() - t0, 3)}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    return records


def read_results(path) -> tuple[list[dict], dict]:
    """``results.jsonl`` and ``summary.json`` of a run folder (or the records of a JSONL file)."""
    p = Path(path)
    rfile = p / "results.jsonl" if p.is_dir() else p
    if not rfile.is_file():
        raise FileNotFoundError(f"no results at {rfile} (written by `python -m bench.quality run`)")
    recs = []
    for n, line in enumerate(rfile.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{rfile}:{n}: not JSON ({e})") from None
    sfile = rfile.parent / "summary.json"
    summary = json.loads(sfile.read_text(encoding="utf-8")) if sfile.is_file() else {}
    return recs, summary


__all__ = ["CONSISTENCY_RUBRIC", "EditorConfig", "FOLLOWING_RUBRIC", "METRICS", "PSNR_CAP", "build_editor",
           "build_judge", "load_config", "read_results", "run_cases", "score_case", "summarise"]
