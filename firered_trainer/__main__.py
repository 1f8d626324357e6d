"""``python -m firered_trainer <command> ...``: the training stages' command line.

The commands are a small table (:data:`COMMANDS`, with one line of help each in :data:`SUMMARY`;
another stage adds one line to both). Every ``key=value`` after the options overrides the config
(dotted keys for SFT / pretrain: ``optim.lr=1e-4``). Under ``accelerate launch ... -m
firered_trainer sft ...`` the same commands run on several processes.

Every stage reports a bad config (exit 2), bad data (exit 3) and an unusable checkpoint (exit 4)
in one line naming what is wrong, with no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _reported(run) -> int:
    """``run()``'s exit code, or a one-line report of the user's error it raised (exit 2 / 3 / 4)."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError

    try:
        return run()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 4


def _stage(name: str):
    def main(argv: list[str]) -> int:
        from .config import load_config

        ap = argparse.ArgumentParser(prog=f"python -m firered_trainer {name}", description=f"the {name} stage")
        ap.add_argument("--config", help="a YAML config (see firered_trainer/configs/)")
        ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")
        args = ap.parse_args(argv)
        return _reported(lambda: _run_stage(name, load_config(args.config, args.overrides, stage=name)))

    return main


def _run_stage(name: str, cfg) -> int:
    from . import pretrain, sft

    if name in ("dpo", "nft"):
        from .rl import dpo, nft

        stage = {"dpo": dpo, "nft": nft}[name]
        out = stage.run(cfg, progress=stage.show_progress)
        print(f"done: {out['steps']} steps; LoRA {out['lora']}; curve {out['curve']}")
        return 0
    res = (sft.run if name == "sft" else pretrain.run)(cfg)
    print(f"done: step {res.step}/{res.total}, final loss {res.losses[-1] if res.losses else float('nan'):.5f}, "
              f"{res.data_loaded} samples ({res.data_skipped} skipped)")
    for what in ("lora", "lora_diffusers", "transformer", "checkpoint"):
        if getattr(res, what) is not None:
            print(f"{what}: {getattr(res, what)}")
    return 0


def make_tiny_data(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m firered_trainer make-tiny-data",
                                 description="write a tiny random model, tiny edit pairs, DPO preference pairs and "
                                             "NFT prompts for a CPU demo, and print the commands that train on them")
    ap.add_argument("folder")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    from pathlib import Path

    from firered_core.tiny import make_tiny

    from .tinydata import demo_commands, make_tiny_pairs, make_tiny_rl_data

    root = Path(args.folder)
    model = make_tiny(root / "tiny-model")
    jsonl = make_tiny_pairs(root / "data", args.pairs, size=args.size)
    prefs, prompts = make_tiny_rl_data(root / "data", args.pairs)
    print(f"model: {model}\nSFT pairs: {jsonl}\nDPO preference pairs: {prefs}\nNFT prompts: {prompts}\n\ntrain on them:")
    for stage, command in demo_commands(root).items():
        print(f"  {stage}: {command}")
    return 0


#: command -> main(argv) -> exit code
COMMANDS = {
    "sft": _stage("sft"),
    "pretrain": _stage("pretrain"),
    "make-tiny-data": make_tiny_data,
    "dpo": _stage("dpo"),
    "nft": _stage("nft"),
}


#: command -> one line of help
SUMMARY = {
    "sft": "supervised fine-tuning (a LoRA or the full MM-DiT) on edit pairs; the report's SFT stage",
    "pretrain": "the pretrain stage: the same loop on a large mix, text-to-image rows included",
    "make-tiny-data": "write a tiny random model and tiny SFT / DPO / NFT data for a CPU demo; print the commands",
    "dpo": "DPO with asymmetric gradient optimization on preference pairs (the report's RL, offline)",
    "nft": "DiffusionNFT on prompts with rewards (OCR, consistency, a VLM judge, ...): the report's RL, online",
}


def help_text() -> str:
    """What ``python -m firered_trainer --help`` prints: the stages, one line each, and what to try."""
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m firered_trainer COMMAND [--config FILE] [key=value ...]", "",
             "Train FireRed-Image-Edit: the report's pretrain -> SFT -> RL stages.", "", "commands:"]
    lines += [f"  {name:<{width}}  {SUMMARY.get(name, '')}" for name in COMMANDS]
    lines += ["", "Each command's own options: python -m firered_trainer COMMAND --help", "",
              "try it on a CPU (seconds each):",
              "  python -m firered_trainer make-tiny-data runs/demo     # then run the commands it prints", "",
              "train a LoRA on your pairs:",
              "  python -m firered_trainer sft --config firered_trainer/configs/sft_lora_24gb.yaml "
              "model.path=models/FireRed-Image-Edit-1.1 data.jsonl=data/pairs.jsonl output_dir=runs/my_lora", "",
              "Configs: firered_trainer/configs/. A rerun of the same command resumes from its newest checkpoint.",
              "Exit codes: 0 done, 2 bad command or config, 3 bad data, 4 unusable checkpoint."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(help_text())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(help_text(), file=sys.stderr)
        if argv:
            print(f"\nunknown command {argv[0]!r}: expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
