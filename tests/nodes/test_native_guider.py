"""The native GUIDER's adapter (nodes/native.py) without ComfyUI: the mixin over a stub guider
whose ``predict_noise`` returns a known ``x0``, as ComfyUI's CFGGuider does for the Qwen-Image
flow model. The real ComfyUI run is in tests/workflows/test_comfyui_native_guider.py."""

import importlib
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from tests.nodes.conftest import PACK_NAME


@pytest.fixture(scope="module")
def native(pack):
    return importlib.import_module(f"{PACK_NAME}.nodes.native")


def _stub_base(fn):
    class StubGuider:
        """predict_noise -> x0 = fn(x, sigma); process_latent_in is an affine map (like Wan21's)."""

        def __init__(self):
            self.inner_model = SimpleNamespace(process_latent_in=lambda z: (z - 0.5) * 2.0)
            self.calls = 0

        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006
            self.calls += 1
            self.last_base = fn(x, timestep)
            return self.last_base

        def sample(
            self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None
        ):
            x = noise * sigmas[0]
            outs, self.guided = [], []
            for i in range(len(sigmas) - 1):
                x0 = self.predict_noise(x, sigmas[i : i + 1])
                outs.append(x0)
                self.guided.append(x0 is not self.last_base)
                x = x0 + (x - x0) / sigmas[i] * sigmas[i + 1]
            return x, outs

    return StubGuider


def _model(x, sigma):
    # a flow model's x0: the left half goes to +3, the right half keeps a fixed pattern
    g = torch.Generator().manual_seed(1)
    base = torch.randn(x.shape, generator=g)
    out = base.clone()
    out[..., : x.shape[-1] // 2] = 3.0
    return out + 0.01 * x


def _guider(native, **kw):
    g = native.guider_class(_stub_base(_model))()
    g.setup_consistency(**kw)
    return g


SIGMAS = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])


def _source(h=8, w=12, b=1):
    return torch.rand(b, 16, 1, h, w, generator=torch.Generator().manual_seed(2))


def test_without_comfyui_native_exports_no_nodes(pack, native):
    if importlib.util.find_spec("comfy") is not None:
        pytest.skip("ComfyUI is importable here")
    assert native.NODE_CLASS_MAPPINGS == {} and native.NODE_DISPLAY_NAME_MAPPINGS == {}
    assert "FireRedConsistencyGuider" not in pack.NODE_CLASS_MAPPINGS
    assert "FireRedConsistencyGuider" in native.FireRedConsistencyGuider.__name__


def test_every_input_has_a_tooltip(native):
    spec = native.FireRedConsistencyGuider.INPUT_TYPES()
    for section in spec.values():
        for name, s in section.items():
            assert s[1].get("tooltip"), name
    assert native.FireRedConsistencyGuider.CATEGORY == "FireRed/consistency"
    assert native.FireRedConsistencyGuider.RETURN_TYPES == ("GUIDER",)


def test_strength_zero_is_the_plain_guider_bit_for_bit(native):
    src = _source()
    noise = torch.randn(1, 16, 1, 8, 12, generator=torch.Generator().manual_seed(3))
    plain = _stub_base(_model)().sample(noise, None, None, SIGMAS)[0]
    g = _guider(native, source=src, mask=torch.ones(1, 64, 96), strength=0.0)
    out = g.sample(noise, None, None, SIGMAS)[0]
    assert torch.equal(out, plain)


def test_user_mask_holds_the_kept_half_to_the_source(native):
    src = _source()
    mask = torch.zeros(1, 64, 96)
    mask[:, :, :48] = 1.0  # the left half may change
    noise = torch.randn(1, 16, 1, 8, 12, generator=torch.Generator().manual_seed(3))
    g = _guider(native, source=src, mask=mask, strength=1.0, feather_px=0.0)
    _, x0s = g.sample(noise, None, None, SIGMAS)
    target = (src - 0.5) * 2.0  # process_latent_in of the source
    for x0 in x0s:
        assert torch.allclose(x0[..., 6:], target[..., 6:], atol=1e-5)  # kept half = source
        ref = _model(torch.zeros_like(x0), None)[..., :6]
        assert (x0[..., :6] - ref).abs().max() < 0.1  # the edited half is the model's own
    # the sampled result follows: its right half is the source's
    out = g.sample(noise, None, None, SIGMAS)[0]
    assert torch.allclose(out[..., 6:], target[..., 6:], atol=1e-5)


def test_step_window_and_schedule(native):
    src = _source()
    mask = torch.zeros(1, 64, 96)
    noise = torch.randn(1, 16, 1, 8, 12, generator=torch.Generator().manual_seed(3))
    g = _guider(native, source=src, mask=mask, strength=1.0, steps=(1, 3))
    g.sample(noise, None, None, SIGMAS)
    assert g.guided == [False, True, True, False]
    g = _guider(native, source=src, mask=mask, strength=1.0, schedule="sigma2")
    g.sample(noise, None, None, SIGMAS)
    # the report's weight is zero above sigma 0.9: the first step (sigma 1) is unguided
    assert g.guided == [False, True, True, True]


def test_odd_latent_size_and_batch(native):
    src = _source(7, 9)
    mask = torch.zeros(2, 56, 72)
    noise = torch.randn(2, 16, 1, 7, 9, generator=torch.Generator().manual_seed(3))
    g = _guider(native, source=src, mask=mask, strength=1.0, feather_px=0.0)
    out, x0s = g.sample(noise, None, None, SIGMAS)
    assert out.shape == (2, 16, 1, 7, 9)
    assert torch.allclose(x0s[0], ((src - 0.5) * 2.0).expand(2, -1, -1, -1, -1), atol=1e-5)


def test_automatic_region_finds_the_changed_half(native):
    src = _model(torch.zeros(1, 16, 1, 8, 12), None) / 2.0 + 0.5  # the model keeps the right half as is
    src[..., :6] = torch.rand(1, 16, 1, 8, 6, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(1, 16, 1, 8, 12, generator=torch.Generator().manual_seed(3))
    g = _guider(native, source=src, strength=1.0)
    g.sample(noise, None, None, torch.linspace(1, 0, 9))
    m = g.edit_mask()
    assert m.shape == (1, 64, 96)
    truth = torch.zeros(1, 64, 96)
    truth[..., :48] = 1
    from firered_core.editing import masks

    assert masks.iou(m, truth) > 0.8


def test_clear_errors(native):
    g = native.guider_class(_stub_base(_model))()
    with pytest.raises(ValueError, match="Qwen-Image LATENT"):
        g.setup_consistency(source=torch.zeros(1, 4, 8, 8))
    g.setup_consistency(source=_source(8, 12), mask=torch.zeros(1, 64, 96))
    with pytest.raises(ValueError, match="output size"):
        g.sample(torch.randn(1, 16, 1, 10, 12), None, None, SIGMAS)
    node = native.FireRedConsistencyGuider()
    with pytest.raises(ValueError, match="end_step"):
        node.build(None, [], [], 4.0, {"samples": _source()}, 1.0, "constant", 5, 5, 8.0, 3, 0.0)
