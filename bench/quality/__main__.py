"""``python -m bench.quality``: make-cases, run, report, redbench.

    python -m bench.quality make-cases cases/                       # 30 drawn cases + cases.jsonl
    python -m bench.quality run --cases cases/ --config bench/quality/configs/tiny.yaml --out results/tiny --judge tiny
    python -m bench.quality run --cases cases/ --config lightning.yaml --set request.steps=4 --out results/l4 \\
        --judge local --judge-model-path /models/Qwen2.5-VL-7B-Instruct
    python -m bench.quality run ... --judge http --judge-url http://127.0.0.1:8000/v1 --judge-api-key-env JUDGE_KEY
    python -m bench.quality report results/base results/l4 --out report.html
    python -m bench.quality redbench /data/REDEdit-Bench --out redbench_cases/   # a user's own copy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description="Edit-quality benchmark (REDEdit-Bench style).")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make-cases", help="draw the generated cases (shapes, faces, signs with text) into a folder")
    m.add_argument("dir")
    m.add_argument("--per-category", type=int, default=2, help="cases per category (15 categories; default 2 = 30 cases)")
    m.add_argument("--size", default="256x192", help="picture size WxH (default 256x192)")
    m.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="edit every case with one editor configuration and score it")
    r.add_argument("--cases", required=True, help="case file (JSONL / JSON) or a folder holding cases.jsonl")
    r.add_argument("--config", help="editor configuration (JSON / YAML); omit for the tiny random model's defaults")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. request.steps=8 (repeatable)")
    r.add_argument("--out", required=True, help="folder for images/, results.jsonl and summary.json")
    r.add_argument("--category", action="append", default=[], help="only cases of this category (repeatable)")
    r.add_argument("--limit", type=int, help="only the first N cases")
    r.add_argument("--judge", default="none", choices=["none", "local", "http", "tiny"],
                   help="VLM judge: a local Qwen2.5-VL (--judge-model-path), an OpenAI-compatible server (--judge-url), "
                        "'tiny' (the tiny random Qwen2.5-VL: plumbing only, its scores are noise) or none")
    r.add_argument("--judge-model-path", help="local judge folder: Qwen2.5-VL-7B-Instruct, EditScore-7B, EditReward-Qwen2.5-VL-7B ...")
    r.add_argument("--judge-processor-path", help="its processor folder when not the model folder")
    r.add_argument("--judge-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    r.add_argument("--judge-model-name", default="judge", help="the model name the server serves")
    r.add_argument("--judge-api-key-env", help="environment variable holding the server's key (never the key itself)")
    r.add_argument("--judge-passes", type=int, default=3, help="sampled reasonings per score (K of eq. 4)")
    r.add_argument("--judge-max-new-tokens", type=int, default=256)
    r.add_argument("--judge-image-size", type=int, default=448)
    r.add_argument("--judge-seed", type=int, default=0)
    r.add_argument("--no-ocr", action="store_true", help="skip the OCR reward on text cases")
    rp = sub.add_parser("report", help="HTML report of one run, or of two with their delta table")
    rp.add_argument("runs", nargs="+", help="one or two run folders (A, then B)")
    rp.add_argument("--out", required=True, help="the HTML file to write")
    rb = sub.add_parser("redbench", help="a case file for your local copy of FireRedTeam/REDEdit-Bench (never shipped)")
    rb.add_argument("root", help="the dataset folder you downloaded")
    rb.add_argument("--out", required=True, help="folder for cases.jsonl (it points at your copy's pictures)")
    rb.add_argument("--lang", default="en", choices=["en", "zh"], help="instruction and rubric language")
    return p


def _judge_spec(args, out: Path, tiny_seed: int) -> dict | None:
    common = {"passes": args.judge_passes, "max_new_tokens": args.judge_max_new_tokens,
              "image_size": args.judge_image_size, "seed": args.judge_seed}
    if args.judge == "none":
        return None
    if args.judge == "local":
        if not args.judge_model_path:
            raise ValueError("--judge local needs --judge-model-path (a Qwen2.5-VL folder with its language head)")
        return {"backend": "local", "model_path": args.judge_model_path, "processor_path": args.judge_processor_path, **common}
    if args.judge == "http":
        if not args.judge_url:
            raise ValueError("--judge http needs --judge-url (an OpenAI-compatible server)")
        return {"backend": "http", "url": args.judge_url, "model_name": args.judge_model_name,
                "api_key_env": args.judge_api_key_env, **common}
    from firered_core.tiny import make_tiny

    tiny = out / "_tiny" / f"tiny-seed{tiny_seed}"  # the one the tiny editor of this run uses
    if not (tiny / "transformer").is_dir():
        make_tiny(tiny, seed=tiny_seed)
    return {"backend": "local", "model_path": str(tiny / "text_encoder"), "processor_path": str(tiny / "processor"), **common}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "make-cases":
            from .drawn import make_cases

            try:
                w, h = (int(v) for v in args.size.lower().split("x"))
            except ValueError:
                raise ValueError(f"--size {args.size!r}: expected WxH, e.g. 256x192") from None
            cases = make_cases(args.dir, per_category=args.per_category, size=(w, h), seed=args.seed)
            print(f"wrote {len(cases)} cases to {Path(args.dir) / 'cases.jsonl'}")
            return 0
        if args.command == "run":
            from .cases import category_name, read_cases
            from .runner import build_judge, load_config, run_cases

            cases = read_cases(args.cases, strict=False)
            if args.category:
                want = {category_name(c) or c for c in args.category}
                cases = [c for c in cases if c.category in want]
            if args.limit is not None:
                cases = cases[: args.limit]
            if not cases:
                raise ValueError("no case left to run after --category / --limit")
            cfg = load_config(args.config, args.set)
            out = Path(args.out)
            spec = _judge_spec(args, out, cfg.tiny_seed)
            judge = build_judge(spec)
            ocr = None
            if not args.no_ocr and any(c.target_text for c in cases):
                from firered_trainer.rl.rewards import OCRReward, ocr_engine

                ocr_engine()  # a missing rapidocr is said before any edit runs
                ocr = OCRReward()
            recs = run_cases(cases, cfg, out, judge=judge, ocr=ocr, judge_spec=spec,
                             log=lambda s: print(s, file=sys.stderr))
            print(f"wrote {len(recs)} results to {out / 'results.jsonl'} and {out / 'summary.json'}")
            return 0
        if args.command == "report":
            from .report import write_report

            if len(args.runs) > 2:
                raise ValueError(f"report takes one or two run folders, got {len(args.runs)}")
            print(f"wrote {write_report(args.runs, args.out)}")
            return 0
        if args.command == "redbench":
            from collections import Counter

            from .cases import write_cases
            from .redbench import read_redbench

            cases = read_redbench(args.root, lang=args.lang, extract_to=Path(args.out) / "images")
            path = write_cases(cases, Path(args.out) / "cases.jsonl")
            counts = Counter(c.category for c in cases)
            print(f"wrote {len(cases)} cases to {path}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
            print(f"{sum(c.rubric is not None for c in cases)} cases carry a rubric from prompts.json")
            return 0
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
