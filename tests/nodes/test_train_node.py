"""FireRed Train LoRA on the tiny model: the LoRA lands in models/loras and loads back; Cancel
saves a checkpoint and the next queue resumes from it."""

import importlib

import pytest
import torch

from tests.nodes.test_nodes import SMALL, image, node, sample_kwargs


@pytest.fixture
def train_env(pack, comfy_models, tmp_path, monkeypatch):
    root, files = comfy_models
    models = tmp_path / "models"
    for folder in ("diffusion_models", "text_encoders", "vae"):
        (models / folder).mkdir(parents=True)
        for f in (root / folder).iterdir():
            (models / folder / f.name).symlink_to(f.resolve(), target_is_directory=f.is_dir())
    (models / "loras").mkdir()
    monkeypatch.setenv("FIRERED_MODELS_DIR", str(models))
    monkeypatch.setenv("FIRERED_OUTPUT_DIR", str(tmp_path / "output"))
    from firered_trainer.tinydata import make_tiny_pairs

    data = make_tiny_pairs(tmp_path / "data", 6, size=64)
    return models, files, data, tmp_path / "output"


def widgets(files, data, **over):
    w = dict(model_name=files["transformer"].name, text_encoder_name=files["text_encoder"].name, vae_name=files["vae"].name,
             dataset=str(data), lora_name="tiny_style", preset="tiny_cpu", steps=6, learning_rate=1e-3, rank=4,
             resolution=64, seed=0, overrides="checkpoint.every=2\nvalidation.every=0")
    w.update(over)
    return w


def test_trained_lora_lands_in_models_loras_and_changes_the_edit(pack, train_env):
    models, files, data, out = train_env
    res = node(pack, "FireRedTrainLoRA").train(**widgets(files, data))
    (name,) = res["result"]
    assert name == "tiny_style.safetensors" and (models / "loras" / name).is_file()
    losses = res["ui"]["firered_loss"]
    assert [s for s, _ in losses] == list(range(1, 7)) and all(torch.isfinite(torch.tensor(v)) for _, v in losses)

    dit = node(pack, "FireRedModelLoader").load(files["transformer"].name, "auto", "fp32", False)[0]
    te = node(pack, "FireRedTextEncoderLoader").load(files["text_encoder"].name, "fp32", False)[0]
    vae = node(pack, "FireRedVAELoader").load(files["vae"].name, "fp32", False)[0]
    cond = node(pack, "FireRedEditEncode").encode(te, vae, "x", " ", image1=image(), **SMALL)[0]
    s = node(pack, "FireRedSampler")
    base = s.sample(dit, cond, **sample_kwargs(cfg=1.0, steps=2))[0]["samples"]
    with_lora = node(pack, "FireRedLoraLoader").apply(dit, name, 1.0)[0]
    tuned = s.sample(with_lora, cond, **sample_kwargs(cfg=1.0, steps=2))[0]["samples"]
    assert (tuned - base).abs().max() > 1e-4  # lr 1e-3 for 6 steps moves the LoRA off zero


def test_cancel_saves_a_checkpoint_and_the_next_run_resumes(pack, train_env):
    models, files, data, out = train_env
    host = importlib.import_module(pack.__name__ + ".nodes.host")
    from firered_trainer import checkpoint

    events = []
    real = host.send_event

    def spy(event, payload):
        events.append(payload["step"])
        if payload["step"] == 3:
            host.request_interrupt()
        real(event, payload)

    host.send_event = spy
    try:
        with pytest.raises(host.InterruptedByUser):
            node(pack, "FireRedTrainLoRA").train(**widgets(files, data, lora_name="resumed"))
    finally:
        host.send_event = real
        host.request_interrupt(False)
    assert events == [1, 2, 3]
    ck = checkpoint.latest_checkpoint(out / "FireRed" / "training" / "resumed")
    assert ck is not None and not (models / "loras" / "resumed.safetensors").exists()
    res = node(pack, "FireRedTrainLoRA").train(**widgets(files, data, lora_name="resumed"))
    assert [s for s, _ in res["ui"]["firered_loss"]] == [4, 5, 6]  # continued, not restarted
    assert (models / "loras" / "resumed.safetensors").is_file()


def test_dpo_preset_trains_a_lora_from_preference_pairs(pack, train_env, tmp_path):
    import json

    from PIL import Image

    models, files, data, out = train_env
    prefs = tmp_path / "prefs"
    prefs.mkdir()
    src = (image(1, 32, 32)[0].numpy() * 255).astype("uint8")
    Image.fromarray(src).save(prefs / "src.png")
    Image.fromarray((src * 0.3 + 170).astype("uint8")).save(prefs / "win.png")
    Image.fromarray((src * 0.3).astype("uint8")).save(prefs / "lose.png")
    rec = {"source_image": "src.png", "instruction": "make it brighter", "preferred": "win.png", "rejected": "lose.png"}
    (prefs / "prefs.jsonl").write_text(json.dumps(rec) + "\n")
    res = node(pack, "FireRedTrainLoRA").train(**widgets(
        files, prefs / "prefs.jsonl", lora_name="prefer_bright", preset="dpo_tiny_cpu", steps=3, resolution=32,
        overrides="data.ref_resolution=32\ndata.vl_resolution=56\noptim.warmup_steps=1\ncheckpoint.every=1000",
    ))
    assert res["result"] == ("prefer_bright.safetensors",) and (models / "loras" / "prefer_bright.safetensors").is_file()
    assert [s for s, _ in res["ui"]["firered_loss"]] == [1, 2, 3]
    # the LoRA is in ComfyUI's layout and loads in the pack's loader
    from firered_core.formats.lora import read_lora

    dit = node(pack, "FireRedModelLoader").load(files["transformer"].name, "auto", "fp32", False)[0]
    parsed = read_lora(models / "loras" / "prefer_bright.safetensors", dit.transformer)
    assert parsed.layers and not parsed.unmatched
