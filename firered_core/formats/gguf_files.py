"""The MM-DiT from GGUF files (``*.gguf``, as city96's ComfyUI-GGUF users hold them), kept quantized.

A GGUF file is recognised by its magic bytes ``GGUF`` (never the file name). Files made with
ComfyUI-GGUF's ``tools/convert.py`` (+ llama.cpp's quantizer) carry ``general.architecture =
"qwen_image"`` and the diffusers tensor names of ``QwenImageTransformer2DModel``; 1-D and small
tensors are F32, the rest BF16/F16 or quantized (Q8_0, Q4_0/Q4_1/Q5_0/Q5_1, the K-quants
Q2_K..Q6_K, IQ4_NL/IQ4_XS ...). Files without an architecture (sd.cpp) are judged by their keys;
a ``model.diffusion_model.`` prefix is stripped; ``comfy.gguf.orig_shape.*`` metadata is honoured.

Loading goes through diffusers' own GGUF support (``diffusers.quantizers.gguf``): the state dict we
read here (validated against the architecture read from the shapes) is handed to
``QwenImageTransformer2DModel.from_single_file(..., quantization_config=GGUFQuantizationConfig)``,
which builds the model without weights and swaps every ``nn.Linear`` whose weight is quantized for
``GGUFLinear``: the weight stays a ``GGUFParameter`` of raw GGUF blocks (uint8) in memory and is
dequantized on the fly, layer by layer, in ``forward``. Unquantized GGUF tensors (F32/F16/BF16)
become ordinary tensors in the compute dtype; a quantized tensor that is not a Linear weight (rare)
is dequantized once at load.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._common import FORMAT_WORDS, GGUFFileError, describe_keys, sniff
from .transformer_files import config_from_shapes

__all__ = [
    "GGUFFileError",
    "GGUFInfo",
    "inspect_gguf",
    "is_gguf",
    "load_gguf_transformer",
    "quantized_linear_count",
]

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


def is_gguf(path) -> bool:
    return Path(path).is_file() and sniff(path) == "gguf"


def _field(reader, name):
    f = reader.get_field(name)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - a malformed field is treated as absent
        return None


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install 'gguf>=0.10.0'") from None
    return gguf


def _reader(path: Path):
    gguf = _gguf()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, TypeError, EOFError) as e:
        raise GGUFFileError(
            f"{str(path)!r} is a truncated or corrupt GGUF file ({type(e).__name__}: {e}); download it again"
        ) from None


def _orig_shape(reader, name):
    v = _field(reader, f"comfy.gguf.orig_shape.{name}")
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
    reader = _reader(p)
    arch = _field(reader, "general.architecture")
    arch = str(arch) if arch is not None else None
    if arch in TEXT_ARCHS or _field(reader, "general.type") in ("mmproj", "clip-vision"):
        raise GGUFFileError(
            f"{str(p)!r} is a GGUF text / vision encoder (architecture {arch!r}), but {EXPECTED} was expected"
        )
    if arch in IMAGE_ARCHS:
        raise GGUFFileError(f"{str(p)!r} is a GGUF {arch!r} model, but {EXPECTED} was expected")
    names = [t.name for t in reader.tensors]
    prefix = next((c for c in PREFIXES if sum(n.startswith(c) for n in names) > len(names) // 2), "")
    shapes, qtypes, counts = {}, {}, {}
    for t in reader.tensors:
        if prefix and not t.name.startswith(prefix):
            continue
        name = t.name[len(prefix) :]
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
    config = config_from_shapes(shapes, where=f"{str(p)!r} (a Qwen-Image GGUF)", error=GGUFFileError)
    return GGUFInfo(arch, prefix, shapes, qtypes, counts, config)


def _expected(config: dict):
    """Names, shapes and Linear-weight names of the model for ``config`` (built without weights)."""
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    with init_empty_weights():
        model = QwenImageTransformer2DModel(**config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return shapes, linear


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
    gguf = _gguf()  # first: diffusers' GGUF code needs it too
    import numpy as np
    from diffusers import GGUFQuantizationConfig, QwenImageTransformer2DModel
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
    reader = _reader(p)
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if info.prefix and not t.name.startswith(info.prefix):
            continue
        name = t.name[len(info.prefix) :]
        shape = info.shapes[name]
        qtype = t.tensor_type
        try:
            data = torch.from_numpy(np.array(t.data))  # a copy: the file's mmap is closed after loading
        except (ValueError, OSError) as e:
            raise GGUFFileError(
                f"{str(p)!r}: tensor {t.name} cannot be read ({e}); the file is truncated or corrupt"
            ) from None
        if qtype in plain:
            if qtype == gguf.GGMLQuantizationType.BF16:
                data = data.view(torch.uint8).view(torch.bfloat16)
            state[name] = data.reshape(shape).to(dtype)
            continue
        if qtype not in SUPPORTED_GGUF_QUANT_TYPES:
            supported = ", ".join(sorted(getattr(q, "name", str(q)) for q in SUPPORTED_GGUF_QUANT_TYPES))
            raise GGUFFileError(
                f"{str(p)!r}: tensor {name} is quantized as {getattr(qtype, 'name', qtype)}, which cannot be "
                f"dequantized here (supported: F32, F16, BF16, {supported})"
            )
        param = GGUFParameter(data.view(torch.uint8), quant_type=qtype)
        reshaped = _orig_shape(reader, t.name) is not None
        if name in linear and not reshaped and tuple(param.quant_shape) == shape:
            state[name] = param
        else:  # not a Linear weight (or stored reshaped): dequantize once
            state[name] = dequantize_gguf_tensor(param).reshape(shape).to(dtype)
    del reader  # the tensors above are copies: the file's memory map can go
    with tempfile.TemporaryDirectory(prefix="firered-gguf-") as cfg_dir:
        (Path(cfg_dir) / "config.json").write_text(
            json.dumps({"_class_name": "QwenImageTransformer2DModel", **info.config})
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = QwenImageTransformer2DModel.from_single_file(
                    state,
                    config=cfg_dir,
                    quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
                    torch_dtype=dtype,
                    local_files_only=True,
                )
        except (ValueError, RuntimeError, KeyError, OSError) as e:
            raise GGUFFileError(f"could not build the MM-DiT from {str(p)!r}: {e}") from e
    model = model.to(device) if str(device) != "cpu" else model
    return model.eval().requires_grad_(False)


def quantized_linear_count(model) -> int:
    """How many Linear layers of ``model`` hold GGUF-quantized weights."""
    return sum(
        1
        for m in model.modules()
        if getattr(getattr(m, "weight", None), "quant_type", None) is not None and isinstance(m, torch.nn.Linear)
    )
