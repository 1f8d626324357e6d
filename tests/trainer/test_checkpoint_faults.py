"""Faults a user meets around training runs: a damaged newest checkpoint (every stage writes the same
folders) is named, set aside and the previous one resumed exactly;
every stage's command line reports bad data in one line with no traceback; ``--help`` helps; and
the commands ``make-tiny-data`` prints run as printed."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from firered_trainer import checkpoint as ckpt
from firered_trainer.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "firered_trainer" / "configs" / "tiny_cpu.yaml"


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _losses(path) -> dict[int, str]:
    with open(path, newline="") as f:
        return {int(r["step"]): r["loss"] for r in csv.DictReader(f)}


def _truncate(f: Path) -> None:
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory, one_thread):
    """An uninterrupted 8-step LoRA run checkpointing at steps 4 and 8."""
    from firered_trainer import sft
    from firered_trainer.tinydata import make_tiny_pairs

    root = tmp_path_factory.mktemp("ckfault")
    jsonl = make_tiny_pairs(root / "data", 4, size=64, seed=2)
    out = root / "run"
    items = [f"model.path={tiny_model_dir}", f"data.jsonl={jsonl}", f"data.cache_dir={root / 'cache'}",
             f"output_dir={out}", "max_steps=8", "optim.lr=1e-2", "checkpoint.every=4", "checkpoint.keep_last=5"]
    sft.run(load_config(CONFIG, items))
    return out, items


def test_every_damaged_file_is_named(sft_run, tmp_path):
    """Each file of a checkpoint, cut to half its size (or removed), is found by the check that
    runs before anything is loaded, and the error names that very file."""
    out, _ = sft_run
    step8 = out / "checkpoints" / "step-00000008"
    files = sorted(p.relative_to(step8) for p in step8.rglob("*") if p.is_file())
    names = {f.name for f in files}
    assert {"trainable.safetensors", "optimizer.bin", "random_states_0.pkl", "meta.json"} <= names, names
    ckpt.verify_checkpoint(step8)  # the intact one passes
    for rel in files:
        for how in ("truncate", "remove"):
            copy = tmp_path / f"{rel.name}-{how}"
            shutil.copytree(step8, copy)
            if how == "truncate":
                _truncate(copy / rel)
            else:
                (copy / rel).unlink()
            with pytest.raises(ckpt.CorruptCheckpoint) as e:
                ckpt.verify_checkpoint(copy)
            assert e.value.file == copy / rel, (rel, how, str(e.value))
            shutil.rmtree(copy)


@pytest.mark.parametrize("damaged", ["trainable.safetensors", "optimizer.bin", "random_states_0.pkl"])
def test_sft_resumes_from_the_previous_checkpoint(sft_run, tmp_path, caplog, damaged):
    """The newest checkpoint with one file truncated: the rerun says which file in one warning,
    moves that checkpoint aside (kept, not deleted), resumes from the one before and reproduces
    the uninterrupted run's losses from there on, value for value."""
    from firered_trainer import sft

    src, items = sft_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    _truncate(out / "checkpoints" / "step-00000008" / damaged)
    want = _losses(src / "loss.csv")
    items = [i if not i.startswith("output_dir=") else f"output_dir={out}" for i in items]
    with caplog.at_level(logging.INFO, logger="firered_trainer"):
        res = sft.run(load_config(CONFIG, [*items, "max_steps=6"]))
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "checkpoint" in r.getMessage()]
    assert len(warned) == 1, warned
    assert damaged in warned[0] and "step-00000004" in warned[0], warned[0]
    assert (out / "checkpoints" / "step-00000008.corrupt" / damaged).is_file()
    assert res.step == 6
    got = _losses(out / "loss.csv")
    assert sorted(got) == list(range(1, 7))
    assert [got[s] for s in (5, 6)] == [want[s] for s in (5, 6)]


def test_no_usable_checkpoint_is_one_clear_error_and_moves_nothing(sft_run, tmp_path):
    src, items = sft_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    for step in ("step-00000004", "step-00000008"):
        _truncate(out / "checkpoints" / step / "optimizer.bin")
    items = [i if not i.startswith("output_dir=") else f"output_dir={out}" for i in items]
    done = subprocess.run([sys.executable, "-m", "firered_trainer", "sft", "--config", str(CONFIG), *items],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 4, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    line = [ln for ln in done.stderr.splitlines() if ln.startswith("checkpoint error:")]
    assert len(line) == 1 and "step-00000004" in line[0] and "step-00000008" in line[0] and "optimizer.bin" in line[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]


def _rl_data(tmp_path: Path, stage: str) -> Path:
    import json

    import numpy as np
    from PIL import Image

    from tests.conftest import make_picture

    src = make_picture(32, 32, seed=1)
    src.save(tmp_path / "src.png")
    if stage == "nft":
        rec = {"instruction": "make it brighter", "source_image": "src.png"}
    else:
        a = np.asarray(src).astype(np.float32)
        Image.fromarray(np.clip(a * 0.2 + 200, 0, 255).astype(np.uint8)).save(tmp_path / "win.png")
        Image.fromarray(np.clip(a * 0.2, 0, 255).astype(np.uint8)).save(tmp_path / "lose.png")
        rec = {"source_image": "src.png", "instruction": "make it brighter", "preferred": "win.png", "rejected": "lose.png"}
    path = tmp_path / f"{stage}.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    return path


@pytest.mark.parametrize("stage", ["dpo", "nft"])
def test_rl_resumes_from_the_previous_checkpoint(tiny_model_dir, tmp_path, caplog, one_thread, stage):
    """The RL stages write the same checkpoint folders as SFT (``trainable.safetensors``, their
    ``state.pt``, ``config.yaml``, the ``meta.json`` manifest) and resume the same way: a newest
    checkpoint with a file cut short, or with a readable ``state.pt`` that is no stage state, is
    named in one warning and set aside, the previous one is resumed, and the curve from there
    equals the uninterrupted one."""
    import json

    from firered_trainer.rl import common, dpo, nft

    run = {"dpo": dpo.run, "nft": nft.run}[stage]
    kw = {"stage": stage, "model.path": str(tiny_model_dir), "data.jsonl": str(_rl_data(tmp_path, stage)),
          "max_steps": 4, f"{stage}.width": 32, f"{stage}.height": 32, "data.ref_resolution": 32,
          "data.vl_resolution": 56, "lora.rank": 4, "lora.alpha": 8, "model.dtype": "fp32", "device": "cpu",
          "checkpoint.every": 2, "optim.lr": 3e-2 if stage == "nft" else 1e-3}
    if stage == "nft":
        kw.update({"nft.reward": "brightness", "nft.group_size": 4, "nft.sample_steps": 2, "nft.micro_batch": 4})
    else:
        kw["optim.warmup_steps"] = 1
    src = tmp_path / "ref"
    want = common.Curve(run({**kw, "output_dir": str(src), "checkpoint.resume": "none"})["curve"]).read()
    newest = src / "checkpoints" / "step-00000004"
    assert {"trainable.safetensors", "state.pt", "config.yaml", "meta.json"} <= {f.name for f in newest.iterdir()}
    ckpt.verify_checkpoint(newest)
    assert load_config(newest / "config.yaml").stage == stage  # the run's whole config, readable as one
    for damage, file in (("truncate", "trainable.safetensors"), ("truncate", "state.pt"), ("foreign", "state.pt")):
        out = tmp_path / f"{damage}-{file}"
        shutil.copytree(src, out)
        step4 = out / "checkpoints" / "step-00000004"
        if damage == "truncate":
            _truncate(step4 / file)
        else:  # a readable file that is no stage state, with a manifest that agrees
            torch.save({"weights": torch.zeros(2)}, step4 / file)
            meta = json.loads((step4 / "meta.json").read_text())
            meta["files"][file] = (step4 / file).stat().st_size
            (step4 / "meta.json").write_text(json.dumps(meta))
        caplog.clear()
        with caplog.at_level(logging.INFO):
            res = run({**kw, "output_dir": str(out), "checkpoint.resume": "auto"})
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "step-00000004" in r.getMessage()]
        assert len(warned) == 1 and file in warned[0] and "step-00000002" in warned[0], [r.getMessage() for r in caplog.records]
        assert (out / "checkpoints" / "step-00000004.corrupt" / file).is_file()
        got = common.Curve(res["curve"]).read()
        assert [r["step"] for r in got] == [1, 2, 3, 4]
        for a, b in zip(got[2:], want[2:]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            if stage == "nft":
                assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def test_help_lists_every_stage_and_exits_0():
    from firered_trainer.__main__ import COMMANDS

    done = subprocess.run([sys.executable, "-m", "firered_trainer", "--help"], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for name in COMMANDS:  # one line each, with words after the name
        assert any(ln.split()[:1] == [name] and len(ln.split()) > 3 for ln in lines), (name, done.stdout)
    assert "make-tiny-data" in done.stdout and "--config" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "firered_trainer", "trian"], env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "'trian'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("stage", ["sft", "dpo", "nft"])
def test_missing_data_file_is_one_line_for_every_stage(tiny_model_dir, tmp_path, stage):
    cfg = {"sft": CONFIG, "dpo": ROOT / "firered_trainer/configs/dpo_tiny_cpu.yaml",
           "nft": ROOT / "firered_trainer/configs/nft_tiny_cpu.yaml"}[stage]
    missing = tmp_path / "no-such.jsonl"
    done = subprocess.run([sys.executable, "-m", "firered_trainer", stage, "--config", str(cfg),
                           f"model.path={tiny_model_dir}", f"data.jsonl={missing}", f"output_dir={tmp_path / 'out'}"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("data error:")]
    assert len(errors) == 1 and str(missing) in errors[0], done.stderr[-2000:]


@pytest.mark.slow
def test_make_tiny_data_prints_commands_that_run(tmp_path):
    """What the README tells a user: ``make-tiny-data runs/demo`` and then each command it prints,
    exactly as printed, from the same folder; each ends with its LoRA written."""
    made = subprocess.run([sys.executable, "-m", "firered_trainer", "make-tiny-data", "runs/demo"], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    commands = {}
    for ln in made.stdout.splitlines():
        head, _, cmd = ln.strip().partition(": ")
        if cmd.startswith("python -m firered_trainer"):
            commands[head] = cmd
    assert set(commands) == {"sft", "dpo", "nft"}, made.stdout
    wrote = {"sft": "runs/demo/sft/firered_lora.safetensors", "dpo": "runs/demo/dpo/dpo_lora.safetensors",
             "nft": "runs/demo/nft/nft_lora.safetensors"}
    for stage, cmd in commands.items():
        argv = cmd.split()
        done = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, (stage, done.stderr[-3000:])
        assert (tmp_path / wrote[stage]).is_file(), (stage, done.stdout[-2000:])
