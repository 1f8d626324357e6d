"""Whole edits from the files users hold (single files, fp8, LoRAs), through the public API and
the command line, against the same model loaded from its release folder."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from firered_core import FireRedEditor
from firered_core.cli import main
from firered_core.loading import ModelFolderError
from tests.conftest import make_picture

SMALL = dict(steps=2, cfg=4.0, seed=11, width=48, height=32, ref_area=64 * 64, vl_area=64 * 64)


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory):
    """The tiny model as ComfyUI-style single files: a prefixed MM-DiT, the text encoder and VAE
    files, a tokenizer folder, and a PEFT LoRA on two attention projections."""
    out = tmp_path_factory.mktemp("comfy_models")
    (tr_file,) = (tiny_model_dir / "transformer").glob("*.safetensors")
    sd = load_file(tr_file)
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, out / "firered_tiny_bf16.safetensors")
    (te_file,) = (tiny_model_dir / "text_encoder").glob("*.safetensors")
    (vae_file,) = (tiny_model_dir / "vae").glob("*.safetensors")
    g = torch.Generator().manual_seed(0)
    lora = {}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_k_proj"):
        w = sd[f"{name}.weight"]
        lora[f"transformer.{name}.lora_A.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.5
        lora[f"transformer.{name}.lora_B.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.5
    save_file(lora, out / "style_lora.safetensors")
    return {
        "transformer": out / "firered_tiny_bf16.safetensors",
        "text_encoder": te_file,
        "vae": vae_file,
        "tokenizer": tiny_model_dir / "tokenizer",
        "lora": out / "style_lora.safetensors",
    }


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    ed = FireRedEditor.from_pretrained(tiny_model_dir, dtype="fp32")
    return ed.edit(make_picture(64, 48), "make it red", **SMALL).pixels


def edit(editor):
    return editor.edit(make_picture(64, 48), "make it red", **SMALL).pixels


def test_single_files_give_the_release_folders_picture(files, reference):
    ed = FireRedEditor.from_files(
        transformer=files["transformer"], text_encoder=files["text_encoder"], vae=files["vae"],
        tokenizer=files["tokenizer"], dtype="fp32",
    )
    torch.testing.assert_close(edit(ed), reference, atol=1e-5, rtol=0)


def test_fp8_weights_stay_close(files, tiny_model_dir, reference):
    ed = FireRedEditor.from_files(tiny_model_dir, transformer=files["transformer"], weight_dtype="fp8_e4m3fn", dtype="fp32")
    from firered_core.formats.fp8_layers import FP8Linear

    assert sum(isinstance(m, FP8Linear) for m in ed.c.transformer.modules()) > 10
    d = (edit(ed) - reference).abs().mean().item()
    assert d < 0.01  # measured: 0.0015 mean |pixel difference| (fp8 rounding of random weights)  # fp8 rounding of random weights; same picture overall


def test_lora_changes_the_picture_and_strength_zero_does_not(files, tiny_model_dir, reference):
    on = FireRedEditor.from_files(tiny_model_dir, loras=[(files["lora"], 1.0)], dtype="fp32")
    assert (edit(on) - reference).abs().max() > 1e-3
    off = FireRedEditor.from_files(tiny_model_dir, loras=[(files["lora"], 0.0)], dtype="fp32")
    torch.testing.assert_close(edit(off), reference, atol=1e-6, rtol=0)


def test_missing_parts_are_named(files):
    with pytest.raises(ModelFolderError, match="no file for the text_encoder, vae"):
        FireRedEditor.from_files(transformer=files["transformer"])


def test_cli_with_files_and_a_lora(files, tmp_path):
    src = tmp_path / "in.png"
    make_picture(64, 48).save(src)
    out = tmp_path / "out.png"
    rc = main(["edit", "--transformer", str(files["transformer"]), "--text-encoder", str(files["text_encoder"]),
               "--vae", str(files["vae"]), "--tokenizer", str(files["tokenizer"]), "--lora", f"{files['lora']}:0.7",
               "--image", str(src), "--prompt", "make it red", "--out", str(out), "--steps", "2",
               "--width", "48", "--height", "32", "--dtype", "fp32"])
    assert rc == 0 and out.is_file()


@pytest.mark.parametrize("quant,bound", [("Q8_0", 0.002), ("Q4_0", 0.02)])
def test_gguf_mmdit_edits_like_the_float_model(tiny_model_dir, tmp_path, reference, quant, bound):
    # measured mean |pixel difference| to the float model: Q8_0 0.0002, Q4_0 0.004 (bounds: 5-10x)
    import gguf
    from test_gguf import write_gguf

    (tr_file,) = (tiny_model_dir / "transformer").glob("*.safetensors")
    path = tmp_path / f"firered_tiny-{quant}.gguf"
    write_gguf(path, load_file(tr_file), getattr(gguf.GGMLQuantizationType, quant))
    ed = FireRedEditor.from_files(tiny_model_dir, transformer=path, dtype="fp32")
    assert ed.dtype == torch.float32  # the compute dtype, not the uint8 storage of the blocks
    diff = (edit(ed) - reference).abs().mean().item()
    print(f"{quant}: mean |diff| {diff:.4f}")
    assert diff < bound


def test_make_tiny_comfyui_layout_edits_like_the_release_folder(tmp_path, capsys):
    # the same seed as the session's tiny model: every ComfyUI-layout file loads and edits alike
    from firered_core.formats.fp8_layers import FP8Linear
    from firered_core.formats.vae_files import inspect_vae
    from firered_core.tiny import COMFYUI_VAE, make_tiny, make_tiny_comfyui

    assert main(["make-tiny", str(tmp_path / "models"), "--layout", "comfyui"]) == 0
    paths = make_tiny_comfyui(tmp_path / "models")  # rewriting gives the same files
    # the VAE is in the one configuration ComfyUI's VAELoader builds (dim 96, 2 residual blocks)
    cfg = inspect_vae(paths["vae"]).config
    assert (cfg["base_dim"], cfg["num_res_blocks"], cfg["dim_mult"]) == (96, 2, [1, 2, 4, 4])
    folder = make_tiny(tmp_path / "release", seed=0, **COMFYUI_VAE)
    ref = FireRedEditor.from_pretrained(folder, dtype="fp32")
    expected = edit(ref)
    common = dict(text_encoder=paths["text_encoder"], vae=paths["vae"], tokenizer=paths["tokenizer"], dtype="fp32")
    torch.testing.assert_close(edit(FireRedEditor.from_files(transformer=paths["transformer"], **common)), expected,
                               atol=1e-5, rtol=0)
    fp8 = FireRedEditor.from_files(transformer=paths["transformer_fp8"], **common)
    assert any(isinstance(m, FP8Linear) for m in fp8.c.transformer.modules())
    assert (edit(fp8) - expected).abs().mean() < 0.01  # measured: 0.0016
    gg = FireRedEditor.from_files(transformer=paths["transformer_gguf"], **common)
    assert (edit(gg) - expected).abs().mean() < 0.002  # measured: 0.0002
    lora = FireRedEditor.from_files(transformer=paths["transformer"], loras=[(paths["lora"], 1.0)], **common)
    assert (edit(lora) - expected).abs().max() > 1e-3
