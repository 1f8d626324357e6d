"""The user's face-recognition model file -> a differentiable embedder for the identity measure.
Small random ArcFace-like nets built here, exported to ONNX in tmp_path (nothing is downloaded)."""

import warnings

import pytest
import torch
from torch import nn

from firered_core.editing import consistency as C
from firered_core.editing import face_models as FM
from firered_core.model import images
from tests.conftest import make_picture

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx2torch")


def arcface_like(seed=0, dim=512):
    """A small random ArcFace-shaped net: [N, 3, 112, 112] -> [N, dim] (conv/BN/PReLU stem, residual
    stage, flatten, fc, BatchNorm1d as in insightface's models)."""
    torch.manual_seed(seed)

    class Res(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.PReLU(c), nn.Conv2d(c, c, 3, 1, 1, bias=False))

        def forward(self, x):
            return x + self.body(x)

    net = nn.Sequential(
        nn.Conv2d(3, 8, 5, 4, 2, bias=False), nn.BatchNorm2d(8), nn.PReLU(8),  # 28
        Res(8),
        nn.Conv2d(8, 16, 3, 2, 1), nn.PReLU(16),  # 14
        nn.Conv2d(16, 16, 3, 2, 1),  # 7
        nn.BatchNorm2d(16), nn.Flatten(), nn.Linear(16 * 7 * 7, dim), nn.BatchNorm1d(dim),
    )
    with torch.no_grad():  # non-trivial running statistics: eval vs train mode would differ
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def export(net, path, shape=(1, 3, 112, 112), outputs=("embedding",)):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (torch.zeros(shape),), str(path), dynamo=False, opset_version=13,
            input_names=["input.1"], output_names=list(outputs),
            dynamic_axes={"input.1": {0: "N"}, **{o: {0: "N"} for o in outputs}},
        )
    return path


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    net = arcface_like(0)
    return net, export(net, tmp_path_factory.mktemp("insightface") / "w600k_tiny.onnx")


def test_onnx_embedder_matches_the_torch_original_and_passes_gradients(onnx_model):
    net, path = onnx_model
    emb = FM.load_face_embedder(path)
    # insightface convention: (pixel - 127.5) / 127.5 RGB into the model == what the measure passes
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        diff = (emb(x) - net(x)).abs().max().item()
    assert emb(x).shape == (3, 512) and diff < 1e-4, diff  # measured ~5e-7
    assert not emb.training and not any(p.requires_grad for p in emb.parameters())
    assert not emb.train().net.training  # stays in eval: BatchNorm on running statistics
    xi = x.clone().requires_grad_(True)
    emb(xi).pow(2).sum().backward()
    assert torch.isfinite(xi.grad).all() and xi.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\[F, 3, 112, 112\]"):
        emb(torch.zeros(1, 3, 128, 128))


def test_onnx_that_normalises_itself_gets_0_255_pixels(tmp_path):
    """insightface's rule: Sub and Mul among the first nodes -> the model takes raw 0..255."""
    inner = arcface_like(1)

    class SelfNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner((x - 127.5) * (1 / 127.5))

    path = export(SelfNorm().eval(), tmp_path / "selfnorm.onnx")
    emb = FM.load_face_embedder(path)
    assert (emb.input_mean, emb.input_std) == (0.0, 1.0)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert (emb(x) - inner(x)).abs().max() < 1e-4


def test_onnx_embedder_in_the_identity_measure(onnx_model):
    _, path = onnx_model
    emb = FM.load_face_embedder(path)
    a = images.pil_to_tensor(make_picture(128, 128, 1))
    b = images.pil_to_tensor(make_picture(128, 128, 7)).flip(-1)
    face = C.Face.from_box((20, 20, 108, 108))
    same = float(C.identity_consistency(a, a, [face], emb))
    other = float(C.identity_consistency(b, a, [face], emb))
    assert same < 1e-5 and other > 0.01 and other > 1000 * same, (same, other)
    x = b.clone().requires_grad_(True)
    C.identity_consistency(x, a, [face], emb).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_wrong_files_are_rejected_with_their_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        FM.load_face_embedder(tmp_path / "nope.onnx")

    class Detector(nn.Module):  # det_10g-like: several score/box maps, not [N, 512]
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, 2, 1)

        def forward(self, x):
            y = self.c(x)
            return y[:, :1].flatten(1), y[:, 1:].flatten(1)

    det = export(Detector().eval(), tmp_path / "det_10g.onnx", shape=(1, 3, 160, 160), outputs=("score_8", "bbox_8"))
    with pytest.raises(ValueError, match=r"det_10g\.onnx.*detector"):
        FM.load_face_embedder(det)
    one = export(nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.Flatten()).eval(), tmp_path / "heatmap.onnx")
    with pytest.raises(ValueError, match=r"heatmap\.onnx.*not an embedding"):
        FM.load_face_embedder(one)
    small = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.Flatten(), nn.Linear(4 * 32 * 32, 512)).eval()
    with pytest.raises(ValueError, match=r"small\.onnx.*64x64"):
        FM.load_face_embedder(export(small, tmp_path / "small.onnx", shape=(1, 3, 64, 64)))
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported"):
        FM.load_face_embedder(tmp_path / "x.safetensors")


def test_iresnet_checkpoint_loads(tmp_path):
    net = FM.iresnet(18, widths=(8, 8, 16, 16)).eval()  # the iresnet layout, narrow for speed
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_var.uniform_(0.5, 2.0)
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "backbone.pth")
    emb = FM.load_face_embedder(tmp_path / "backbone.pth")
    assert tuple(len(getattr(emb.net, f"layer{i}")) for i in range(1, 5)) == (2, 2, 2, 2)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert (emb(x) - net(x)).abs().max() < 1e-5
    # the same net through ONNX (the exporter's shared-weight Identity nodes are inlined for onnx2torch)
    via_onnx = FM.load_face_embedder(export(net, tmp_path / "r18.onnx"))
    with torch.no_grad():
        assert (via_onnx(x) - net(x)).abs().max() < 1e-4
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth.*iresnet"):
        FM.load_face_embedder(tmp_path / "other.pth")


def test_find_insightface_models(tmp_path, onnx_model):
    _, path = onnx_model
    d = tmp_path / "models" / "insightface" / "models" / "buffalo_l"
    d.mkdir(parents=True)
    (d / "w600k_r50.onnx").write_bytes(path.read_bytes())
    (d / "det_10g.onnx").write_bytes(path.read_bytes())  # skipped by name
    (d / "2d106det.onnx").write_bytes(b"")
    (d / "oddly_named.onnx").write_bytes(b"not onnx")  # unreadable: skipped
    two_out = export(nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.Flatten()).eval(), tmp_path / "a.onnx")
    (d / "mystery.onnx").write_bytes(two_out.read_bytes())  # not [N, 512]: skipped by shape
    assert FM.find_insightface_models(tmp_path / "models") == [d / "w600k_r50.onnx"]
    assert FM.find_insightface_models(tmp_path / "models" / "insightface") == [d / "w600k_r50.onnx"]
    assert FM.find_insightface_models(tmp_path / "none") == []
