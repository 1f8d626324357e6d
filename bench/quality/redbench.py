"""Read a user's own copy of REDEdit-Bench (FireRedTeam/REDEdit-Bench: 1,542 pairs in 15
categories, its judge rubrics in ``prompts.json``) into benchmark cases. Nothing of that dataset
(CC BY-NC-ND 4.0) is shipped here; its file layout is read tolerantly (several key names per field)
because it could not be checked against the release from this project's machines."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .cases import Case, category_name

_IMAGE_KEYS = ("source_image", "input_image", "src_image", "image", "source", "input", "ori_image", "image_path", "img")
_INSTR_KEYS = {"en": ("instruction_en", "prompt_en", "en_instruction", "edit_instruction_en", "en", "instruction", "prompt", "edit_instruction"),
               "zh": ("instruction_zh", "instruction_cn", "prompt_zh", "prompt_cn", "zh_instruction", "cn", "zh", "instruction", "prompt")}
_CAT_KEYS = ("category", "task", "task_type", "type", "edit_type", "class")
_ID_KEYS = ("id", "key", "uid", "index", "idx", "name")
_FOLLOW_KEYS = ("alignment", "instruction", "following", "prompt_following", "semantic", "sc", "edit")
_CONS_KEYS = ("consistency", "preservation", "keep", "identity")


def _first(rec: dict, keys):
    for k in keys:
        if k in rec and rec[k] not in (None, ""):
            return rec[k]
    low = {str(k).lower(): v for k, v in rec.items()}
    for k in keys:
        if low.get(k) not in (None, ""):
            return low[k]
    return None


def read_rubrics(path, lang: str = "en") -> dict[str, dict[str, str]]:
    """``prompts.json`` -> ``{category: {"following": prompt, "consistency": prompt}}`` (either may
    be missing). Accepted shapes: ``{category: prompt}``, ``{category: {lang: prompt}}``,
    ``{category: {dimension: prompt or {lang: prompt}}}`` (dimension names such as alignment /
    instruction -> following, consistency -> consistency), ``{category: [prompt, ...]}`` (the first
    for following, the second for consistency) and a list of ``{category, prompt}`` objects."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, list):
        data = {(_first(r, _CAT_KEYS) or ""): r for r in data if isinstance(r, dict)}

    def pick_lang(v):
        if isinstance(v, dict):
            for k in (lang, lang.upper(), "cn" if lang == "zh" else lang, "prompt", "text"):
                if isinstance(v.get(k), str):
                    return v[k]
            return None
        return v if isinstance(v, str) else None

    out: dict[str, dict[str, str]] = {}
    for cat, v in data.items():
        name = category_name(cat) or str(cat)
        r: dict[str, str] = {}
        if isinstance(v, list):
            if v:
                r["following"] = pick_lang(v[0])
            if len(v) > 1:
                r["consistency"] = pick_lang(v[1])
        elif isinstance(v, dict) and pick_lang(v) is None:
            for dim, dv in v.items():
                d = str(dim).lower()
                if any(k in d for k in _CONS_KEYS):
                    r["consistency"] = pick_lang(dv)
                elif any(k in d for k in _FOLLOW_KEYS):
                    r["following"] = pick_lang(dv)
        else:
            r["following"] = pick_lang(v)
        r = {k: s for k, s in r.items() if s}
        if r:
            out[name] = r
    return out


def _save_embedded(img, dest: Path) -> str:
    """A datasets-style image cell (``{"bytes": ..., "path": ...}``) written to ``dest``."""
    if isinstance(img, dict) and img.get("bytes"):
        data = img["bytes"]
        suffix = Path(img.get("path") or "x.png").suffix or ".png"
        p = dest.with_suffix(suffix)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return str(p)
    if isinstance(img, dict) and img.get("path"):
        return img["path"]
    return img


def read_redbench(root, *, lang: str = "en", extract_to=None) -> list[Case]:
    """Cases from a local copy of FireRedTeam/REDEdit-Bench at ``root`` (never downloaded here).

    Its exact file layout could not be checked here (the dataset is not reachable from this
    project's machines); the published facts are: parquet files (the Hub's viewer format), 1,542
    bilingual pairs in the 15 :data:`CATEGORIES`, and the judge rubrics in ``prompts.json``. So this
    reader accepts: parquet files anywhere under ``root`` (needs pyarrow; embedded images are
    written to ``extract_to``, default ``root/_extracted``), or JSON / JSONL metadata files whose
    records name picture files relative to themselves. Column names are matched from common
    spellings (source_image / image / input_image ..., instruction_en / instruction / prompt ...,
    category / task / type ...). ``prompts.json`` (anywhere under ``root``), when present, gives each
    case its category's rubrics. Categories outside the 15 are kept under their own name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"REDEdit-Bench folder {root} does not exist")
    extract = Path(extract_to) if extract_to else root / "_extracted"
    rubric_files = sorted(root.rglob("prompts.json"))
    rubrics = read_rubrics(rubric_files[0], lang) if rubric_files else {}
    records: list[tuple[dict, Path, str]] = []
    parquets = sorted(root.rglob("*.parquet"))
    if parquets:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"{root} holds parquet files ({parquets[0].name}, ...): reading them needs pyarrow (pip install pyarrow)") from e
        for f in parquets:
            for i, r in enumerate(pq.read_table(f).to_pylist()):
                records.append((r, f.parent, f"{f} row {i}"))
    else:
        for f in sorted(list(root.rglob("*.jsonl")) + list(root.rglob("*.json"))):
            if f.name == "prompts.json" or extract in f.parents:
                continue
            text = f.read_text(encoding="utf-8")
            try:
                rows = json.loads(text) if f.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}: not JSON ({e})") from None
            if isinstance(rows, dict):
                rows = [dict(v, id=k) if isinstance(v, dict) else v for k, v in rows.items()]
            for i, r in enumerate(rows if isinstance(rows, list) else []):
                if isinstance(r, dict):
                    records.append((r, f.parent, f"{f} item {i}"))
    if not records:
        raise ValueError(f"found no REDEdit-Bench records under {root} (looked for *.parquet, *.jsonl, *.json)")
    cases, seen = [], set()
    for n, (r, base, where) in enumerate(records):
        img = _first(r, _IMAGE_KEYS)
        instr = _first(r, _INSTR_KEYS.get(lang, _INSTR_KEYS["en"]))
        cat = _first(r, _CAT_KEYS)
        if img is None or instr is None or cat is None:
            raise ValueError(f"{where}: expected a picture ({'/'.join(_IMAGE_KEYS[:3])}...), an instruction and a category; "
                             f"found keys {sorted(r)}")
        cid = str(_first(r, _ID_KEYS) if _first(r, _ID_KEYS) is not None else n)
        if cid in seen:
            cid = f"{cid}_{n}"
        seen.add(cid)
        imgs = img if isinstance(img, list) else [img]
        paths = []
        for j, im in enumerate(imgs):
            p = _save_embedded(im, extract / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', cid)}_{j}")
            paths.append(str((base / p).resolve()))
        name = category_name(cat) or str(cat)
        rb = rubrics.get(name, {})
        cases.append(Case(cid, paths, str(instr), name, rubric=rb.get("following"),
                          rubric_consistency=rb.get("consistency"), extra={"source": "REDEdit-Bench", "lang": lang}))
    return cases
