"""A tiny offline Qwen2.5-VL tokenizer and processor (byte-level BPE trained here on a small corpus
with the real added tokens and chat template), for the tiny model folders of :mod:`firered_core.tiny`."""

from __future__ import annotations

import json
import pathlib
from typing import Any

#: The system part of the edit prompt template of ``QwenImageEditPlusPipeline``.
#: With the real Qwen tokenizer it is exactly 64 tokens, which the pipeline drops
#: (``prompt_template_encode_start_idx``); the tiny tokenizer reproduces that count.
EDIT_TEMPLATE_PREFIX: str = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
    "objects, background), then explain how the user's text instruction should alter or modify the "
    "image. Generate a new image that meets the user's requirements while maintaining consistency "
    "with the original input where appropriate.<|im_end|>\n<|im_start|>user\n"
)

#: Added tokens of the Qwen2.5-VL tokenizer, in their real order, with their "special" flag.
#: They get consecutive ids right after the BPE vocabulary, as in the real tokenizer
#: (where ``<|endoftext|>`` is 151643).
QWEN_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

# Same pre-tokenisation as the real Qwen2 tokenizer (and transformers' Qwen2Tokenizer).
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# A small English training corpus.  It contains every prompt template that the
# Qwen-Image pipelines use, so each word of those templates becomes one token (as
# with the real 151k-token vocabulary), plus common words of editing instructions.
_CORPUS: tuple[str, ...] = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.",
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:",
    "You are a helpful assistant.",
    "system\nuser\nassistant\n",
    "Picture 1: Picture 2: Picture 3: Video 1: Video 2:",
    "make it red. make it blue. make it green. make it yellow. make it black and white.",
    "Change the color of the car to red and keep everything else the same.",
    "Replace the background with a sunny beach and blue sky.",
    "Add a small cat sitting on the wooden table next to the cup.",
    "Remove the person on the left side of the picture.",
    "Turn the photo into a watercolor painting with soft light.",
    "Make the sky darker, as if it were night, with bright stars and a full moon.",
    "Put a red hat on the dog and make him smile.",
    "Change the text on the sign to say hello world.",
    "The woman in the first picture is wearing the dress from the second picture.",
    "Let the man hold a cup of coffee in his right hand.",
    "Convert the image to a pencil sketch, high quality, sharp details.",
    "Increase the brightness and contrast, keep the face and the pose unchanged.",
    "A photo of a house with a garden, trees, flowers, a road and a white fence.",
    "Move the chair to the right and rotate the camera view to the left.",
    "Restore this old photo, remove the scratches and add natural colors.",
    "Show the same person from behind, standing in front of a mountain lake.",
    "What is in this image? Please answer the question in one short sentence.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
)



def write_json(path: pathlib.Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _chat_template() -> str:
    """A Qwen2-VL style chat template (ChatML, vision placeholders, optional "Picture N:" ids)."""
    nl = "{{ '\\n' }}"
    return (
        "{%- set image_count = namespace(value=0) -%}"
        "{%- set video_count = namespace(value=0) -%}"
        "{%- for message in messages -%}"
        "{%- if loop.first and message['role'] != 'system' -%}"
        "<|im_start|>system" + nl + "You are a helpful assistant.<|im_end|>" + nl + ""
        "{%- endif -%}"
        "<|im_start|>{{ message['role'] }}" + nl + ""
        "{%- if message['content'] is string -%}"
        "{{ message['content'] }}"
        "{%- else -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
        "{%- set image_count.value = image_count.value + 1 -%}"
        "{%- if add_vision_id -%}Picture {{ image_count.value }}: {% endif -%}"
        "<|vision_start|><|image_pad|><|vision_end|>"
        "{%- elif part['type'] == 'video' or 'video' in part -%}"
        "{%- set video_count.value = video_count.value + 1 -%}"
        "{%- if add_vision_id -%}Video {{ video_count.value }}: {% endif -%}"
        "<|vision_start|><|video_pad|><|vision_end|>"
        "{%- elif 'text' in part -%}"
        "{{ part['text'] }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "<|im_end|>" + nl + ""
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}<|im_start|>assistant" + nl + "{%- endif -%}"
    )


def _train_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE on the built-in corpus; returns (vocab, merges) without added tokens."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # Training is deterministic: merges are picked by count, ties broken by the token ids,
    # which come from the sorted byte alphabet (checked across processes by the tests).
    tok.train_from_iterator(list(_CORPUS), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return vocab, merges  # type: ignore[return-value]


def make_tiny_tokenizer(bpe_vocab_size: int = 1024) -> tuple[Any, dict[str, int], list[tuple[str, str]]]:
    """Build the tiny ``Qwen2Tokenizer`` in memory (deterministic, offline).

    The byte-level BPE is trained on a small built-in English corpus until every word
    of it is a single token (about 760 entries), unless ``bpe_vocab_size`` stops it
    earlier (then the edit template prefix is no longer 64 tokens).  The Qwen2.5-VL
    added tokens (:data:`QWEN_SPECIAL_TOKENS`) follow the BPE vocabulary.  Like the
    real tokenizer: ``eos_token`` is ``<|im_end|>``, ``pad_token`` is ``<|endoftext|>``,
    no ``bos_token`` and no ``unk_token``.

    Returns:
        A tuple ``(tokenizer, vocab, merges)``: the ``transformers.Qwen2Tokenizer``, the
        BPE vocabulary (without added tokens) and the list of merges.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe(bpe_vocab_size)
    full_vocab = dict(vocab)
    for i, (token, _special) in enumerate(QWEN_SPECIAL_TOKENS):
        full_vocab[token] = len(vocab) + i
    specials = [t for t, special in QWEN_SPECIAL_TOKENS if special]
    tokenizer = Qwen2Tokenizer(
        vocab=full_vocab,
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in specials if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=131072,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, s in QWEN_SPECIAL_TOKENS if not s])
    for i, (token, _special) in enumerate(QWEN_SPECIAL_TOKENS):
        got = tokenizer.convert_tokens_to_ids(token)
        if got != len(vocab) + i:  # pragma: no cover - guards against library changes
            raise RuntimeError(f"tiny tokenizer: {token} got id {got}, expected {len(vocab) + i}")
    return tokenizer, vocab, merges


def save_tokenizer(tokenizer: Any, vocab: dict[str, int], merges: list[tuple[str, str]], folder: pathlib.Path) -> None:
    """Save tokenizer.json + tokenizer_config.json, and the classic vocab.json + merges.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    _write_vocab_and_merges(vocab, merges, folder)


def _write_vocab_and_merges(vocab: dict[str, int], merges: list[tuple[str, str]], folder: pathlib.Path) -> None:
    """The classic GPT-2 style files of the real release (the BPE part, without added tokens)."""
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _image_processor_kwargs() -> dict[str, Any]:
    return {
        "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 16384,
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }


def save_processor(
    tokenizer: Any, vocab: dict[str, int], merges: list[tuple[str, str]], folder: pathlib.Path
) -> None:
    """Write the ``processor/`` folder.

    Uses ``Qwen2VLProcessor.save_pretrained``.  transformers 5 cannot build a
    ``Qwen2VLProcessor`` without a working torchvision (its video processor needs
    it); in that case the same files are written by hand so the folder is still
    complete (it then needs torchvision only when it is loaded).
    """
    from transformers import Qwen2VLProcessor

    kwargs = _image_processor_kwargs()
    try:
        # The video processor first: it fails fast without torchvision (the image processor
        # would instead fall back to its PIL variant with a warning).
        from transformers import Qwen2VLVideoProcessor

        video_processor = Qwen2VLVideoProcessor(**kwargs)
        from transformers import Qwen2VLImageProcessor

        processor = Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(**kwargs),
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=_chat_template(),
        )
    except (ImportError, RuntimeError, OSError):  # no torchvision, or a build that cannot load here
        processor = None
    if processor is not None:
        processor.save_pretrained(str(folder))
    else:
        _write_processor_files_by_hand(tokenizer, folder)
    _write_vocab_and_merges(vocab, merges, folder)


def _write_processor_files_by_hand(tokenizer: Any, folder: pathlib.Path) -> None:
    """What ``Qwen2VLProcessor.save_pretrained`` writes in transformers 5.x, without torchvision."""
    kwargs = _image_processor_kwargs()
    common = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": kwargs["image_mean"],
        "image_std": kwargs["image_std"],
        "merge_size": kwargs["merge_size"],
        "patch_size": kwargs["patch_size"],
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": kwargs["max_pixels"], "shortest_edge": kwargs["min_pixels"]},
        "temporal_patch_size": kwargs["temporal_patch_size"],
    }
    config = {
        "image_processor": {**common, "image_processor_type": "Qwen2VLImageProcessor"},
        "processor_class": "Qwen2VLProcessor",
        "video_processor": {
            **common,
            "do_sample_frames": False,
            "max_frames": 768,
            "max_video_tokens": 128000,
            "min_frames": 4,
            "return_metadata": False,
            "video_processor_type": "Qwen2VLVideoProcessor",
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(tokenizer, "_set_processor_class"):
        tokenizer._set_processor_class("Qwen2VLProcessor")  # as ProcessorMixin.save_pretrained does
    tokenizer.save_pretrained(str(folder))
    write_json(folder / "processor_config.json", config)
    (folder / "chat_template.jinja").write_text(_chat_template(), encoding="utf-8")
