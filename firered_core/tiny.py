"""Build a tiny, randomly initialised FireRed-Image-Edit model folder for tests.

FireRed-Image-Edit has the architecture of Qwen-Image-Edit-2509 and is run by
diffusers' ``QwenImageEditPlusPipeline``.  :func:`make_tiny` writes a complete
model folder in the Hugging Face release layout::

    model_index.json
    scheduler/scheduler_config.json
    text_encoder/   Qwen2_5_VLForConditionalGeneration (with its vision tower)
    tokenizer/      Qwen2Tokenizer (byte-level BPE trained here, offline)
    processor/      Qwen2VLProcessor (image + video processor, tokenizer, chat template)
    transformer/    QwenImageTransformer2DModel
    vae/            AutoencoderKLQwenImage (real 8x spatial layout and latent statistics)

Everything is built locally: no network access and no downloaded files.  The
output only depends on the arguments, so two calls with the same arguments write
byte-identical weight files.

The heavy libraries (torch, diffusers, transformers, tokenizers) are imported
inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

__all__ = [
    "EDIT_TEMPLATE_PREFIX",
    "LATENTS_MEAN",
    "LATENTS_STD",
    "QWEN_SPECIAL_TOKENS",
    "TinyTextConfig",
    "default_axes_dims_rope",
    "make_tiny",
    "make_tiny_tokenizer",
]

#: Per-channel latent statistics of the real Qwen-Image VAE (16 channels).
LATENTS_MEAN: list[float] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
LATENTS_STD: list[float] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip

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


def default_axes_dims_rope(attention_head_dim: int) -> tuple[int, int, int]:
    """Split a transformer head dimension into the three RoPE axes (frame, height, width).

    Follows the proportions of the real model (``[16, 56, 56]`` for 128): about one
    eighth for the frame axis, the rest split evenly, every part even.
    Examples: 16 -> (4, 6, 6), 32 -> (4, 14, 14), 64 -> (8, 28, 28), 128 -> (16, 56, 56).
    """
    if attention_head_dim < 6 or attention_head_dim % 2:
        raise ValueError(f"attention_head_dim must be an even number >= 6, got {attention_head_dim}")
    frame = max(2, 2 * round(attention_head_dim / 16))
    if (attention_head_dim - frame) % 4:
        frame += 2
    rest = (attention_head_dim - frame) // 2
    return frame, rest, rest


@dataclasses.dataclass(frozen=True)
class TinyTextConfig:
    """Sizes of the tiny Qwen2.5-VL text encoder (text model and vision tower).

    The defaults are a miniature of Qwen2.5-VL-7B: grouped-query attention (2 heads,
    1 key/value head, head dim 32), M-RoPE with the real section proportions, a
    windowed vision tower whose last block uses full attention, patch 14, spatial
    merge 2 and temporal patch 2.  ``hidden_size`` is also the transformer's
    ``joint_attention_dim``.
    """

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    #: M-RoPE split of head_dim/2 over (time, height, width); default like the real [16, 24, 24].
    mrope_section: tuple[int, int, int] | None = None
    vision_hidden_size: int = 32
    vision_intermediate_size: int = 64
    vision_depth: int = 2
    vision_num_heads: int = 2

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        half = self.hidden_size // self.num_attention_heads // 2
        if self.mrope_section is None:
            first = max(1, half // 4)
            rest = half - first
            object.__setattr__(self, "mrope_section", (first + rest % 2, rest // 2, rest // 2))
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != half:
            raise ValueError(f"mrope_section {self.mrope_section} must be 3 numbers summing to head_dim/2 = {half}")
        vision_head_dim, remainder = divmod(self.vision_hidden_size, self.vision_num_heads)
        if remainder or vision_head_dim % 4:
            raise ValueError("vision head dim (vision_hidden_size / vision_num_heads) must be a multiple of 4")


# --------------------------------------------------------------------------- helpers


def _write_json(path: pathlib.Path, data: Any) -> None:
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


def _save_tokenizer(tokenizer: Any, vocab: dict[str, int], merges: list[tuple[str, str]], folder: pathlib.Path) -> None:
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


def _save_processor(
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
    _write_json(folder / "processor_config.json", config)
    (folder / "chat_template.jinja").write_text(_chat_template(), encoding="utf-8")


def _reinit_zero_weights(module: Any, std: float = 0.02) -> None:
    """Give every all-zero weight matrix (e.g. zero-initialised output projections) small random values."""
    import torch

    with torch.no_grad():
        for param in module.parameters():
            if param.ndim >= 2 and not torch.any(param):
                param.normal_(0.0, std)


# --------------------------------------------------------------------------- main entry


def make_tiny(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int | None = None,
    width: int | None = None,
    axes_dims_rope: tuple[int, int, int] | list[int] | None = None,
    vae_base_dim: int = 16,
    vae_num_res_blocks: int = 1,
    text: TinyTextConfig | None = None,
    bpe_vocab_size: int = 1024,
) -> pathlib.Path:
    """Write a complete tiny random FireRed-Image-Edit model folder and return its path.

    The folder has the Hugging Face release layout and loads fully offline with
    ``diffusers.QwenImageEditPlusPipeline.from_pretrained(path)`` (which, with
    transformers 5, needs torchvision for the processor).  All weights are float32
    safetensors; the output is deterministic for given arguments.

    Args:
        path: Folder to write (created if needed; existing files are overwritten).
        seed: Seed of the random weights (``torch.manual_seed(seed + k)`` before model ``k``).
        num_layers: Number of transformer (MMDiT) blocks.
        num_attention_heads: Transformer attention heads.
        attention_head_dim: Transformer head dimension; default ``width // num_attention_heads``
            when ``width`` is given, else 16.
        width: Transformer inner width (``num_attention_heads * attention_head_dim``), an
            alternative to ``attention_head_dim``; e.g. ``width=512, num_attention_heads=4``.
        axes_dims_rope: RoPE split of the head dimension (frame, height, width); must sum to
            ``attention_head_dim``; default :func:`default_axes_dims_rope`.
        vae_base_dim: Base channel count of the VAE (real model: 96).
        vae_num_res_blocks: Residual blocks per VAE stage (real model: 2). ComfyUI's ``VAELoader``
            builds only the real configuration (96, 2), see :func:`make_tiny_comfyui`.
        text: Sizes of the text encoder; default :class:`TinyTextConfig()`.
        bpe_vocab_size: Upper bound of the BPE vocabulary size (training stops earlier once
            every word of the built-in corpus is a single token).

    Returns:
        The model folder as a ``pathlib.Path``.
    """
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from diffusers import __version__ as diffusers_version
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = text or TinyTextConfig()

    if attention_head_dim is None:
        if width is not None:
            if width % num_attention_heads:
                raise ValueError(f"width {width} is not divisible by num_attention_heads {num_attention_heads}")
            attention_head_dim = width // num_attention_heads
        else:
            attention_head_dim = 16
    elif width is not None and width != num_attention_heads * attention_head_dim:
        raise ValueError("width must equal num_attention_heads * attention_head_dim")
    axes = tuple(axes_dims_rope) if axes_dims_rope is not None else default_axes_dims_rope(attention_head_dim)
    if len(axes) != 3 or sum(axes) != attention_head_dim or any(a % 2 for a in axes):
        raise ValueError(f"axes_dims_rope {axes} must be 3 even numbers summing to {attention_head_dim}")

    root = pathlib.Path(path)
    root.mkdir(parents=True, exist_ok=True)

    # ---- tokenizer (+ processor) ---------------------------------------------------------
    tokenizer, vocab, merges = make_tiny_tokenizer(bpe_vocab_size)
    _save_tokenizer(tokenizer, vocab, merges, root / "tokenizer")
    _save_processor(tokenizer, vocab, merges, root / "processor")
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok, _ in QWEN_SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // 64) * 64  # cover all tokens, padded like the real model

    # ---- scheduler -------------------------------------------------------------------------
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        invert_sigmas=False,
        shift_terminal=0.02,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        time_shift_type="exponential",
        stochastic_sampling=False,
    )
    scheduler.save_pretrained(str(root / "scheduler"))

    # ---- text encoder (Qwen2.5-VL with vision tower) ------------------------------------------
    te_config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size,
            "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": text.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-6,
            "use_sliding_window": False,
            "max_window_layers": text.num_hidden_layers,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": list(text.mrope_section),
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": text.vision_depth,
            "hidden_size": text.vision_hidden_size,
            "intermediate_size": text.vision_intermediate_size,
            "num_heads": text.vision_num_heads,
            "hidden_act": "silu",
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
            "out_hidden_size": text.hidden_size,
            "fullatt_block_indexes": [text.vision_depth - 1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(te_config).eval()
    text_encoder.save_pretrained(str(root / "text_encoder"))
    del text_encoder

    # ---- transformer (MMDiT) -----------------------------------------------------------------
    torch.manual_seed(seed + 1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=text.hidden_size,
        guidance_embeds=False,
        axes_dims_rope=axes,
    )
    _reinit_zero_weights(transformer)
    transformer.save_pretrained(str(root / "transformer"), safe_serialization=True)
    del transformer

    # ---- VAE -------------------------------------------------------------------------------
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=vae_base_dim,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=vae_num_res_blocks,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
        latents_mean=list(LATENTS_MEAN),
        latents_std=list(LATENTS_STD),
    )
    _reinit_zero_weights(vae)
    vae.save_pretrained(str(root / "vae"), safe_serialization=True)
    del vae

    # ---- model_index.json ------------------------------------------------------------------
    _write_json(
        root / "model_index.json",
        {
            "_class_name": "QwenImageEditPlusPipeline",
            "_diffusers_version": diffusers_version,
            "processor": ["transformers", "Qwen2VLProcessor"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "transformer": ["diffusers", "QwenImageTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKLQwenImage"],
        },
    )
    return root


#: file names of :func:`make_tiny_comfyui`, relative to the ``models/`` folder it writes
COMFYUI_FILES = {
    "transformer": "diffusion_models/firered_tiny.safetensors",
    "transformer_fp8": "diffusion_models/firered_tiny_fp8_scaled.safetensors",
    "transformer_gguf": "diffusion_models/firered_tiny-Q8_0.gguf",
    "text_encoder": "text_encoders/qwen_2.5_vl_tiny.safetensors",
    "tokenizer": "text_encoders/qwen_2.5_vl_tiny_tokenizer",
    "vae": "vae/qwen_image_vae_tiny.safetensors",
    "lora": "loras/firered_tiny_lora.safetensors",
}


#: the release file names the shipped workflows (``workflows/*.json``) load; :func:`make_tiny_comfyui`
#: links them to the tiny files so every workflow runs unchanged on the tiny model
WORKFLOW_FILES = {
    "transformer": "diffusion_models/FireRed-Image-Edit-1.1-transformer.safetensors",
    "text_encoder": "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
    "tokenizer": "text_encoders/qwen_2.5_vl_7b_fp8_scaled_tokenizer",
    "vae": "vae/qwen_image_vae.safetensors",
    "lora": "loras/FireRed-Image-Edit-1.0-Lightning-8steps-v1.1.safetensors",
}


def _link(target: pathlib.Path, link: pathlib.Path) -> None:
    """A relative symlink ``link -> target`` (a copy where symlinks are not allowed)."""
    import shutil

    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    try:
        link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=target.is_dir())
    except OSError:
        (shutil.copytree if target.is_dir() else shutil.copyfile)(target, link)


#: the VAE configuration ComfyUI's ``VAELoader`` builds for every Wan-2.1 / Qwen-Image VAE file
#: (``comfy/sd.py``: dim 96, 2 residual blocks per stage, whatever the file holds)
COMFYUI_VAE = {"vae_base_dim": 96, "vae_num_res_blocks": 2}


def make_tiny_comfyui(
    models_dir: str | os.PathLike, *, seed: int = 0, num_layers: int = 2, workflow_names: bool = True
) -> dict[str, pathlib.Path]:
    """Write the tiny model as a ComfyUI ``models/`` folder, in the files users hold.

    ``diffusion_models/``: the MM-DiT as a prefixed single file, as scaled fp8 and as GGUF Q8_0;
    ``text_encoders/``: the Qwen2.5-VL file (ComfyUI's key layout) and, beside it, the tiny
    tokenizer folder it needs (the tiny vocabulary is not Qwen's); ``vae/``: the VAE in ComfyUI's
    layout, in the real configuration (:data:`COMFYUI_VAE`, random weights, about 127 M parameters):
    ComfyUI's own ``VAELoader`` builds only that one, so native ``VAEEncode`` / ``VAEDecode`` load it;
    it equals ``make_tiny(seed=seed, **COMFYUI_VAE)``'s VAE; ``loras/``: a small random LoRA in ComfyUI's ``diffusion_model.`` lora_up / lora_down
    layout. With ``workflow_names``, the release file names the shipped workflows use
    (:data:`WORKFLOW_FILES`) link to the tiny files. Returns the paths by role (:data:`COMFYUI_FILES`).
    """
    import shutil
    import tempfile

    import torch
    from safetensors.torch import load_file, save_file

    from .formats import writers

    root = pathlib.Path(models_dir)
    paths = {k: root / v for k, v in COMFYUI_FILES.items()}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny(pathlib.Path(tmp) / "tiny", seed=seed, num_layers=num_layers, **COMFYUI_VAE)
        (tr_file,) = (folder / "transformer").glob("*.safetensors")
        tr = load_file(tr_file)
        save_file(writers.transformer_to_comfyui(tr), paths["transformer"])
        save_file(writers.transformer_to_comfyui(writers.to_scaled_fp8(tr)), paths["transformer_fp8"])
        writers.write_gguf(tr, paths["transformer_gguf"], "Q8_0")
        (te_file,) = (folder / "text_encoder").glob("*.safetensors")
        shutil.copyfile(te_file, paths["text_encoder"])
        if paths["tokenizer"].exists():
            shutil.rmtree(paths["tokenizer"])
        shutil.copytree(folder / "tokenizer", paths["tokenizer"])
        (vae_file,) = (folder / "vae").glob("*.safetensors")
        vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
        save_file(writers.vae_to_comfyui(load_file(vae_file), vae_cfg["num_res_blocks"]), paths["vae"])
        g = torch.Generator().manual_seed(seed + 7)
        lora = {}
        for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj"):
            w = tr[f"{name}.weight"]
            lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.5
            lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.5
            lora[f"diffusion_model.{name}.alpha"] = torch.tensor(4.0)
        save_file(lora, paths["lora"])
    if workflow_names:
        for role, name in WORKFLOW_FILES.items():
            _link(paths[role], root / name)
    return paths
