"""The user's own face-recognition model as a differentiable ``torch.nn.Module`` for the identity
measure (:func:`firered_core.editing.consistency.identity_consistency`, :class:`~firered_core.editing.consistency_guidance.IdentityTerm`).

The returned module always takes what the identity measure feeds it: aligned faces
``[F, 3, 112, 112]``, **RGB in [-1, 1]**, and answers embeddings ``[F, 512]``. Each file's own
input convention is handled inside :class:`FaceEmbedder`:

* insightface recognition models (ONNX: ``buffalo_l/w600k_r50.onnx``, antelopev2 ``glintr100.onnx``)
  are converted to torch with the ``onnx2torch`` package (``pip install onnx onnx2torch``; extra
  ``faces``), so gradients flow. insightface feeds them RGB (its ``swapRB``) scaled as
  ``(x - input_mean) / input_std`` on 0..255 pixels, with ``127.5 / 127.5`` (= [-1, 1]) unless the
  graph's first nodes subtract and multiply by themselves, in which case ``0 / 1`` (raw 0..255);
  the same rule is applied here.
* PyTorch checkpoints of the common iresnet ArcFace (``.pth``/``.pt`` state dicts with ``conv1.weight``,
  ``layer1.0.bn1.*``, ``fc.weight``, ``features.weight``): built with :func:`iresnet` (depth read
  from the keys); they take RGB in [-1, 1] as they are.

The parameters are frozen (``requires_grad=False``) and the module is in eval mode (the final
BatchNorm must use its running statistics); gradients flow to the input.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

#: aligned crop side and embedding width of ArcFace-class models
FACE_SIZE = 112
EMBEDDING_DIM = 512

#: file-name fragments of the non-recognition models insightface packs ship (detectors, landmarks,
#: attributes, swappers)
NON_RECOGNITION_NAMES = ("det_", "det.", "scrfd", "retinaface", "yolo", "2d106", "1k3d68", "landmark", "genderage", "inswapper", "swapper", "parsing")

# ---------------------------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------------------------


class FaceEmbedder(nn.Module):
    """``[F, 3, 112, 112]`` RGB in [-1, 1] -> ``[F, D]``, adapting to the inner model's convention:
    channels swapped to BGR when ``bgr``, then ``((x + 1) * 127.5 - input_mean) / input_std``."""

    def __init__(self, net: nn.Module, *, input_mean: float = 127.5, input_std: float = 127.5, bgr: bool = False, size: int = FACE_SIZE, source: str = ""):
        super().__init__()
        self.net = net
        self.input_mean, self.input_std, self.bgr, self.size, self.source = float(input_mean), float(input_std), bool(bgr), int(size), source
        self.eval()

    def train(self, mode: bool = True):
        """The inner model stays in eval mode (its BatchNorms use their running statistics)."""
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"face embedder {self.source or ''} takes aligned faces [F, 3, {self.size}, {self.size}], got {tuple(x.shape)}")
        if self.bgr:
            x = x.flip(1)
        if (self.input_mean, self.input_std) != (127.5, 127.5):
            x = ((x + 1.0) * 127.5 - self.input_mean) / self.input_std
        return self.net(x)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, input_mean={self.input_mean}, input_std={self.input_std}, bgr={self.bgr}, size={self.size}"


def _frozen(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval()


# ---------------------------------------------------------------------------------------------
# iresnet (the PyTorch ArcFace of insightface's arcface_torch): our own definition
# ---------------------------------------------------------------------------------------------

IRESNET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6)}


class _IRBlock(nn.Module):
    """Pre-activation residual block: BN, 3x3 conv, BN, PReLU, 3x3 conv (stride), BN; + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """ArcFace iresnet: stem, four stages of stride 2 (64..512 channels), BN, flatten, fc, BN1d.
    Parameter names match insightface's ``arcface_torch`` checkpoints."""

    def __init__(self, layers=(3, 4, 14, 3), *, widths=(64, 128, 256, 512), dim: int = EMBEDDING_DIM, size: int = FACE_SIZE):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        cin = widths[0]
        for i, (n, w) in enumerate(zip(layers, widths)):
            setattr(self, f"layer{i + 1}", nn.Sequential(*[_IRBlock(cin if j == 0 else w, w, 2 if j == 0 else 1) for j in range(n)]))
            cin = w
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(0.0)
        side = size // 16
        self.fc = nn.Linear(cin * side * side, dim)
        self.features = nn.BatchNorm1d(dim, eps=1e-5)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def iresnet(depth: int = 50, **kw) -> IResNet:
    """An untrained iresnet of ``depth`` in 18, 34, 50, 100, 200."""
    if depth not in IRESNET_LAYERS:
        raise ValueError(f"iresnet depth must be one of {sorted(IRESNET_LAYERS)}, got {depth}")
    return IResNet(IRESNET_LAYERS[depth], **kw)


def _iresnet_from_state_dict(sd: dict, path: Path) -> IResNet:
    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items() if torch.is_tensor(v)}
    if "conv1.weight" not in sd or "fc.weight" not in sd or not any(k.startswith("layer1.") for k in sd):
        raise ValueError(f"{path}: not an iresnet ArcFace checkpoint (expected keys conv1.weight, layer1.*, fc.weight, features.*)")
    layers = tuple(1 + max((int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i}.")), default=-1) for i in range(1, 5))
    widths = tuple(int(sd[f"layer{i}.0.conv1.weight"].shape[0]) for i in range(1, 5))
    dim, flat = sd["fc.weight"].shape
    side = int(round((flat / widths[-1]) ** 0.5))
    net = IResNet(layers, widths=widths, dim=int(dim), size=side * 16)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path}: iresnet checkpoint does not match (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return net


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------


def _import_onnx():
    try:
        import onnx
        import onnx2torch
    except ImportError as e:
        raise ImportError(
            f"loading an ONNX face-recognition model needs the packages 'onnx' and 'onnx2torch' ({e}); "
            "install them with `pip install onnx onnx2torch` (or the pack's `faces` extra)"
        ) from e
    return onnx, onnx2torch


def _dims(value_info) -> list:
    """Static dims as ints, symbolic or unknown ones as None."""
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def onnx_signature(model) -> tuple[list[tuple[str, list]], list[tuple[str, list]]]:
    """``(inputs, outputs)`` of an ONNX graph as ``(name, dims)``, initialisers left out of the inputs."""
    inits = {i.name for i in model.graph.initializer}
    ins = [(v.name, _dims(v)) for v in model.graph.input if v.name not in inits]
    outs = [(v.name, _dims(v)) for v in model.graph.output]
    return ins, outs


def _check_recognition_signature(ins, outs, path: Path, dim: int | None) -> None:
    if len(ins) != 1:
        raise ValueError(f"{path}: has {len(ins)} inputs {[n for n, _ in ins]}; a face-recognition model has one (faces [N, 3, 112, 112]) — is it a face swapper?")
    if len(outs) != 1:
        raise ValueError(f"{path}: has {len(outs)} outputs; a face-recognition model has one ([N, {dim or 'D'}]) — is it a face detector (det_10g, scrfd)?")
    idims, odims = ins[0][1], outs[0][1]
    if len(idims) != 4 or idims[1] not in (None, 3):
        raise ValueError(f"{path}: input {ins[0][0]} is {idims}, expected faces [N, 3, 112, 112]")
    if any(s is not None and s != FACE_SIZE for s in idims[2:]):
        raise ValueError(f"{path}: takes {idims[2]}x{idims[3]} inputs; the identity measure aligns faces to {FACE_SIZE}x{FACE_SIZE} (ArcFace)")
    if len(odims) not in (0, 2) or (len(odims) == 2 and dim is not None and odims[1] not in (None, dim)):
        raise ValueError(f"{path}: its output {outs[0][0]} is {odims}, not an embedding [N, {dim}] — is it a detector or landmark model, not a recognition model?")


def _insightface_normalisation(model) -> tuple[float, float]:
    """insightface's rule: when the graph's first 8 nodes include a subtraction and a multiplication
    the model normalises by itself and takes 0..255 (mean 0, std 1); otherwise 127.5 / 127.5."""
    head = list(model.graph.node)[:8]
    has_sub = any(n.op_type == "Sub" or n.name.startswith(("Sub", "_minus")) for n in head)
    has_mul = any(n.op_type == "Mul" or n.name.startswith(("Mul", "_mul")) for n in head)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


def _inline_initializer_aliases(model) -> None:
    """Replace ``Identity`` nodes that only rename an initialiser (the torch exporter writes them for
    weights it deduplicates) with a copy of the initialiser under the new name: onnx2torch reads
    conv and norm weights from initialisers only."""
    inits = {i.name: i for i in model.graph.initializer}
    keep = []
    for n in model.graph.node:
        if n.op_type == "Identity" and len(n.input) == 1 and n.input[0] in inits and n.output[0] not in inits:
            t = model.graph.initializer.add()
            t.CopyFrom(inits[n.input[0]])
            t.name = n.output[0]
            inits[t.name] = t
        else:
            keep.append(n)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def _load_onnx(path: Path, dim: int | None, input_mean, input_std, bgr: bool) -> FaceEmbedder:
    onnx, onnx2torch = _import_onnx()
    model = onnx.load(str(path))
    _check_recognition_signature(*onnx_signature(model), path, dim)
    mean, std = _insightface_normalisation(model)
    _inline_initializer_aliases(model)
    try:
        net = onnx2torch.convert(model)
    except Exception as e:  # noqa: BLE001 - an unsupported operator or opset, reported with the file
        raise ValueError(f"{path}: onnx2torch could not convert this model to torch ({type(e).__name__}: {e})") from e
    return FaceEmbedder(_frozen(net), input_mean=mean if input_mean is None else input_mean, input_std=std if input_std is None else input_std, bgr=bgr, source=str(path))


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def load_face_embedder(path, *, dim: int | None = EMBEDDING_DIM, input_mean: float | None = None, input_std: float | None = None, bgr: bool = False) -> FaceEmbedder:
    """A face-recognition model file -> a frozen, differentiable ``nn.Module`` mapping aligned faces
    ``[F, 3, 112, 112]`` RGB in [-1, 1] (what :func:`~firered_core.editing.consistency.identity_consistency`
    feeds it) to embeddings ``[F, dim]`` (float32, CPU; move it with ``.to()``).

    path: an insightface recognition ``.onnx`` (needs ``onnx`` + ``onnx2torch``) or an iresnet
        ArcFace ``.pth``/``.pt``/``.bin`` state dict.
    dim: the embedding width to insist on (512 for ArcFace); None accepts any ``[F, D]``.
    input_mean, input_std: override the detected pixel normalisation (on 0..255 RGB).
    bgr: the model wants BGR channels (insightface's own models take RGB).
    Raises FileNotFoundError for a missing file, ValueError for a file that is not a recognition
    model (a detector, a landmark model, a swapper, another input size).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"face-recognition model not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        emb = _load_onnx(path, dim, input_mean, input_std, bgr)
    elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
        net = _iresnet_from_state_dict(obj, path)
        emb = FaceEmbedder(_frozen(net), input_mean=127.5 if input_mean is None else input_mean, input_std=127.5 if input_std is None else input_std, bgr=bgr, source=str(path))
    else:
        raise ValueError(f"{path}: unsupported face-model format {suffix!r}; expected .onnx (insightface) or .pth (iresnet ArcFace)")
    # one trial face: catches models whose shapes the file does not declare
    try:
        with torch.no_grad():
            out = emb(torch.zeros(2, 3, FACE_SIZE, FACE_SIZE))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: does not run on aligned faces [2, 3, {FACE_SIZE}, {FACE_SIZE}] ({type(e).__name__}: {e})") from e
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[0] != 2 or (dim is not None and out.shape[1] != dim):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"{path}: answers {shape} for 2 faces, not embeddings [2, {dim or 'D'}] — not a face-recognition model")
    return emb


def _looks_like_non_recognition(name: str) -> bool:
    n = name.lower()
    return any(k in n for k in NON_RECOGNITION_NAMES)


def find_insightface_models(models_dir, *, check_shapes: bool = True) -> list[Path]:
    """Recognition models under ``models_dir/insightface`` (or ``models_dir`` itself when it is the
    insightface folder), sorted: ``.onnx`` files and ``.pth``/``.pt`` checkpoints, detectors,
    landmark, attribute and swapper models skipped by name and (ONNX, when ``onnx`` is installed
    and ``check_shapes``) by their declared inputs and outputs."""
    root = Path(models_dir).expanduser()
    if (root / "insightface").is_dir():
        root = root / "insightface"
    if not root.is_dir():
        return []
    found = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in (".onnx", ".pth", ".pt") or _looks_like_non_recognition(p.name):
            continue
        if check_shapes and p.suffix.lower() == ".onnx":
            try:
                onnx, _ = _import_onnx()
                m = onnx.load(str(p), load_external_data=False)
                _check_recognition_signature(*onnx_signature(m), p, EMBEDDING_DIM)
            except ImportError:
                pass
            except Exception:  # noqa: BLE001 - unreadable or not a recognition model
                continue
        found.append(p)
    return found
