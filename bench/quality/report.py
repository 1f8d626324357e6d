"""The HTML report of one or two runs, and the table of deltas between two configurations.

:func:`delta_table` pairs the two runs' records by case id (cases only one run has are counted and
left out) and gives, per category and overall, each metric's mean in run A, in run B and
``B - A``, over the paired cases where both have that metric. "overall" is the mean over cases, not
over category means. :func:`write_report` writes one self-contained HTML file: the delta table
(or the one run's means), then per category the source and each run's edit as thumbnails embedded
as JPEG data URLs, with the instruction and the scores.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from .runner import METRICS, read_results

LABELS = {"following": "following (1-5)", "consistency": "consistency (1-5)", "ocr": "OCR (0-1)",
          "psnr": "PSNR outside (dB)", "ssim": "SSIM outside"}


def delta_table(a: list[dict], b: list[dict]) -> dict:
    """``{"rows": {category: {metric: {"a", "b", "delta", "n"}, "n": pairs}}, "only_a": k, "only_b": k}``
    with the categories in the order they first appear in ``a`` and "overall" last."""
    ia = {r["id"]: r for r in a}
    ib = {r["id"]: r for r in b}
    paired = [i for i in ia if i in ib]
    order: list[str] = []
    for i in paired:
        if ia[i]["category"] not in order:
            order.append(ia[i]["category"])
    rows: dict[str, dict] = {}
    for cat in order + ["overall"]:
        ids = [i for i in paired if cat == "overall" or ia[i]["category"] == cat]
        row: dict = {"n": len(ids)}
        for m in METRICS:
            both = [(ia[i]["scores"].get(m), ib[i]["scores"].get(m)) for i in ids]
            both = [(x, y) for x, y in both if x is not None and y is not None]
            if both:
                ma = sum(x for x, _ in both) / len(both)
                mb = sum(y for _, y in both) / len(both)
                row[m] = {"a": ma, "b": mb, "delta": mb - ma, "n": len(both)}
            else:
                row[m] = None
        rows[cat] = row
    return {"rows": rows, "only_a": len(ia) - len(paired), "only_b": len(ib) - len(paired)}


def _thumb(path, size: int = 160) -> str:
    from PIL import Image

    try:
        im = Image.open(path).convert("RGB")
    except (OSError, ValueError):
        return ""
    im.thumbnail((size, size), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(v, m=None) -> str:
    if v is None:
        return "&ndash;"
    return f"{v:.2f}" if m == "psnr" else f"{v:.3f}"


def _name(summary: dict, path) -> str:
    return html.escape(str((summary.get("config") or {}).get("name") or Path(path).name))


_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;font-size:13px}th{background:#f3f3f3}
td.l,th.l{text-align:left}.up{color:#0a7d28}.down{color:#b3261e}.case{display:inline-block;vertical-align:top;
margin:6px;padding:6px;border:1px solid #ddd;width:520px;font-size:12px}.case img{margin-right:4px}
.muted{color:#777}"""


def render_html(runs: list[tuple[list[dict], dict, str]]) -> str:
    """The report's HTML for one run or two (A, B): ``runs`` is ``[(records, summary, path), ...]``."""
    if not 1 <= len(runs) <= 2:
        raise ValueError(f"a report covers one or two runs, got {len(runs)}")
    names = [_name(s, p) for _, s, p in runs]
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>FireRed edit-quality report</title>",
         f"<style>{_CSS}</style></head><body><h1>Edit quality: {' vs '.join(names)}</h1>"]
    for (recs, s, p), n in zip(runs, names):
        cfg = s.get("config") or {}
        h.append(f"<p><b>{n}</b>: {len(recs)} cases from <code>{html.escape(str(p))}</code>; request "
                 f"<code>{html.escape(str(s.get('request')))}</code>; judge <code>{html.escape(str(s.get('judge')))}</code>; "
                 f"model <code>{html.escape(str(cfg.get('model') or cfg.get('transformer')))}</code></p>")
    if len(runs) == 2:
        t = delta_table(runs[0][0], runs[1][0])
        h.append(f"<h2>Deltas ({names[1]} &minus; {names[0]}, paired by case id)</h2>")
        if t["only_a"] or t["only_b"]:
            h.append(f"<p class='muted'>left out: {t['only_a']} cases only in {names[0]}, {t['only_b']} only in {names[1]}</p>")
        h.append("<table><tr><th class='l'>category</th><th>n</th>" +
                 "".join(f"<th colspan='3'>{LABELS[m]}</th>" for m in METRICS) + "</tr>")
        h.append("<tr><th></th><th></th>" + f"<th>{names[0]}</th><th>{names[1]}</th><th>&Delta;</th>" * len(METRICS) + "</tr>")
        for cat, row in t["rows"].items():
            cells = [f"<td class='l'>{'<b>overall</b>' if cat == 'overall' else html.escape(cat)}</td><td>{row['n']}</td>"]
            for m in METRICS:
                c = row[m]
                if c is None:
                    cells.append("<td>&ndash;</td>" * 3)
                else:
                    cls = "up" if c["delta"] > 0 else "down" if c["delta"] < 0 else ""
                    cells.append(f"<td>{_fmt(c['a'], m)}</td><td>{_fmt(c['b'], m)}</td>"
                                 f"<td class='{cls}'>{'+' if c['delta'] > 0 else ''}{_fmt(c['delta'], m)}</td>")
            h.append("<tr>" + "".join(cells) + "</tr>")
        h.append("</table>")
    else:
        from .runner import summarise

        means = summarise(runs[0][0])
        h.append("<h2>Means</h2><table><tr><th class='l'>category</th><th>n</th>" +
                 "".join(f"<th>{LABELS[m]}</th>" for m in METRICS) + "</tr>")
        for cat, row in means.items():
            h.append(f"<tr><td class='l'>{html.escape(cat)}</td><td>{row['n']}</td>" +
                     "".join(f"<td>{_fmt(row[m], m)}</td>" for m in METRICS) + "</tr>")
        h.append("</table>")
    by_id = [{r["id"]: r for r in recs} for recs, _, _ in runs]
    cats: dict[str, list[str]] = {}
    for r in runs[0][0]:
        cats.setdefault(r["category"], []).append(r["id"])
    h.append("<h2>Before / after</h2>")
    for cat, ids in cats.items():
        h.append(f"<h3>{html.escape(cat)}</h3>")
        for i in ids:
            r0 = by_id[0][i]
            imgs = [f"<img src='{_thumb(r0['source'])}' title='source'>"]
            lines = []
            for k, n in enumerate(names):
                r = by_id[k].get(i)
                if r is None:
                    continue
                imgs.append(f"<img src='{_thumb(r['output'])}' title='{n}'>")
                sc = r["scores"]
                lines.append(f"<b>{n}</b>: " + ", ".join(f"{m} {_fmt(sc.get(m), m)}" for m in METRICS if sc.get(m) is not None)
                             + (f"; read &ldquo;{html.escape(sc['ocr_read'])}&rdquo;" if sc.get("ocr_read") is not None else ""))
            h.append(f"<div class='case'><div>{''.join(imgs)}</div><div class='muted'>source | "
                     f"{' | '.join(names)}</div><div><code>{html.escape(i)}</code> {html.escape(r0['instruction'])}</div>"
                     f"<div>{'<br>'.join(lines)}</div></div>")
    h.append("</body></html>")
    return "\n".join(h)


def write_report(run_dirs: list, out_file) -> Path:
    """Write the HTML report of one or two run folders to ``out_file``."""
    runs = []
    for d in run_dirs:
        recs, summary = read_results(d)
        runs.append((recs, summary, str(d)))
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(runs), encoding="utf-8")
    return out


__all__ = ["delta_table", "render_html", "write_report"]
