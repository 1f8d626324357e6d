"""Tests of firered_core.tiny: the tiny random FireRed-Image-Edit model folder.

Everything runs offline on CPU.  The parts that need ``Qwen2VLProcessor`` (the
processor test and the end-to-end pipeline run) need torchvision with transformers 5.x,
which the test environment installs.
"""

from __future__ import annotations

import json
import pathlib
import socket
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from firered_core.model.architecture import LATENTS_MEAN, LATENTS_STD, default_axes_dims_rope  # noqa: E402
from firered_core.tiny import make_tiny  # noqa: E402
from firered_core.tiny_tokenizer import EDIT_TEMPLATE_PREFIX, QWEN_SPECIAL_TOKENS  # noqa: E402

IMG_PROMPT = "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"


def needs_processor(fn):
    """Marks the tests that build transformers 5's Qwen2VLProcessor (which needs torchvision,
    part of the test environment: see .ci/run)."""
    return fn


def _go_offline(mp: pytest.MonkeyPatch) -> None:
    """Hub offline mode plus no outgoing connections at all: proves nothing is downloaded."""
    import huggingface_hub.constants

    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time

    def _no_network(self, address, *args, **kwargs):
        raise OSError(f"network access attempted in an offline test: {address!r}")

    mp.setattr(socket.socket, "connect", _no_network)
    mp.setattr(socket.socket, "connect_ex", _no_network)


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    _go_offline(monkeypatch)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    with pytest.MonkeyPatch.context() as mp:
        _go_offline(mp)
        return make_tiny(tmp_path_factory.mktemp("tiny") / "FireRed-Image-Edit-tiny", seed=0)


def _read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_layout(tiny_dir: pathlib.Path) -> None:
    index = _read_json(tiny_dir / "model_index.json")
    assert index["_class_name"] == "QwenImageEditPlusPipeline"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert index["tokenizer"] == ["transformers", "Qwen2Tokenizer"]
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage"]
    for rel in (
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "processor/processor_config.json",
        "processor/tokenizer.json",
        "processor/chat_template.jinja",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        assert (tiny_dir / rel).is_file(), rel

    sched = _read_json(tiny_dir / "scheduler/scheduler_config.json")
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert sched["use_dynamic_shifting"] is True and sched["time_shift_type"] == "exponential"
    assert (sched["base_shift"], sched["max_shift"], sched["shift_terminal"]) == (0.5, 0.9, 0.02)
    assert (sched["base_image_seq_len"], sched["max_image_seq_len"]) == (256, 8192)

    vae = _read_json(tiny_dir / "vae/config.json")
    assert vae["z_dim"] == 16 and vae["dim_mult"] == [1, 2, 4, 4]
    assert vae["temperal_downsample"] == [False, True, True]
    assert vae["latents_mean"] == LATENTS_MEAN and vae["latents_std"] == LATENTS_STD

    tr = _read_json(tiny_dir / "transformer/config.json")
    te = _read_json(tiny_dir / "text_encoder/config.json")
    assert (tr["in_channels"], tr["out_channels"], tr["patch_size"]) == (64, 16, 2)
    assert tr["guidance_embeds"] is False
    assert sum(tr["axes_dims_rope"]) == tr["attention_head_dim"]
    assert tr["joint_attention_dim"] == te["text_config"]["hidden_size"]
    vision = te["vision_config"]
    assert vision["out_hidden_size"] == te["text_config"]["hidden_size"]
    assert (vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]) == (14, 2, 2)
    assert all(0 <= i < vision["depth"] for i in vision["fullatt_block_indexes"])


def test_tokenizer_matches_text_encoder(tiny_dir: pathlib.Path, offline: None) -> None:
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer.from_pretrained(str(tiny_dir / "tokenizer"))
    te = _read_json(tiny_dir / "text_encoder/config.json")
    ids = {t: tok.convert_tokens_to_ids(t) for t, _ in QWEN_SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(ids)
    assert te["image_token_id"] == ids["<|image_pad|>"]
    assert te["video_token_id"] == ids["<|video_pad|>"]
    assert te["vision_start_token_id"] == ids["<|vision_start|>"]
    assert te["vision_end_token_id"] == ids["<|vision_end|>"]
    text = te["text_config"]
    assert text["bos_token_id"] == ids["<|endoftext|>"] == tok.pad_token_id
    assert text["eos_token_id"] == ids["<|im_end|>"] == tok.eos_token_id
    assert text["vocab_size"] >= len(tok)
    # Same count as the real Qwen tokenizer: QwenImageEditPlusPipeline drops exactly 64 tokens.
    assert len(tok(EDIT_TEMPLATE_PREFIX)["input_ids"]) == 64
    # Special tokens are never split, common words are single tokens.
    assert tok.tokenize("<|vision_start|><|image_pad|><|vision_end|>") == [
        "<|vision_start|>",
        "<|image_pad|>",
        "<|vision_end|>",
    ]
    assert tok.tokenize("make it red") == ["make", "Ġit", "Ġred"]


def test_same_seed_same_bytes(tiny_dir: pathlib.Path, tmp_path: pathlib.Path, offline: None) -> None:
    again = make_tiny(tmp_path / "again", seed=0)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (again / weights).read_bytes() == (tiny_dir / weights).read_bytes()
    for rel in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/tokenizer.json"):
        assert (again / rel).read_bytes() == (tiny_dir / rel).read_bytes(), rel
    other = make_tiny(tmp_path / "other", seed=1)
    assert (other / weights).read_bytes() != (tiny_dir / weights).read_bytes()


def test_axes_and_width_options(tmp_path: pathlib.Path) -> None:
    assert default_axes_dims_rope(16) == (4, 6, 6)
    assert default_axes_dims_rope(128) == (16, 56, 56)
    for head_dim in (8, 16, 24, 32, 64, 96, 128):
        axes = default_axes_dims_rope(head_dim)
        assert sum(axes) == head_dim and all(a % 2 == 0 for a in axes)
    with pytest.raises(ValueError):
        make_tiny(tmp_path / "bad", width=30, num_attention_heads=4)


def test_components_load(tiny_dir: pathlib.Path, offline: None) -> None:
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    transformer = QwenImageTransformer2DModel.from_pretrained(str(tiny_dir / "transformer"))
    vae = AutoencoderKLQwenImage.from_pretrained(str(tiny_dir / "vae"))
    text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_dir / "text_encoder"))
    for model in (transformer, vae, text_encoder):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    # Nothing important is left at zero (the output projection in particular).
    assert transformer.proj_out.weight.abs().sum() > 0
    assert transformer.norm_out.linear.weight.abs().sum() > 0


@needs_processor
def test_processor_image_tokens(tiny_dir: pathlib.Path, offline: None) -> None:
    from PIL import Image
    from transformers import Qwen2VLProcessor

    processor = Qwen2VLProcessor.from_pretrained(str(tiny_dir / "processor"))
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # (width, height) of 384*384-area pictures, as the pipeline makes them, -> number of <|image_pad|>.
    # Qwen's smart_resize rounds each side to a multiple of 28 (patch 14 x merge 2): one token per 28x28.
    expected = {(384, 384): 14 * 14, (448, 320): 16 * 11}
    for (width, height), n_tokens in expected.items():
        picture = Image.new("RGB", (width, height), (10, 200, 30))
        inputs = processor(text=[IMG_PROMPT], images=[picture], return_tensors="pt")
        assert int((inputs["input_ids"] == pad_id).sum()) == n_tokens
        assert inputs["image_grid_thw"].tolist() == [[1, 2 * round(height / 28), 2 * round(width / 28)]]


@needs_processor
def test_pipeline_edits_an_image(tiny_dir: pathlib.Path, offline: None) -> None:
    import numpy as np
    import torch
    from diffusers import QwenImageEditPlusPipeline
    from PIL import Image

    pipe = QwenImageEditPlusPipeline.from_pretrained(str(tiny_dir))
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8))  # 64 wide, 48 high
    result = pipe(
        image=picture,
        prompt="make it red",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(0),
    )
    out = result.images[0]
    assert isinstance(out, Image.Image)
    assert out.size == (64, 64) and out.mode == "RGB"
    pixels = np.asarray(out)
    assert pixels.reshape(-1, 3).std(axis=0).max() > 1.0, "output image is a constant colour"
