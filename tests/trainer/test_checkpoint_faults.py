"""Faults a user meets around training runs: a damaged newest checkpoint (SFT's accelerate folder
and the RL stages' one-file checkpoint) is named, set aside and the previous one resumed exactly;
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


def test_rl_resumes_from_the_previous_checkpoint(tiny_model_dir, tmp_path, caplog, one_thread):
    """The same for the RL stages' one-file checkpoints (NFT here; DPO shares the code): a
    truncated newest ``step_N.pt`` is named and set aside, the previous one is resumed and the
    curve from there equals the uninterrupted one."""
    from firered_trainer.rl import common, nft
    from tests.conftest import make_picture

    make_picture(32, 32, seed=1).save(tmp_path / "src.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "make it brighter", "source_image": "src.png"}\n')
    kw = dict(model=str(tiny_model_dir), prompts=str(prompts), reward="brightness", steps=4, group_size=4,
              sample_steps=2, width=32, height=32, vl_area=56 * 56, lr=3e-2, lora_rank=4, lora_alpha=8, dtype="fp32",
              device="cpu", save_every=2, micro_batch=4)  # fmt: skip
    src = tmp_path / "ref"
    want = common.Curve(nft.run({**kw, "output_dir": str(src), "resume": False})["curve"]).read()
    for damage in ("truncate", "foreign"):
        out = tmp_path / damage
        shutil.copytree(src, out)
        newest = out / "checkpoints" / "step_4.pt"
        if damage == "truncate":
            _truncate(newest)
        else:
            torch.save({"weights": torch.zeros(2)}, newest)  # a readable file that is no stage checkpoint
        caplog.clear()
        with caplog.at_level(logging.INFO):
            res = nft.run({**kw, "output_dir": str(out), "resume": True})
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "step_4.pt" in r.getMessage()]
        assert len(warned) == 1 and "step_2.pt" in warned[0], [r.getMessage() for r in caplog.records]
        assert (out / "checkpoints" / "step_4.pt.corrupt").is_file()
        got = common.Curve(res["curve"]).read()
        assert [r["step"] for r in got] == [1, 2, 3, 4]
        for a, b in zip(got[2:], want[2:]):
            assert a["reward"] == pytest.approx(b["reward"], abs=1e-6) and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


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


@pytest.mark.parametrize("stage,key", [("sft", "data.jsonl"), ("dpo", "data"), ("nft", "prompts")])
def test_missing_data_file_is_one_line_for_every_stage(tiny_model_dir, tmp_path, stage, key):
    cfg = {"sft": CONFIG, "dpo": ROOT / "firered_trainer/configs/dpo_tiny_cpu.yaml",
           "nft": ROOT / "firered_trainer/configs/nft_tiny_cpu.yaml"}[stage]
    model = f"model.path={tiny_model_dir}" if stage == "sft" else f"model={tiny_model_dir}"
    missing = tmp_path / "no-such.jsonl"
    done = subprocess.run([sys.executable, "-m", "firered_trainer", stage, "--config", str(cfg), model,
                           f"{key}={missing}", f"output_dir={tmp_path / 'out'}"],
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
