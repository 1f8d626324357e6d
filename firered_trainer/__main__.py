"""``python -m firered_trainer <command> ...``

Commands (a small table: another stage adds one line to :data:`COMMANDS`)::

    python -m firered_trainer sft --config firered_trainer/configs/sft_lora_24gb.yaml data.jsonl=pairs.jsonl model.path=...
    python -m firered_trainer pretrain --config firered_trainer/configs/pretrain.yaml data.jsonl=... model.path=...
    python -m firered_trainer make-tiny-data runs/demo          # a tiny model + 8 tiny pairs, for a CPU demo

Every ``key=value`` after the options overrides the config (dotted keys: ``optim.lr=1e-4``).
Under ``accelerate launch ... -m firered_trainer sft ...`` the same commands run on several processes.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _stage(name: str):
    def main(argv: list[str]) -> int:
        from .config import ConfigError, load_config
        from .data import DataError

        ap = argparse.ArgumentParser(prog=f"python -m firered_trainer {name}", description=f"the {name} stage")
        ap.add_argument("--config", help="a YAML config (see firered_trainer/configs/)")
        ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")
        args = ap.parse_args(argv)
        try:
            cfg = load_config(args.config, args.overrides, stage=name)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        from . import pretrain, sft

        try:
            res = (sft.run if name == "sft" else pretrain.run)(cfg)
        except DataError as e:
            print(f"data error: {e}", file=sys.stderr)
            return 3
        print(f"done: step {res.step}/{res.total}, final loss {res.losses[-1] if res.losses else float('nan'):.5f}, "
              f"{res.data_loaded} samples ({res.data_skipped} skipped)")
        for what in ("lora", "lora_diffusers", "transformer", "checkpoint"):
            if getattr(res, what) is not None:
                print(f"{what}: {getattr(res, what)}")
        return 0

    return main


def make_tiny_data(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m firered_trainer make-tiny-data",
                                 description="write a tiny random model and tiny edit pairs for a CPU demo")
    ap.add_argument("folder")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args(argv)
    from pathlib import Path

    from firered_core.tiny import make_tiny

    from .tinydata import make_tiny_pairs

    root = Path(args.folder)
    model = make_tiny(root / "tiny-model")
    jsonl = make_tiny_pairs(root / "data", args.pairs, size=args.size)
    print(f"model: {model}\ndata: {jsonl}\ntrain: python -m firered_trainer sft --config firered_trainer/configs/tiny_cpu.yaml "
          f"model.path={model} data.jsonl={jsonl} output_dir={root / 'run'}")
    return 0


def _rl_stage(name: str):
    """The RL stages (``firered_trainer/rl/``) parse their own options: ``--config FILE key=value ...``."""

    def main(argv: list[str]) -> int:
        from .rl import dpo, nft

        return {"dpo": dpo, "nft": nft}[name].main(argv)

    return main


#: command -> main(argv) -> exit code
COMMANDS = {
    "sft": _stage("sft"),
    "pretrain": _stage("pretrain"),
    "make-tiny-data": make_tiny_data,
    "dpo": _rl_stage("dpo"),
    "nft": _rl_stage("nft"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m firered_trainer {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
