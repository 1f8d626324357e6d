"""The Qwen-Image VAE loads from ComfyUI's file layout, from a diffusers-named single file and from
the diffusers folder, with the same encode/decode as the original; bad files fail clearly."""


import pytest
import torch

from firered_core.formats.vae_files import VAEFileError, inspect_vae, load_vae
from firered_core.formats.writers import vae_to_comfyui as diffusers_to_comfyui


@pytest.fixture(scope="module")
def reference_vae(tiny_model_dir):
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage.from_pretrained(tiny_model_dir / "vae").eval()


@pytest.fixture(scope="module")
def comfy_vae_file(reference_vae, tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("vae") / "qwen_image_vae.safetensors"
    save_file(diffusers_to_comfyui(reference_vae.state_dict(), reference_vae.config.num_res_blocks), str(path))
    return path


def picture(seed=0, h=16, w=24):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, 1, h, w, generator=g) * 2 - 1


def assert_same_vae(a, b):
    x = picture()
    with torch.no_grad():
        za, zb = a.encode(x).latent_dist.mode(), b.encode(x).latent_dist.mode()
        assert torch.equal(za, zb)
        assert torch.equal(a.decode(za).sample, b.decode(zb).sample)
    assert list(b.config.latents_mean) == list(a.config.latents_mean)
    assert list(b.config.latents_std) == list(a.config.latents_std)


def test_comfyui_vae_file_loads_with_identical_encode_and_decode(reference_vae, comfy_vae_file):
    vae = load_vae(comfy_vae_file, dtype=torch.float32)
    info = inspect_vae(comfy_vae_file)
    assert info.layout == "comfyui"
    assert info.config["base_dim"] == reference_vae.config.base_dim
    assert info.config["num_res_blocks"] == reference_vae.config.num_res_blocks
    assert list(info.config["dim_mult"]) == list(reference_vae.config.dim_mult)
    assert list(info.config["temperal_downsample"]) == list(reference_vae.config.temperal_downsample)
    assert not any(p.is_meta for p in vae.parameters())
    assert_same_vae(reference_vae, vae)


def test_bf16_load_keeps_the_weights_in_bf16(reference_vae, comfy_vae_file):
    vae = load_vae(comfy_vae_file, dtype=torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    ref = reference_vae.state_dict()
    for k, v in vae.state_dict().items():
        assert torch.equal(v, ref[k].to(torch.bfloat16)), k


def test_diffusers_named_file_folder_and_prefixed_merge_load(reference_vae, tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    assert_same_vae(reference_vae, load_vae(tiny_model_dir / "vae", dtype=torch.float32))
    assert_same_vae(reference_vae, load_vae(tiny_model_dir, dtype=torch.float32))  # release root
    lone = tmp_path / "vae_weights.bin"  # a misleading extension: detection is by content
    save_file({k: v.contiguous() for k, v in reference_vae.state_dict().items()}, str(lone))
    assert_same_vae(reference_vae, load_vae(lone, dtype=torch.float32))
    merged = tmp_path / "merge.safetensors"
    comfy = diffusers_to_comfyui(reference_vae.state_dict(), reference_vae.config.num_res_blocks)
    save_file({"vae." + k: v for k, v in comfy.items()}, str(merged))
    assert_same_vae(reference_vae, load_vae(merged, dtype=torch.float32))


def test_real_model_layout_agrees_with_diffusers_wan_converter(tmp_path):
    """The real VAE has 2 residual blocks per stage: there our writer, diffusers' own Wan converter
    and our loader all agree."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from safetensors.torch import save_file

    torch.manual_seed(3)
    ref = AutoencoderKLQwenImage(base_dim=8, z_dim=16, num_res_blocks=2).eval()
    comfy = diffusers_to_comfyui(ref.state_dict(), 2)
    converted = convert_wan_vae_to_diffusers(dict(comfy))
    assert set(converted) == set(ref.state_dict())
    assert all(torch.equal(converted[k], v) for k, v in ref.state_dict().items())
    path = tmp_path / "real_layout.safetensors"
    save_file(comfy, str(path))
    assert inspect_vae(path).config["num_res_blocks"] == 2
    assert_same_vae(ref, load_vae(path, dtype=torch.float32))


def test_wrong_files_fail_naming_file_found_and_expected(tiny_model_dir, comfy_vae_file, tmp_path):
    te = tiny_model_dir / "text_encoder" / "model.safetensors"
    with pytest.raises(VAEFileError, match=r"(?s)model\.safetensors.*Qwen2\.5-VL text encoder.*Qwen-Image VAE"):
        load_vae(te, dtype=torch.float32)
    with pytest.raises(VAEFileError, match=r"(?s)MM-DiT.*Qwen-Image VAE"):
        load_vae(tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    cut = tmp_path / "cut_vae.safetensors"
    data = comfy_vae_file.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(VAEFileError, match=r"cut_vae\.safetensors.*truncated"):
        load_vae(cut)
    junk = tmp_path / "vae.ckpt"
    junk.write_bytes(b"\x80\x04junk")
    with pytest.raises(VAEFileError, match=r"vae\.ckpt.*pickle.*Qwen-Image VAE"):
        load_vae(junk)
    with pytest.raises(VAEFileError, match="does not exist"):
        load_vae(tmp_path / "nope.safetensors")


def test_missing_tensor_is_named(reference_vae, tmp_path):
    from safetensors.torch import save_file

    comfy = diffusers_to_comfyui(reference_vae.state_dict(), reference_vae.config.num_res_blocks)
    del comfy["decoder.head.2.bias"]
    path = tmp_path / "partial.safetensors"
    save_file(comfy, str(path))
    with pytest.raises(VAEFileError, match=r"partial\.safetensors.*missing.*decoder\.conv_out\.bias"):
        load_vae(path)
