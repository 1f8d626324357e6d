"""The MM-DiT from GGUF files (``*.gguf``, as city96's ComfyUI-GGUF users hold them), kept quantized.

A GGUF file is recognised by its magic bytes ``GGUF`` (never the file name). Files made with
ComfyUI-GGUF's ``tools/convert.py`` (+ llama.cpp's quantizer) carry ``general.architecture =
"qwen_image"`` and the diffusers tensor names of ``QwenImageTransformer2DModel``; 1-D and small
tensors are F32, the rest BF16/F16 or quantized (Q8_0, Q4_0/Q4_1/Q5_0/Q5_1, the K-quants
Q2_K..Q6_K, IQ4_NL/IQ4_XS ...). Files without an architecture (sd.cpp) are judged by their keys;
a ``model.diffusion_model.`` prefix is stripped; ``comfy.gguf.orig_shape.*`` metadata is honoured; a
Qwen-Image-Edit-2511 ``__index_timestep_zero__`` marker tensor builds the model with ``zero_cond_t``
(see :mod:`.transformer_files`).

Loading builds the model the way diffusers' own GGUF support does (``diffusers.quantizers.gguf``:
its ``GGUFQuantizer`` swaps every ``nn.Linear`` whose weight is quantized for ``GGUFLinear``, the
weight staying a ``GGUFParameter`` of raw GGUF blocks (uint8) that is dequantized on the fly, layer
by layer, in ``forward``), but reads the tensors itself: after the header has been checked against
the architecture read from the shapes, each tensor's bytes are read from the file straight into the
tensor the model keeps (one plain read into a fresh allocation, no memory map, no intermediate state
dict), so loading peaks at about the file size (``bench/load_memory.py``: 1.0x, where handing a
state dict to ``from_single_file`` peaked at 2.26x). Unquantized GGUF tensors (F32/F16/BF16) become
ordinary tensors in the compute dtype; a quantized tensor that is not a Linear weight (rare) is
dequantized once at load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._common import FORMAT_WORDS, GGUFFileError, describe_keys, gguf_field, gguf_module, open_gguf, sniff
from .transformer_config import INDEX_TIMESTEP_ZERO, ZERO_COND_T_NOTE, config_from_shapes

__all__ = [
    "GGUFFileError",
    "GGUFInfo",
    "inspect_gguf",
    "is_gguf",
    "load_gguf_transformer",
    "quantized_linear_count",
]

log = logging.getLogger(__name__)

EXPECTED = (
    "a Qwen-Image / FireRed-Image-Edit MM-DiT GGUF file (general.architecture 'qwen_image', e.g. from ComfyUI-GGUF)"
)
IMAGE_ARCHS = {"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan", "lumina2"}
TEXT_ARCHS = {"t5", "t5encoder", "llama", "qwen2vl", "qwen3", "qwen3vl", "clip"}
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")


@dataclass
class GGUFInfo:
    """What :func:`inspect_gguf` found (no tensor data is read).

    architecture: ``general.architecture`` (None for files without one); prefix: the key prefix
    stripped; shapes: ``{name: torch shape}`` (dequantized shapes); qtypes: ``{name: GGML type name}``;
    type_counts: ``{GGML type name: tensor count}``; config: ``QwenImageTransformer2DModel`` kwargs.
    """

    architecture: str | None
    prefix: str
    shapes: dict[str, tuple[int, ...]]
    qtypes: dict[str, str]
    type_counts: dict[str, int] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    markers: tuple[str, ...] = ()


def is_gguf(path) -> bool:
    return Path(path).is_file() and sniff(path) == "gguf"


def _orig_shape(reader, name):
    v = gguf_field(reader, f"comfy.gguf.orig_shape.{name}")
    return tuple(int(x) for x in v) if v else None


def inspect_gguf(path) -> GGUFInfo:
    """Read a GGUF file's header: architecture, tensor names, shapes and types, and the model config.

    Raises :class:`GGUFFileError` naming the file, what it holds and what was expected.
    """
    p = Path(path)
    kind = sniff(p, error=GGUFFileError, expected=EXPECTED)
    if kind != "gguf":
        raise GGUFFileError(
            f"{str(p)!r} is {FORMAT_WORDS.get(kind, 'a ' + kind + ' file')}, but {EXPECTED} was expected"
        )
    reader = open_gguf(p, GGUFFileError)
    arch = gguf_field(reader, "general.architecture")
    arch = str(arch) if arch is not None else None
    if arch in TEXT_ARCHS or gguf_field(reader, "general.type") in ("mmproj", "clip-vision"):
        raise GGUFFileError(
            f"{str(p)!r} is a GGUF text / vision encoder (architecture {arch!r}), but {EXPECTED} was expected"
        )
    if arch in IMAGE_ARCHS:
        raise GGUFFileError(f"{str(p)!r} is a GGUF {arch!r} model, but {EXPECTED} was expected")
    names = [t.name for t in reader.tensors]
    prefix = next((c for c in PREFIXES if sum(n.startswith(c) for n in names) > len(names) // 2), "")
    shapes, qtypes, counts, markers = {}, {}, {}, []
    for t in reader.tensors:
        if prefix and not t.name.startswith(prefix):
            continue
        name = t.name[len(prefix) :]
        if name == INDEX_TIMESTEP_ZERO:
            markers.append(name)
            continue
        shapes[name] = _orig_shape(reader, t.name) or tuple(int(v) for v in reversed(t.shape.tolist()))
        qname = getattr(t.tensor_type, "name", str(t.tensor_type))
        qtypes[name] = qname
        counts[qname] = counts.get(qname, 0) + 1
    if "img_in.weight" not in shapes or "txt_norm.weight" not in shapes:
        found = (
            f"a GGUF {arch!r} file holding {describe_keys(shapes)}"
            if arch
            else f"a GGUF file holding {describe_keys(shapes)}"
        )
        raise GGUFFileError(f"{str(p)!r} is {found}, but {EXPECTED} was expected")
    base = {"zero_cond_t": True} if markers else None
    config = config_from_shapes(shapes, base, where=f"{str(p)!r} (a Qwen-Image GGUF)", error=GGUFFileError)
    return GGUFInfo(arch, prefix, shapes, qtypes, counts, config, tuple(markers))


def _expected(config: dict):
    """Names, shapes and Linear-weight names of the model for ``config`` (built without weights)."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    with init_empty_weights():
        model = QwenImageTransformer2DModel(**config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return shapes, linear


def _read_raw(fh, t, path: Path) -> torch.Tensor:
    """The bytes of GGUF tensor ``t`` read from the open file into a fresh uint8 tensor."""
    n = int(t.n_bytes)
    raw = torch.empty(n, dtype=torch.uint8)
    try:
        fh.seek(int(t.data_offset))
        got = fh.readinto(memoryview(raw.numpy())) if n else 0
    except OSError as e:
        raise GGUFFileError(f"{str(path)!r}: tensor {t.name} cannot be read ({e}); the file is truncated or corrupt") from None
    if got != n:
        raise GGUFFileError(
            f"{str(path)!r}: tensor {t.name} has {got} of its {n} bytes; the file is truncated or corrupt"
        )
    return raw


def _assign(model, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(value, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = value
    else:
        raise KeyError(name)


def load_gguf_transformer(path, *, dtype: torch.dtype = torch.bfloat16, device="cpu"):
    """Load a GGUF MM-DiT as a diffusers ``QwenImageTransformer2DModel`` whose quantized Linear layers
    stay quantized (``GGUFLinear`` with ``GGUFParameter`` weights, dequantized per layer in forward).

    Args:
        path: a ``*.gguf`` file (detected by content).
        dtype: compute dtype, and the dtype of the unquantized tensors.
        device: where the model goes; quantized blocks move as they are.

    Raises:
        GGUFFileError: not a GGUF, truncated, another architecture, missing / extra tensors, or a
            quantization type diffusers cannot dequantize; the message names the file, what was
            found and what was expected.
    """
    gguf = gguf_module()  # first: diffusers' GGUF code needs it too
    import accelerate
    from diffusers import GGUFQuantizationConfig, QwenImageTransformer2DModel
    from diffusers.quantizers.gguf import GGUFQuantizer
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter, dequantize_gguf_tensor

    p = Path(path)
    info = inspect_gguf(p)
    expected, linear = _expected(info.config)
    missing = sorted(set(expected) - set(info.shapes))
    extra = sorted(set(info.shapes) - set(expected))
    if missing or extra:
        raise GGUFFileError(
            f"{str(p)!r} is a Qwen-Image GGUF with the wrong tensors for a {info.config['num_layers']}-block model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    bad = {n: s for n, s in info.shapes.items() if expected[n] != s}
    if bad:
        n = next(iter(bad))
        raise GGUFFileError(f"{str(p)!r}: {n} has shape {bad[n]}, expected {expected[n]}")
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    plain_dtypes = {gguf.GGMLQuantizationType.F32: torch.float32, gguf.GGMLQuantizationType.F16: torch.float16,
                    gguf.GGMLQuantizationType.BF16: torch.bfloat16}
    reader = open_gguf(p, GGUFFileError)
    # 1. what each tensor becomes, from the header alone (no tensor data is touched yet)
    plan: list[tuple[str, Any, str]] = []  # (name, reader tensor, "linear" | "plain" | "dequantize")
    for t in reader.tensors:
        if info.prefix and not t.name.startswith(info.prefix):
            continue
        name = t.name[len(info.prefix) :]
        if name in info.markers:
            continue
        qtype = t.tensor_type
        if qtype in plain:
            plan.append((name, t, "plain"))
            continue
        if qtype not in SUPPORTED_GGUF_QUANT_TYPES:
            supported = ", ".join(sorted(getattr(q, "name", str(q)) for q in SUPPORTED_GGUF_QUANT_TYPES))
            raise GGUFFileError(
                f"{str(p)!r}: tensor {name} is quantized as {getattr(qtype, 'name', qtype)}, which cannot be "
                f"dequantized here (supported: F32, F16, BF16, {supported})"
            )
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        shape = info.shapes[name]
        fits = len(shape) == 2 and shape[-1] % block == 0
        quant_shape = (shape[0], shape[1] // block * type_size) if fits else None
        reshaped = _orig_shape(reader, t.name) is not None
        kept = name in linear and not reshaped and quant_shape is not None and t.n_bytes == quant_shape[0] * quant_shape[1]
        plan.append((name, t, "linear" if kept else "dequantize"))
    # 2. the model without weights, its quantized Linears swapped for GGUFLinear (diffusers' own
    # quantizer does the swap, so the model is exactly what ``from_single_file`` would build)
    with accelerate.init_empty_weights(include_buffers=False):
        model = QwenImageTransformer2DModel(**info.config)
    quantizer = GGUFQuantizer(GGUFQuantizationConfig(compute_dtype=dtype))
    markers = {name: GGUFParameter(torch.empty(0, dtype=torch.uint8), quant_type=t.tensor_type)
               for name, t, how in plan if how == "linear"}
    keep_fp32 = list(model._keep_in_fp32_modules or [])
    quantizer.preprocess_model(model=model, device_map=None, state_dict=markers, keep_in_fp32_modules=keep_fp32)
    # 3. every tensor read from the file straight into the tensor the model keeps (plain reads into
    # a fresh allocation, never a memory map: the file's pages are not held on top of the weights,
    # so the peak is about one file size; see bench/load_memory.py)
    try:
        fh = open(p, "rb")
    except OSError as e:
        raise GGUFFileError(f"{str(p)!r} cannot be opened ({e})") from None
    try:
        for name, t, how in plan:
            raw = _read_raw(fh, t, p)
            shape = info.shapes[name]
            if how == "plain":
                data = raw.view(plain_dtypes[t.tensor_type]).reshape(shape)
                target = torch.float32 if any(k in name.split(".") for k in keep_fp32) else dtype
                value = data if data.dtype == target else data.to(target)
            elif how == "linear":
                block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
                value = GGUFParameter(raw.view(shape[0], shape[1] // block * type_size), quant_type=t.tensor_type)
            else:  # not a Linear weight (or stored reshaped): dequantize once
                deq = dequantize_gguf_tensor(GGUFParameter(raw.view(1, -1), quant_type=t.tensor_type))
                value = deq.reshape(shape).to(dtype)
            _assign(model, name, value)
            del raw
    finally:
        fh.close()
    del reader
    left = [n for n, v in list(model.named_parameters()) + list(model.named_buffers()) if v.device.type == "meta"]
    if left:
        raise GGUFFileError(f"could not build the MM-DiT from {str(p)!r}: tensors never loaded: {left[:5]}")
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    if info.markers:
        log.info("%s: %s", p, ZERO_COND_T_NOTE)
    model = model.to(device) if str(device) != "cpu" else model
    return model.eval().requires_grad_(False)


def quantized_linear_count(model) -> int:
    """How many Linear layers of ``model`` hold GGUF-quantized weights."""
    return sum(
        1
        for m in model.modules()
        if getattr(getattr(m, "weight", None), "quant_type", None) is not None and isinstance(m, torch.nn.Linear)
    )
