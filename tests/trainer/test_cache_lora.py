"""The feature cache (content keys, resumable extraction, every SIA variant pre-extracted) and the
LoRA pieces (FireRed's default targets, fp8 frozen base that still trains)."""

from __future__ import annotations

import random

import pytest
import torch

from firered_core.model.conditioning import TextCond
from firered_trainer import cache as C
from firered_trainer.config import LORA_PRESETS, SIAConfig
from firered_trainer.data import EditSample
from firered_trainer.sia import choose_instruction, shuffle_and_drop


def _pictures(tmp_path, n):
    from tests.conftest import make_picture

    paths = []
    for i in range(n):
        p = tmp_path / f"p{i}.png"
        make_picture(48 + 16 * i, 64, seed=i).save(p)
        paths.append(str(p))
    return paths


def _sample(paths, text):
    return EditSample(sources=tuple(paths[:-1]), target=paths[-1], instruction=text,
                      source_sizes=tuple((64, 64) for _ in paths[:-1]), target_size=(64, 64),
                      instruction_cn="把图2放到图1里")


def test_every_sia_draw_is_a_precomputed_variant(tmp_path):
    """What stochastic instruction alignment can show the model at training time is exactly
    enumerated in advance, so training never needs the text encoder."""
    paths = _pictures(tmp_path, 4)
    s = _sample(paths, "put the cat of Picture 2 into Picture 1")
    sia = SIAConfig(drop_prob=0.5, chinese_prob=0.5, text_dropout=0.2)
    variants = set(C.text_variants(s, sia))
    rng = random.Random(0)
    seen = set()
    for _ in range(400):
        text, sources, _ = choose_instruction(s, rng, chinese_prob=sia.chinese_prob, text_dropout=sia.text_dropout)
        al = shuffle_and_drop(text, len(sources), rng, drop_prob=sia.drop_prob, shuffle=sia.shuffle)
        v = C.TextVariant(tuple(sources[i] for i in al.order), al.text)
        assert v in variants, v
        seen.add(v)
    assert len(seen) > 10  # the draws do vary
    # picture 3 is unreferenced: it can be dropped; 1 and 2 never are, and their numbers follow them
    assert any(len(v.pictures) == 2 for v in seen)
    assert C.TextVariant((paths[1], paths[0]), "put the cat of Picture 1 into Picture 2") in variants


def test_text_cache_is_content_keyed_and_resumable(tmp_path):
    paths = _pictures(tmp_path, 2)
    s = _sample(paths, "make Picture 1 warmer")
    sia = SIAConfig(drop_prob=0.0, chinese_prob=0.0, text_dropout=0.0)
    calls = []

    def encode(text, pics):
        calls.append((text, len(pics), pics[0].size if pics else None))
        return TextCond(torch.full((1, 5, 8), float(len(calls))))

    cache = C.FeatureCache(tmp_path / "cache")
    first = C.extract_texts(C.text_variants(s, sia), cache, encode, model_id="m", vl_resolution=128)
    # the encoder saw the picture at ~128^2 pixels, its own 3:4 aspect, sides multiples of 32
    assert first == {"total": 1, "encoded": 1} and calls[0][1] == 1 and calls[0][2] == (96, 160)
    again = C.extract_texts(C.text_variants(s, sia), C.FeatureCache(tmp_path / "cache"), encode, model_id="m", vl_resolution=128)
    assert again == {"total": 1, "encoded": 0} and len(calls) == 1  # a later run reuses the entry
    v = C.text_variants(s, sia)[0]
    k = C.text_key(v, model_id="m", vl_resolution=128)
    assert cache.get_text(k).embeds.shape == (1, 5, 8)
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # no half-written entry
    # another model, another VL size, or other picture bytes: another key
    assert C.text_key(v, model_id="m2", vl_resolution=128) != k
    assert C.text_key(v, model_id="m", vl_resolution=384) != k
    from tests.conftest import make_picture

    make_picture(48, 64, seed=9).save(paths[0])
    assert C.text_key(v, model_id="m", vl_resolution=128) != k


def test_fp8_base_lora_trains(tiny_model_dir):
    from firered_core.formats.fp8_layers import FP8Linear
    from firered_core.formats.transformer_files import load_transformer
    from firered_trainer.batches import predict_velocity
    from firered_trainer.lora import add_lora, lora_layers, quantize_frozen_base

    tr = load_transformer(tiny_model_dir / "transformer", dtype=torch.bfloat16, weight_dtype="dequantize")
    n = add_lora(tr, rank=4, alpha=4, modules=LORA_PRESETS["firered"])
    assert len(lora_layers(tr)) == 12 * 2 and n > 0
    ref = {k: v.clone() for k, v in tr.state_dict().items() if "lora_" not in k}
    converted = quantize_frozen_base(tr)
    # every block linear: the 12 adapted base layers + img/txt_mlp.net.0.proj, per block
    assert converted == 14 * 2
    assert sum(isinstance(m, FP8Linear) for m in tr.modules()) == 28
    assert all(p.dtype == torch.float32 for n_, p in tr.named_parameters() if p.requires_grad)
    assert all(not p.requires_grad for n_, p in tr.named_parameters() if "lora_" not in n_)
    # the fp8 copy of a weight is within e4m3 rounding (scaled per output channel)
    w = ref["transformer_blocks.0.attn.to_q.base_layer.weight"].float()
    wq = tr.transformer_blocks[0].attn.to_q.base_layer.dequantized_weight(torch.float32)
    assert ((wq - w).abs().max() / w.abs().max()) < 0.07
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 64, generator=g)
    refs = torch.randn(1, 16, 64, generator=g)
    text = TextCond(torch.randn(1, 6, 64, generator=g))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = predict_velocity(tr, x, torch.tensor([0.5]), refs, [text], [(1, 4, 4), (1, 4, 4)], torch.bfloat16)
    v.float().pow(2).mean().backward()
    grads = [p.grad for n_, p in tr.named_parameters() if "lora_B" in n_ and "transformer_blocks.0" in n_]
    assert grads and all(gr is not None and gr.abs().sum() > 0 for gr in grads)


def test_unknown_target_module_is_a_clear_error(tiny_model_dir):
    from firered_core.formats.transformer_files import load_transformer
    from firered_trainer.lora import add_lora

    tr = load_transformer(tiny_model_dir / "transformer", dtype=torch.float32)
    with pytest.raises(ValueError, match="lora.modules"):
        add_lora(tr, rank=4, alpha=4, modules=["not_a_layer"])


def test_block_swap_keeps_results_and_host_copies(tiny_model_dir):
    """The core's block swapper in training mode (``swap_last_blocks``). On the CPU the copies are
    CPU to CPU, so this checks the mechanics: identical outputs and LoRA gradients under gradient
    checkpointing, the adapters never move (same objects, on the device), and between uses a
    swapped block points at its host copy (on a GPU that is what frees its memory)."""
    from firered_core.formats.transformer_files import load_transformer
    from firered_core.runtime.blockswap import HANDLE, remove_block_swap, swap_last_blocks
    from firered_trainer.batches import predict_velocity
    from firered_trainer.lora import add_lora, quantize_frozen_base

    def run(swap):
        torch.manual_seed(0)
        tr = load_transformer(tiny_model_dir / "transformer", dtype=torch.float32, weight_dtype="dequantize")
        add_lora(tr, rank=4, alpha=4, modules=LORA_PRESETS["firered"])
        with torch.no_grad():
            for n, p in tr.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        quantize_frozen_base(tr)
        tr.enable_gradient_checkpointing()
        tr.train()
        trainable = {n: p for n, p in tr.named_parameters() if p.requires_grad}
        swapper = swap_last_blocks(tr, 1, "cpu") if swap else None
        g = torch.Generator().manual_seed(0)
        x, refs = torch.randn(1, 16, 64, generator=g), torch.randn(1, 16, 64, generator=g)
        text = TextCond(torch.randn(1, 6, 64, generator=g))
        v = predict_velocity(tr, x, torch.tensor([0.5]), refs, [text], [(1, 4, 4), (1, 4, 4)], torch.float32)
        v.pow(2).mean().backward()
        after = {n: p for n, p in tr.named_parameters() if p.requires_grad}
        assert after.keys() == trainable.keys() and all(after[n] is trainable[n] for n in after)
        return tr, swapper, v.detach(), {n: p.grad.clone() for n, p in tr.named_parameters() if p.grad is not None}

    _, _, v0, g0 = run(False)
    tr, swapper, v1, g1 = run(True)
    assert torch.equal(v0, v1) and g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert swapper.copies >= 2  # forward and the recomputation in backward both copied the block in
    last = tr.transformer_blocks[-1]
    (host,) = swapper._masters.values()
    held = {id(t) for _, _, _, t in host}
    assert id(last.attn.to_q.base_layer.weight_fp8) in held  # between uses: the host copy
    assert host and not any(t.requires_grad for *_, t in host)  # only frozen tensors swap
    with pytest.raises(ValueError, match="blocks_to_swap"):
        swap_last_blocks(tr, 2, "cpu")
    remove_block_swap(tr, "cpu")
    assert HANDLE not in tr.__dict__ and not swapper.installed


# ---------------------------------------------------------------------------------------------
# the cache holds what a run draws, not every variant
# ---------------------------------------------------------------------------------------------


def three_picture_pairs(root, n: int = 4):
    """``n`` samples of 3 source pictures + a target (64x64), with an instruction that names no
    picture (so any of them can be dropped): 15 orders x English / Chinese / empty = 45 variants."""
    import json
    from pathlib import Path

    from tests.conftest import make_picture

    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        names = [f"{i}_s{j}.png" for j in range(3)] + [f"{i}_t.png"]
        for j, name in enumerate(names):
            make_picture(64, 64, seed=10 * i + j).save(root / "img" / name)
        lines.append(json.dumps({"source_image": [f"img/{x}" for x in names[:3]], "target_image": f"img/{names[3]}",
                                 "instruction": "blend the pictures into one", "instruction_cn": "把这些照片合成一张"},
                                ensure_ascii=False))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "pairs.jsonl"


@pytest.mark.usefixtures("one_thread")
def test_cache_holds_the_drawn_variants_only(tiny_model_dir, tmp_path, monkeypatch):
    """A 3-picture sample has 45 SIA variants; encoding them all (the old eager cache) stored ~23x
    one variant's bytes per sample on the tiny model (~30x estimated at release size, 150 MB:
    ``python bench/sia_cache_size.py``). Now the run's draws are planned and only those are
    encoded: in a run that shows each sample twice (the fixed evaluation draw and one training
    step) the text entries on disk are exactly the ones training read, and a sample costs <= 3x
    one variant (measured: 1.54x). Training never loads the text encoder: everything it reads was
    extracted before the first step. Encoding every variant again fails here (22.6x, and text
    entries training never reads)."""
    from pathlib import Path

    from firered_core.formats import text_encoder_files
    from firered_trainer import features, sft
    from firered_trainer.batches import Collator
    from firered_trainer.config import load_config

    root = tmp_path / "pairs"
    jsonl = three_picture_pairs(root)
    cache_dir = tmp_path / "cache"
    cfg = load_config(Path(sft.__file__).parent / "configs" / "tiny_cpu.yaml", [
        f"model.path={tiny_model_dir}", f"data.jsonl={jsonl}", f"data.cache_dir={cache_dir}",
        f"output_dir={tmp_path / 'out'}", "max_steps=2", "checkpoint.every=100", "sia.text_dropout=0.05"])
    samples = features.load_data(cfg)[0]
    assert all(C.possible_variants(s, cfg.sia) == len(C.text_variants(s, cfg.sia)) == 45 for s in samples)

    # record what training reads, collate by collate, and when the text encoder is loaded
    calls, reads, phase = [], [], {"training": False}
    real_call, real_get = Collator.__call__, C.FeatureCache.get
    load_te = text_encoder_files.load_text_encoder

    def collate(self, sample, rng, *rest):
        reads.clear()
        phase["training"] = True
        ex = real_call(self, sample, rng, *rest)
        calls.append(set(reads))
        return ex

    def get(self, kind, key):
        reads.append((kind, key))
        return real_get(self, kind, key)

    def te(*a, **k):
        assert not phase["training"], "the text encoder was loaded after training started"
        return load_te(*a, **k)

    monkeypatch.setattr(Collator, "__call__", collate)
    monkeypatch.setattr(C.FeatureCache, "get", get)
    monkeypatch.setattr(text_encoder_files, "load_text_encoder", te)
    res = sft.run(cfg)
    assert res.step == 2 and len(calls) == 4 + 2 * 2  # 4 evaluation draws, 2 steps x batch 2

    on_disk = {("text", p.stem) for p in (cache_dir / "text").rglob("*.safetensors")}
    read_text = {e for c in calls for e in c if e[0] == "text"}
    size = {e: (cache_dir / e[0] / e[1][:2] / f"{e[1]}.safetensors").stat().st_size for c in calls for e in c}
    total = sum(p.stat().st_size for p in cache_dir.rglob("*.safetensors"))
    per_sample = total / len(samples)
    one = sum(sum(size[e] for e in c) for c in calls) / len(calls)  # a variant's text entry + its latents
    text_one = sum(size[e] for c in calls for e in c if e[0] == "text") / len(calls)
    eager = 45 * text_one + (per_sample - len(read_text) / len(samples) * text_one)
    print(f"feature cache per 3-picture sample: {per_sample / 1e3:.1f} kB = {per_sample / one:.2f}x one variant's "
          f"{one / 1e3:.1f} kB ({len(on_disk) / len(samples):.1f} text entries per sample); encoding all 45 variants: "
          f"~{eager / 1e3:.0f} kB = {eager / one:.1f}x. Reported by the run: {res.cache['ratio']:.2f}x "
          f"(largest {res.cache['max_ratio']:.2f}x)")
    assert per_sample <= 3 * one, (per_sample, one)
    assert on_disk == read_text  # nothing encoded that training does not read (and it read nothing else)
    assert res.cache["max_ratio"] <= 3 and res.cache["possible_per_sample"] == 45
    assert res.cache["ratio"] == pytest.approx(per_sample / one, rel=0.35)  # its own per-sample view of the same


def test_variant_budget_bounds_a_long_run(tiny_model_dir, tmp_path, monkeypatch):
    """Over many epochs every drawn variant costs a text entry (here 4 samples x 7 draws each:
    measured 26 entries, 3.79x one variant a sample); ``data.cache_variants=2`` caps a sample at 2
    entries (measured 8, 1.55x), every
    collated example reads one of them (nothing is missing from the cache), and SIA still shows
    each sample in 2 ways."""
    from pathlib import Path

    from firered_trainer import sft
    from firered_trainer.batches import Collator
    from firered_trainer.config import load_config

    jsonl = three_picture_pairs(tmp_path / "pairs")
    shown: dict[str, set] = {}
    real_call = Collator.__call__

    def collate(self, sample, rng, *rest):
        ex = real_call(self, sample, rng, *rest)
        shown.setdefault(sample.target, set()).add((tuple(ex.text.embeds.shape), round(ex.text.embeds.sum().item(), 5)))
        return ex

    monkeypatch.setattr(Collator, "__call__", collate)

    def run(name, *extra):
        shown.clear()
        cache = tmp_path / name
        cfg = load_config(Path(sft.__file__).parent / "configs" / "tiny_cpu.yaml", [
            f"model.path={tiny_model_dir}", f"data.jsonl={jsonl}", f"data.cache_dir={cache}",
            f"output_dir={tmp_path / ('out-' + name)}", "max_steps=12", "checkpoint.every=100", *extra])
        res = sft.run(cfg)
        entries = len(list((cache / "text").rglob("*.safetensors")))
        return res, entries, {k: len(v) for k, v in shown.items()}

    free, free_entries, free_shown = run("free")
    capped, capped_entries, capped_shown = run("capped", "data.cache_variants=2")
    print(f"12 steps x batch 2 over 4 samples: {free_entries} text entries without a budget "
          f"({free.cache['ratio']:.2f}x one variant), {capped_entries} with 2 a sample "
          f"({capped.cache['ratio']:.2f}x); distinct texts shown per sample {sorted(free_shown.values())} / "
          f"{sorted(capped_shown.values())}")
    assert free_entries > 2 * 4 and max(free_shown.values()) > 2
    assert capped_entries <= 2 * 4 and capped.cache["max_ratio"] <= 2 + 1e-9
    assert set(capped_shown.values()) == {2}
