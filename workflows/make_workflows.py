"""Write the shipped workflows (ComfyUI UI format, schema 0.4) from one description each.

    python workflows/make_workflows.py        # rewrites workflows/*.json

Widget values are positional in the UI format, so they are listed here in the nodes' input order;
``tests/workflows/test_workflow_files.py`` checks every file against the node definitions (and the
``COMFYUI_PATH`` tier runs each one in a real ComfyUI). Loader nodes name the release files and
their download pages in ``properties.models``, as ComfyUI's own templates do.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE

HF = "https://huggingface.co"
MODELS = {
    "dit": {
        "name": "FireRed-Image-Edit-1.1-transformer.safetensors",
        "url": f"{HF}/FireRedTeam/FireRed-Image-Edit-1.1-ComfyUI/resolve/main/FireRed-Image-Edit-1.1-transformer.safetensors",
        "directory": "diffusion_models",
    },
    "te": {
        "name": "qwen_2.5_vl_7b_fp8_scaled.safetensors",
        "url": f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
        "directory": "text_encoders",
    },
    "vae": {
        "name": "qwen_image_vae.safetensors",
        "url": f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/qwen_image_vae.safetensors",
        "directory": "vae",
    },
    "lightning": {
        "name": "FireRed-Image-Edit-1.0-Lightning-8steps-v1.1.safetensors",
        "url": f"{HF}/FireRedTeam/FireRed-Image-Edit-1.1-ComfyUI/resolve/main/FireRed-Image-Edit-1.0-Lightning-8steps-v1.1.safetensors",
        "directory": "loras",
    },
}

# node type -> (socket inputs [(name, type)], outputs [(name, type)])
SOCKETS = {
    "FireRedModelLoader": ([], [("dit", "FIRERED_DIT")]),
    "FireRedTextEncoderLoader": ([], [("text_encoder", "FIRERED_TEXT_ENCODER")]),
    "FireRedVAELoader": ([], [("vae", "FIRERED_VAE")]),
    "FireRedDiffusersLoader": ([], [("dit", "FIRERED_DIT"), ("text_encoder", "FIRERED_TEXT_ENCODER"), ("vae", "FIRERED_VAE")]),
    "FireRedLoraLoader": ([("dit", "FIRERED_DIT")], [("dit", "FIRERED_DIT")]),
    "FireRedEditEncode": (
        [("text_encoder", "FIRERED_TEXT_ENCODER"), ("vae", "FIRERED_VAE"), ("image1", "IMAGE"), ("image2", "IMAGE"), ("image3", "IMAGE")],
        [("cond", "FIRERED_COND")],
    ),
    "FireRedSampler": (
        [("dit", "FIRERED_DIT"), ("cond", "FIRERED_COND"), ("latent", "LATENT"), ("guidance", "FIRERED_GUIDANCE")],
        [("latent", "LATENT"), ("edit_mask", "MASK")],
    ),
    "FireRedDecode": ([("vae", "FIRERED_VAE"), ("latent", "LATENT")], [("image", "IMAGE")]),
    "FireRedCompare": ([("before", "IMAGE"), ("after", "IMAGE")], []),
    "FireRedConsistencyGuidance": ([("mask", "MASK")], [("guidance", "FIRERED_GUIDANCE")]),
    "FireRedComposite": ([("edited", "IMAGE"), ("source", "IMAGE"), ("mask", "MASK")], [("image", "IMAGE")]),
    "FireRedRecaption": (
        [("text_encoder", "FIRERED_TEXT_ENCODER"), ("image1", "IMAGE"), ("image2", "IMAGE"), ("image3", "IMAGE")],
        [("instruction", "STRING")],
    ),
    "FireRedStitchPictures": (
        [("images", "IMAGE")] + [(f"images_{i}", "IMAGE") for i in range(2, 11)] + [("masks", "MASK")],
        [("image1", "IMAGE"), ("image2", "IMAGE"), ("image3", "IMAGE"), ("prompt", "STRING"), ("preview", "IMAGE")],
    ),
    "FireRedCropToMask": ([("image", "IMAGE"), ("mask", "MASK")], [("image", "IMAGE")]),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "SaveImage": ([("images", "IMAGE")], []),
    "PreviewImage": ([("images", "IMAGE")], []),
    "VAELoader": ([], [("VAE", "VAE")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "VAEEncode": ([("pixels", "IMAGE"), ("vae", "VAE")], [("LATENT", "LATENT")]),
    "ImageScaleToTotalPixels": ([("image", "IMAGE")], [("IMAGE", "IMAGE")]),
    "MaskToImage": ([("mask", "MASK")], [("IMAGE", "IMAGE")]),
    "MarkdownNote": ([], []),
}
CORE = {"LoadImage", "SaveImage", "PreviewImage", "VAELoader", "VAEDecode", "VAEEncode", "ImageScaleToTotalPixels", "MaskToImage", "MarkdownNote"}


class Graph:
    def __init__(self, title: str):
        self.title = title
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, type_: str, widgets: list, pos: tuple[int, int], *, size=(320, 140), models=None, title=None) -> int:
        ins, outs = SOCKETS[type_]
        nid = len(self.nodes) + 1
        props = {"Node name for S&R": type_}
        props["cnr_id"] = "comfy-core" if type_ in CORE else "firered-image-edit"
        if models:
            props["models"] = [MODELS[m] for m in models]
        node = {
            "id": nid, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": nid - 1, "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in ins],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outs)],
            "properties": props, "widgets_values": widgets,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return nid

    def link(self, src: int, out: str, dst: int, inp: str) -> None:
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        oi = next(i for i, o in enumerate(s["outputs"]) if o["name"] == out)
        ii = next(i for i, x in enumerate(d["inputs"]) if x["name"] == inp)
        lid = len(self.links) + 1
        typ = s["outputs"][oi]["type"]
        self.links.append([lid, src, oi, dst, ii, typ])
        s["outputs"][oi]["links"].append(lid)
        d["inputs"][ii]["link"] = lid

    def save(self, name: str) -> None:
        wf = {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"firered-image-edit/workflows/{name}")), "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "title": self.title}, "version": 0.4,
        }
        (OUT_DIR / f"{name}.json").write_text(json.dumps(wf, indent=1, ensure_ascii=False) + "\n")


#: the release folder (diffusers layout) in models/diffusers that the recaption graph loads
RELEASE_FOLDER = "FireRed-Image-Edit-1.1"


def loaders(g: Graph, *, x=0) -> tuple[int, int, int]:
    dit = g.add("FireRedModelLoader", [MODELS["dit"]["name"], "auto", "auto", False], (x, 0), models=["dit"])
    te = g.add("FireRedTextEncoderLoader", [MODELS["te"]["name"], "auto", False], (x, 200), models=["te"])
    vae = g.add("FireRedVAELoader", [MODELS["vae"]["name"], "auto", False, False], (x, 360), models=["vae"])
    return dit, te, vae


def note(g: Graph, text: str, pos=(0, -260)) -> None:
    g.add("MarkdownNote", [text], pos, size=(520, 220))


ENC_REF = ["own_aspect", 1024, 384]


def sampler_widgets(seed=43, steps=40, cfg=4.0, schedule="flowmatch", width=0, height=0):
    return [seed, "fixed", steps, cfg, "euler", schedule, 0.0, width, height, 1.0, 1, "cpu"]


def single() -> None:
    g = Graph("FireRed: edit one picture")
    note(g, "**FireRed-Image-Edit: edit one picture.** Put the model files in `models/` (the loaders list their download "
            "pages), load a picture, write the instruction, queue. 40 steps at CFG 4 are the release settings.")
    dit, te, vae = loaders(g)
    img = g.add("LoadImage", ["firered_example.png", "image"], (0, 520), size=(320, 320))
    enc = g.add("FireRedEditEncode", ["give the house a bright red door", " ", *ENC_REF], (400, 200), size=(400, 260))
    smp = g.add("FireRedSampler", sampler_widgets(), (860, 0), size=(320, 330))
    dec = g.add("FireRedDecode", [], (1240, 0))
    save = g.add("SaveImage", ["FireRed/edit"], (1240, 120), size=(400, 400))
    cmp_ = g.add("FireRedCompare", [], (1680, 0), size=(420, 420))
    g.link(te, "text_encoder", enc, "text_encoder")
    g.link(vae, "vae", enc, "vae")
    g.link(img, "IMAGE", enc, "image1")
    g.link(dit, "dit", smp, "dit")
    g.link(enc, "cond", smp, "cond")
    g.link(vae, "vae", dec, "vae")
    g.link(smp, "latent", dec, "latent")
    g.link(dec, "image", save, "images")
    g.link(img, "IMAGE", cmp_, "before")
    g.link(dec, "image", cmp_, "after")
    g.save("firered_edit_single")


def three() -> None:
    g = Graph("FireRed: combine three pictures")
    note(g, "**Three pictures.** Refer to them in the instruction as Picture 1, Picture 2 and Picture 3. The output takes "
            "the aspect of the last picture unless width and height are set.")
    dit, te, vae = loaders(g)
    imgs = [g.add("LoadImage", [f"firered_picture_{i}.png", "image"], (0, 520 + 340 * (i - 1)), size=(320, 320)) for i in (1, 2, 3)]
    enc = g.add(
        "FireRedEditEncode",
        ["The person in Picture 1 wears the jacket from Picture 2 and stands in the street of Picture 3", " ", *ENC_REF],
        (400, 200), size=(400, 260),
    )
    smp = g.add("FireRedSampler", sampler_widgets(), (860, 0), size=(320, 330))
    dec = g.add("FireRedDecode", [], (1240, 0))
    save = g.add("SaveImage", ["FireRed/three_pictures"], (1240, 120), size=(400, 400))
    g.link(te, "text_encoder", enc, "text_encoder")
    g.link(vae, "vae", enc, "vae")
    for i, img in enumerate(imgs, 1):
        g.link(img, "IMAGE", enc, f"image{i}")
    g.link(dit, "dit", smp, "dit")
    g.link(enc, "cond", smp, "cond")
    g.link(vae, "vae", dec, "vae")
    g.link(smp, "latent", dec, "latent")
    g.link(dec, "image", save, "images")
    g.save("firered_edit_three_pictures")


def lightning() -> None:
    g = Graph("FireRed: Lightning 8 steps")
    note(g, "**Lightning: 8 steps at CFG 1** with the FireRed Lightning LoRA and the `lightning` schedule: about 10x fewer "
            "model passes than the release settings.")
    dit, te, vae = loaders(g)
    lora = g.add("FireRedLoraLoader", [MODELS["lightning"]["name"], 1.0], (400, 0), models=["lightning"])
    img = g.add("LoadImage", ["firered_example.png", "image"], (0, 520), size=(320, 320))
    enc = g.add("FireRedEditEncode", ["turn the season to winter, snow on the roof", " ", *ENC_REF], (400, 200), size=(400, 260))
    smp = g.add("FireRedSampler", sampler_widgets(steps=8, cfg=1.0, schedule="lightning"), (860, 0), size=(320, 330))
    dec = g.add("FireRedDecode", [], (1240, 0))
    save = g.add("SaveImage", ["FireRed/lightning"], (1240, 120), size=(400, 400))
    g.link(dit, "dit", lora, "dit")
    g.link(te, "text_encoder", enc, "text_encoder")
    g.link(vae, "vae", enc, "vae")
    g.link(img, "IMAGE", enc, "image1")
    g.link(lora, "dit", smp, "dit")
    g.link(enc, "cond", smp, "cond")
    g.link(vae, "vae", dec, "vae")
    g.link(smp, "latent", dec, "latent")
    g.link(dec, "image", save, "images")
    g.save("firered_lightning_8steps")


def native() -> None:
    g = Graph("FireRed with ComfyUI's own VAE nodes")
    note(g, "**Interop with native nodes.** ComfyUI's VAEEncode makes the starting latent (its size sets the output size), "
            "FireRed Sampler returns a standard Qwen-Image LATENT, and ComfyUI's VAEDecode + SaveImage finish the job.")
    dit, te, vae = loaders(g)
    img = g.add("LoadImage", ["firered_example.png", "image"], (0, 520), size=(320, 320))
    scale = g.add("ImageScaleToTotalPixels", ["lanczos", 1.0], (400, 520))
    nvae = g.add("VAELoader", [MODELS["vae"]["name"]], (400, 680), models=["vae"])
    venc = g.add("VAEEncode", [], (760, 520))
    enc = g.add("FireRedEditEncode", ["make it look like a watercolor painting", " ", *ENC_REF], (400, 200), size=(400, 260))
    smp = g.add("FireRedSampler", sampler_widgets(), (860, 0), size=(320, 330))
    vdec = g.add("VAEDecode", [], (1240, 0))
    save = g.add("SaveImage", ["FireRed/native"], (1240, 120), size=(400, 400))
    g.link(te, "text_encoder", enc, "text_encoder")
    g.link(vae, "vae", enc, "vae")
    g.link(img, "IMAGE", enc, "image1")
    g.link(img, "IMAGE", scale, "image")
    g.link(scale, "IMAGE", venc, "pixels")
    g.link(nvae, "VAE", venc, "vae")
    g.link(dit, "dit", smp, "dit")
    g.link(enc, "cond", smp, "cond")
    g.link(venc, "LATENT", smp, "latent")
    g.link(smp, "latent", vdec, "samples")
    g.link(nvae, "VAE", vdec, "vae")
    g.link(vdec, "IMAGE", save, "images")
    g.save("firered_native_vae_nodes")


def consistency() -> None:
    g = Graph("FireRed: keep everything else")
    note(g, "**Consistency guidance.** Outside the edit region the picture is held to the source while sampling; the "
            "region is estimated automatically (connect a MASK to set it yourself). The sampler's edit_mask shows the "
            "region; FireRed Composite then pastes the source's own pixels back outside it.")
    dit, te, vae = loaders(g)
    img = g.add("LoadImage", ["firered_example.png", "image"], (0, 520), size=(320, 320))
    enc = g.add("FireRedEditEncode", ["put a red armchair in front of the house", " ", *ENC_REF], (400, 200), size=(400, 260))
    gd = g.add("FireRedConsistencyGuidance", [1.0, "constant", 0, 200, "region", 8.0, 3, 0.0, 1], (400, 520), size=(360, 300))
    smp = g.add("FireRedSampler", sampler_widgets(), (860, 0), size=(320, 330))
    dec = g.add("FireRedDecode", [], (1240, 0))
    comp = g.add("FireRedComposite", [4.0, True], (1240, 120))
    save = g.add("SaveImage", ["FireRed/consistent"], (1600, 0), size=(400, 400))
    m2i = g.add("MaskToImage", [], (1240, 320))
    prev = g.add("PreviewImage", [], (1600, 440), size=(300, 300))
    g.link(te, "text_encoder", enc, "text_encoder")
    g.link(vae, "vae", enc, "vae")
    g.link(img, "IMAGE", enc, "image1")
    g.link(dit, "dit", smp, "dit")
    g.link(enc, "cond", smp, "cond")
    g.link(gd, "guidance", smp, "guidance")
    g.link(vae, "vae", dec, "vae")
    g.link(smp, "latent", dec, "latent")
    g.link(dec, "image", comp, "edited")
    g.link(img, "IMAGE", comp, "source")
    g.link(smp, "edit_mask", comp, "mask")
    g.link(comp, "image", save, "images")
    g.link(smp, "edit_mask", m2i, "mask")
    g.link(m2i, "IMAGE", prev, "images")
    g.save("firered_consistency_guidance")


def recaption() -> None:
    g = Graph("FireRed: rewrite the instruction first")
    note(g, "**Recaption.** FireRed Recaption expands a short instruction into a precise one (FireRed's agent does this "
            "with Gemini; here the loaded Qwen2.5-VL or any OpenAI-compatible server writes it) and feeds FireRed Edit "
            "Encode's prompt. Read the rewritten text in the node's output, or connect it to a text display. "
            "**backend local needs the text encoder's language head**, so this graph loads the release folder "
            "(models/diffusers/FireRed-Image-Edit-1.1, the diffusers layout) with FireRed Diffusers Folder Loader: "
            "ComfyUI's qwen_2.5_vl_7b*.safetensors files have no lm_head. With those files, set backend to http with "
            "the url of your server instead (the key comes from the environment variable named in api_key_env). "
            "Same seed, same text.")
    rel = g.add("FireRedDiffusersLoader", [RELEASE_FOLDER, "auto", "auto", False], (0, 0), size=(320, 170))
    dit = te = vae = rel
    img = g.add("LoadImage", ["firered_example.png", "image"], (0, 520), size=(320, 320))
    rc = g.add("FireRedRecaption", ["give the house a red door", "local", "http://127.0.0.1:8000/v1", "default", "", 0, "fixed",
                                   400, 150], (400, 200), size=(400, 330))  # fmt: skip
    enc = g.add("FireRedEditEncode", ["give the house a red door", " ", *ENC_REF], (400, 580), size=(400, 260))
    g.nodes[enc - 1]["inputs"].append({"name": "prompt", "type": "STRING", "widget": {"name": "prompt"}, "link": None})
    smp = g.add("FireRedSampler", sampler_widgets(), (860, 0), size=(320, 330))
    dec = g.add("FireRedDecode", [], (1240, 0))
    save = g.add("SaveImage", ["FireRed/recaption"], (1240, 120), size=(400, 400))
    g.link(te, "text_encoder", rc, "text_encoder")
    g.link(img, "IMAGE", rc, "image1")
    g.link(rc, "instruction", enc, "prompt")
    g.link(te, "text_encoder", enc, "text_encoder")
    g.link(vae, "vae", enc, "vae")
    g.link(img, "IMAGE", enc, "image1")
    g.link(dit, "dit", smp, "dit")
    g.link(enc, "cond", smp, "cond")
    g.link(vae, "vae", dec, "vae")
    g.link(smp, "latent", dec, "latent")
    g.link(dec, "image", save, "images")
    g.save("firered_recaption")


def stitched() -> None:
    g = Graph("FireRed: more than three pictures")
    note(g, "**Up to ten pictures.** FireRed Stitch Pictures crops and stitches them onto the model's three canvases, as "
            "FireRed's agent does: Picture 1 (base_picture) keeps a canvas of its own and the output takes its aspect; the "
            "rest share two canvases. It rewrites 'Picture N' in the instruction to the canvases (e.g. 'Picture 2 (top "
            "left)'). Each socket takes one picture, a batch or a list. To crop a picture to what the instruction needs, "
            "paint a mask on it (right click > Open in MaskEditor) and pass it through FireRed Crop To Mask.")
    dit, te, vae = loaders(g)
    imgs = [g.add("LoadImage", [f"firered_picture_{i}.png", "image"], (0, 520 + 340 * (i - 1)), size=(320, 320)) for i in range(1, 6)]
    crop = g.add("FireRedCropToMask", [0.1], (400, 900), size=(300, 100))
    st = g.add("FireRedStitchPictures",
               ["Put the hat of Picture 2 and the scarf of Picture 3 on the dog of Picture 4, next to the vase of Picture 5, "
                "in the garden of Picture 1", 1, 1024, 0.1], (400, 520), size=(400, 340))  # fmt: skip
    prev = g.add("PreviewImage", [], (860, 520), size=(400, 300))
    enc = g.add("FireRedEditEncode", ["", " ", *ENC_REF], (860, 860), size=(400, 260))
    g.nodes[enc - 1]["inputs"].append({"name": "prompt", "type": "STRING", "widget": {"name": "prompt"}, "link": None})
    smp = g.add("FireRedSampler", sampler_widgets(), (1320, 0), size=(320, 330))
    dec = g.add("FireRedDecode", [], (1700, 0))
    save = g.add("SaveImage", ["FireRed/stitched"], (1700, 120), size=(400, 400))
    g.link(imgs[0], "IMAGE", st, "images")
    g.link(imgs[1], "IMAGE", crop, "image")
    g.link(imgs[1], "MASK", crop, "mask")
    g.link(crop, "image", st, "images_2")
    for i, img in enumerate(imgs[2:], 3):
        g.link(img, "IMAGE", st, f"images_{i}")
    g.link(st, "preview", prev, "images")
    g.link(te, "text_encoder", enc, "text_encoder")
    g.link(vae, "vae", enc, "vae")
    for i in (1, 2, 3):
        g.link(st, f"image{i}", enc, f"image{i}")
    g.link(st, "prompt", enc, "prompt")
    g.link(dit, "dit", smp, "dit")
    g.link(enc, "cond", smp, "cond")
    g.link(vae, "vae", dec, "vae")
    g.link(smp, "latent", dec, "latent")
    g.link(dec, "image", save, "images")
    g.save("firered_stitch_pictures")


def build_all(out_dir: Path = HERE) -> list[str]:
    """Write every workflow into ``out_dir``; returns the file names."""
    global OUT_DIR
    OUT_DIR = Path(out_dir)
    for fn in (single, three, lightning, native, consistency, recaption, stitched):
        fn()
    return sorted(p.name for p in OUT_DIR.glob("firered_*.json"))


if __name__ == "__main__":
    print("wrote", build_all())
