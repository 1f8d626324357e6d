"""FireRed Stitch Pictures and FireRed Crop To Mask, called as ComfyUI calls them (INPUT_IS_LIST:
every input a list), and the stitched canvases through FireRed Edit Encode + Sampler + Decode."""

import pytest
import torch


def _image(w, h, value):
    t = torch.zeros(1, h, w, 3)
    t[..., 0] = value
    return t


def test_stitch_takes_lists_and_batches_and_renumbers(pack):
    node = pack.NODE_CLASS_MAPPINGS["FireRedStitchPictures"]()
    assert type(node).INPUT_IS_LIST
    scene = _image(80, 60, 0.1)
    batch = torch.cat([_image(40, 40, 0.3), _image(40, 40, 0.5)])  # a batch of two: pictures 2 and 3
    listed = [_image(60, 20, 0.7), _image(20, 50, 0.9)]  # a list of two sizes: pictures 4 and 5
    out = node.stitch([scene], ["the hat of Picture 3 on Picture 1, the dog of Picture 5"], [1], [256], [0.1],
                      images_2=[batch], images_3=listed)
    c1, c2, c3, prompt, preview = out
    for c in (c1, c2, c3):
        assert c.dim() == 4 and c.shape[0] == 1 and c.shape[-1] == 3 and c.shape[1] * c.shape[2] <= 256 * 256
    assert c1.shape[2] / c1.shape[1] == pytest.approx(80 / 60, abs=0.05), "canvas 1 is the base picture alone"
    assert prompt.startswith("the hat of Picture ") and "Picture 3 on" not in prompt and "(" in prompt
    assert preview.dim() == 4 and preview.shape[1] == 512
    # the base picture's pixels, unchanged in value, fill canvas 1
    assert torch.allclose(c1[..., 0].mean(), torch.tensor(0.1), atol=0.01)


def test_stitch_with_three_or_fewer_passes_through_and_masks_crop(pack):
    node = pack.NODE_CLASS_MAPPINGS["FireRedStitchPictures"]()
    a, b = _image(64, 48, 0.2), _image(32, 32, 0.8)
    mask = torch.zeros(1, 48, 64)
    mask[0, 8:24, 16:48] = 1.0
    c1, c2, c3, prompt, _ = node.stitch([a], ["Picture 2 on Picture 1"], [1], [1024], [0.0], images_2=[b],
                                        masks=[mask, torch.zeros(1, 64, 64)])  # a list: the second empty
    assert c1.shape[1:3] == (16, 32) and c2.shape[1:3] == (32, 32) and c3 is None
    assert prompt == "Picture 2 on Picture 1"


def test_stitch_errors_name_the_input(pack):
    node = pack.NODE_CLASS_MAPPINGS["FireRedStitchPictures"]()
    eleven = torch.cat([_image(16, 16, i / 11) for i in range(11)])
    with pytest.raises(ValueError, match="picture 11 is one too many"):
        node.stitch([eleven], ["x"], [1], [1024], [0.1])
    with pytest.raises(ValueError, match="base picture must be 0"):
        node.stitch([eleven[:4]], ["x"], [7], [1024], [0.1])


def test_crop_to_mask(pack):
    node = pack.NODE_CLASS_MAPPINGS["FireRedCropToMask"]()
    img = torch.rand(1, 40, 60, 3)
    mask = torch.zeros(1, 40, 60)
    mask[0, 10:20, 30:40] = 1
    (out,) = node.crop(img, mask, 0.0)
    assert torch.equal(out, img[:, 10:20, 30:40])
    (same,) = node.crop(img, torch.zeros(1, 64, 64), 0.1)  # LoadImage's empty mask
    assert same is img
    with pytest.raises(ValueError, match="mask is 60x40 but its picture is 50x40"):
        node.crop(torch.rand(1, 40, 50, 3), mask, 0.0)


@pytest.mark.slow
def test_stitched_canvases_edit_through_the_encode_node(pack, loaded):
    dit, te, vae = loaded
    m = pack.NODE_CLASS_MAPPINGS
    pics = torch.cat([_image(48, 32, v) for v in (0.1, 0.3, 0.5, 0.7)])
    c1, c2, c3, prompt, _ = m["FireRedStitchPictures"]().stitch([pics], ["Picture 4 into Picture 1"], [1], [256], [0.1])
    (cond,) = m["FireRedEditEncode"]().encode(te, vae, prompt, " ", c1, c2, c3, ref_mode="own_aspect", ref_size=256, vl_size=128)
    latent, _ = m["FireRedSampler"]().sample(dit, cond, 1, 1, 1.0, "euler", "flowmatch", 0.0, 48, 32)
    (image,) = m["FireRedDecode"]().decode(vae, latent)
    assert image.shape == (1, 32, 48, 3)


def test_grounding_input_crops_unmasked_pictures(pack, monkeypatch):
    """With a text encoder connected, pictures without a mask (never the base) get the model's boxes."""
    import importlib

    from firered_core.parts import TextEncoder

    mod = importlib.import_module(pack.__name__ + ".nodes.stitch")
    calls = {}

    def fake(pics, text, model, processor, *, skip, source):
        calls.update(n=len(pics), skip=skip, text=text)
        return [None if s else (0, 0, 20, 20) for s in skip]

    monkeypatch.setattr(mod.ground, "ground_boxes", fake)
    pics = [_image(40, 30, 0.1)] + [_image(40, 40, 0.2 * i) for i in range(1, 4)]
    mask = torch.zeros(40, 40)
    mask[0:10, 0:10] = 1
    masks = [torch.zeros(1, 64, 64), torch.stack([mask])]  # picture 1 (empty: whole), picture 2 masked
    te = TextEncoder(model=None, processor=None, source="te")
    node = pack.NODE_CLASS_MAPPINGS["FireRedStitchPictures"]()
    node.stitch([torch.cat(pics[:1])], ["Picture 3 on Picture 1"], [1], [512], [0.0], masks=masks, grounding=[te],
                images_2=[torch.cat(pics[1:])])
    assert calls == {"n": 4, "skip": [True, True, False, False], "text": "Picture 3 on Picture 1"}
