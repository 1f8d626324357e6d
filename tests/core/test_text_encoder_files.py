"""The Qwen2.5-VL text encoder loads from ComfyUI's files (bf16 and scaled fp8) and the diffusers
folder, and encodes a prompt with a picture exactly like the original (fp8 within its error); the
tokenizer is found in a release folder, a named folder or a ComfyUI install; bad files fail clearly."""

import json

import pytest
import torch

from firered_core.formats.text_encoder_files import (
    QWEN25_VL_7B,
    ProcessorNotFoundError,
    TextEncoderFileError,
    config_from_shapes,
    find_processor,
    load_text_encoder,
)
from firered_core.model.conditioning import encode_prompt
from firered_core.tiny_tokenizer import QWEN_SPECIAL_TOKENS
from tests.conftest import make_picture

FP8 = torch.float8_e4m3fn


def to_comfyui(state: dict, lm_head: bool = True) -> dict:
    """transformers 5 module names -> the names of ComfyUI's Qwen25_7BVLI (comfy/text_encoders/llama.py:
    ``model.embed_tokens``, ``model.layers.N``, ``model.norm``; qwen_vl.py: ``visual.*``)."""
    out = {}
    for k, v in state.items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model.") :]] = v.contiguous()
        elif k.startswith("model.visual."):
            out["visual." + k[len("model.visual.") :]] = v.contiguous()
        elif k == "lm_head.weight":
            if lm_head:
                out[k] = v.contiguous()
        else:
            raise AssertionError(k)
    return out


def to_scaled_fp8(comfy: dict, new_style_keys=()) -> dict:
    """ComfyUI's scaled-fp8 layout: every Linear weight of the layers and vision blocks in
    float8_e4m3fn with a per-tensor ``scale_weight`` (``weight_scale`` + ``comfy_quant`` in newer files),
    plus the ``scaled_fp8`` marker; embeddings, norms and biases stay as they were."""
    out = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    for k, v in comfy.items():
        linear = (
            k.endswith(".weight")
            and v.ndim == 2
            and (".layers." in k or "visual.blocks." in k or "visual.merger.mlp" in k)
        )
        if not linear:
            out[k] = v
            continue
        scale = v.abs().max().float() / 448.0
        out[k] = (v.float() / scale).to(FP8)
        owner = k[: -len(".weight")]
        if owner in new_style_keys:
            out[owner + ".weight_scale"] = scale.reshape(())
            out[owner + ".comfy_quant"] = torch.tensor(
                list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8
            )
        else:
            out[owner + ".scale_weight"] = scale.reshape(())
    return out


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model_dir / "text_encoder", dtype=torch.float32
    ).eval()
    return model


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return find_processor(model_dir=tiny_model_dir)


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("te")
    comfy = to_comfyui(reference.state_dict(), lm_head=False)
    save_file(comfy, str(d / "qwen_2.5_vl_7b.safetensors"))
    fp8 = to_scaled_fp8(comfy, new_style_keys={"model.layers.1.mlp.down_proj", "visual.blocks.0.attn.qkv"})
    save_file(fp8, str(d / "qwen_2.5_vl_7b_fp8_scaled.safetensors"))
    return d


def encode(model, processor, seed=0):
    return encode_prompt(model, processor, "make it red", [make_picture(56, 84, seed=seed)]).embeds


def test_comfyui_file_encodes_a_prompt_with_a_picture_exactly(reference, processor, files):
    model = load_text_encoder(files / "qwen_2.5_vl_7b.safetensors", dtype=torch.float32, processor=processor)
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(encode(model, processor), encode(reference, processor))
    # no lm_head in ComfyUI's file: the embedding stands in, sharing its memory
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_transformers_layout_prefixed_merge_and_folder_load(reference, processor, tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    new = tmp_path / "te_new_names.bin"  # misleading extension: detection is by content
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(new))
    merged = tmp_path / "checkpoint.safetensors"
    save_file(
        {"text_encoders.qwen25_7b.transformer." + k: v for k, v in to_comfyui(reference.state_dict()).items()},
        str(merged),
    )
    want = encode(reference, processor)
    for path in (new, merged):
        assert torch.equal(
            encode(load_text_encoder(path, dtype=torch.float32, processor=processor), processor), want
        ), path
    for folder in (tiny_model_dir, tiny_model_dir / "text_encoder"):
        assert torch.equal(encode(load_text_encoder(folder, dtype=torch.float32), processor), want)


def test_scaled_fp8_file_is_dequantized_within_fp8_error(reference, processor, files):
    model = load_text_encoder(files / "qwen_2.5_vl_7b_fp8_scaled.safetensors", dtype=torch.float32, processor=processor)
    ref = reference.state_dict()
    for name, p in model.state_dict().items():
        assert p.dtype == torch.float32
        if name == "lm_head.weight":
            continue
        err = (p - ref[name]).abs().max() / ref[name].abs().max().clamp_min(1e-12)
        assert err <= 2**-4, (name, float(err))  # e4m3: 3 mantissa bits
    got, want = encode(model, processor), encode(reference, processor)
    rel = (got - want).norm() / want.norm()
    print("fp8 scaled: relative error of the hidden states", float(rel))
    assert 0 < rel < 0.1, float(rel)  # measured 0.028 on the tiny model


def test_bf16_load(processor, files):
    model = load_text_encoder(
        files / "qwen_2.5_vl_7b_fp8_scaled.safetensors", dtype=torch.bfloat16, processor=processor
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(encode(model, processor).float()).all()


def test_preset_is_the_7b_and_shapes_of_the_7b_select_it():
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with init_empty_weights():
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_7B))
    shapes = {k: tuple(v.shape) for k, v in to_comfyui(model.state_dict()).items()}
    assert shapes["model.embed_tokens.weight"] == (152064, 3584)
    assert shapes["model.layers.27.self_attn.k_proj.bias"] == (512,)  # ComfyUI's 7B detection key
    assert shapes["visual.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    assert shapes["visual.merger.mlp.2.weight"] == (3584, 5120)
    assert sum(v.numel() for v in model.parameters()) == pytest.approx(8.29e9, rel=0.01)
    assert config_from_shapes(shapes) == QWEN25_VL_7B
    cfg = model.config
    assert cfg.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id) == (151655, 151656, 151652)
    assert list(cfg.vision_config.fullatt_block_indexes) == [7, 15, 23, 31]


def test_wrong_files_fail_naming_file_found_and_expected(tiny_model_dir, files, tmp_path, processor):
    vae = tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(
        TextEncoderFileError, match=r"(?s)diffusion_pytorch_model\.safetensors.*VAE.*Qwen2\.5-VL-7B text encoder"
    ):
        load_text_encoder(vae)
    data = (files / "qwen_2.5_vl_7b.safetensors").read_bytes()
    cut = tmp_path / "qwen_cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TextEncoderFileError, match=r"qwen_cut\.safetensors.*truncated"):
        load_text_encoder(cut)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(files / "qwen_2.5_vl_7b.safetensors"))
    save_file({k: v for k, v in sd.items() if not k.startswith("visual.")}, str(tmp_path / "text_only.safetensors"))
    with pytest.raises(TextEncoderFileError, match=r"text_only\.safetensors.*no vision tower"):
        load_text_encoder(tmp_path / "text_only.safetensors", processor=processor)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(tmp_path / "holed.safetensors"))
    with pytest.raises(
        TextEncoderFileError, match=r"holed\.safetensors.*missing.*model\.layers\.1\.mlp\.up_proj\.weight"
    ):
        load_text_encoder(tmp_path / "holed.safetensors", processor=processor)
    # a small vocabulary without the tokenizer that belongs to it cannot know its vision token ids
    with pytest.raises(TextEncoderFileError, match="vocabulary"):
        load_text_encoder(files / "qwen_2.5_vl_7b.safetensors")


def test_tokenizer_is_found_in_a_comfyui_install_and_a_named_folder(tiny_model_dir, tmp_path, processor):
    import shutil

    root = tmp_path / "ComfyUI"
    tok = root / "comfy" / "text_encoders" / "qwen25_tokenizer"
    tok.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):  # what ComfyUI ships: no tokenizer.json ...
        shutil.copy(tiny_model_dir / "tokenizer" / name, tok / name)
    # ... and a tokenizer_config.json whose added_tokens_decoder pins the special-token ids
    config = json.loads((tiny_model_dir / "tokenizer" / "tokenizer_config.json").read_text())
    config.pop("extra_special_tokens", None)
    config["added_tokens_decoder"] = {
        str(processor.tokenizer.convert_tokens_to_ids(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                                            "single_word": False, "special": special}
        for t, special in QWEN_SPECIAL_TOKENS
    }  # fmt: skip
    config["additional_special_tokens"] = [t for t, special in QWEN_SPECIAL_TOKENS if special and t != "<|endoftext|>"]
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    text = "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>make it red<|im_end|>"
    want = processor(text=[text], images=[make_picture(56, 56)], return_tensors="pt")
    for found in (
        find_processor(comfyui_root=root),
        find_processor(tokenizer_dir=tok),
        find_processor(model_dir=tmp_path / "empty", comfyui_root=root),
    ):
        got = found(text=[text], images=[make_picture(56, 56)], return_tensors="pt")
        assert got["input_ids"].tolist() == want["input_ids"].tolist()
        assert torch.equal(got["pixel_values"], want["pixel_values"])
        assert got["image_grid_thw"].tolist() == want["image_grid_thw"].tolist()


def test_no_tokenizer_error_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(ProcessorNotFoundError, match=r"(?s)model_without_tokenizer.*qwen25_tokenizer.*To fix"):
        find_processor(model_dir=tmp_path / "model_without_tokenizer", comfyui_root=tmp_path / "ComfyUI")
    with pytest.raises(ProcessorNotFoundError, match="no tokenizer.json"):
        find_processor(tokenizer_dir=tmp_path)


def test_whole_edit_from_comfyui_text_encoder_and_vae_files_equals_the_release_folder(
    tiny_model_dir, files, processor, tmp_path
):
    """The pieces plug together: ComfyUI's text-encoder and VAE files (+ the tokenizer ComfyUI ships)
    give exactly the edit of the diffusers release folder."""
    from diffusers import AutoencoderKLQwenImage
    from safetensors.torch import save_file
    from test_vae_files import diffusers_to_comfyui

    from firered_core.formats.vae_files import load_vae
    from firered_core.loading import FireRedComponents, load_pretrained, load_scheduler_config
    from firered_core.pipeline import FireRedEditor

    ref_vae = AutoencoderKLQwenImage.from_pretrained(tiny_model_dir / "vae")
    save_file(
        diffusers_to_comfyui(ref_vae.state_dict(), ref_vae.config.num_res_blocks),
        str(tmp_path / "qwen_image_vae.safetensors"),
    )
    release = load_pretrained(tiny_model_dir, dtype=torch.float32)
    comfy = FireRedComponents(
        transformer=release.transformer,
        vae=load_vae(tmp_path / "qwen_image_vae.safetensors", dtype=torch.float32),
        text_encoder=load_text_encoder(files / "qwen_2.5_vl_7b.safetensors", dtype=torch.float32, processor=processor),
        processor=processor,
        scheduler_config=load_scheduler_config(tiny_model_dir),
    )
    kw = dict(cfg=4.0, steps=2, width=64, height=48, seed=3, ref_area=64 * 48, vl_area=56 * 56)
    pics = [make_picture(80, 64, seed=1)]
    want = FireRedEditor(release).edit(pics, "make it blue", **kw).pixels
    got = FireRedEditor(comfy).edit(pics, "make it blue", **kw).pixels
    assert torch.equal(got, want)
