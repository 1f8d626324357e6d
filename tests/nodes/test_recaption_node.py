"""FireRed Recaption: the node on the text encoder the loader node gives (the tiny ComfyUI file keeps
its lm_head), seeded; on a stub OpenAI-compatible server; its errors name the input to fix."""

import dataclasses

import pytest
import torch

from tests.conftest import json_server


@pytest.fixture(scope="module")
def node(pack):
    return pack.NODE_CLASS_MAPPINGS["FireRedRecaption"]()


@pytest.fixture(scope="module")
def te(pack, models_env):
    _, files = models_env
    return pack.NODE_CLASS_MAPPINGS["FireRedTextEncoderLoader"]().load(files["text_encoder"].name, "fp32", False)[0]


def _args(**kw):
    base = dict(instruction="make the door blue", backend="local", url="http://127.0.0.1:8000/v1", model="default",
                api_key_env="", seed=0, max_new_tokens=16, target_words=60)  # fmt: skip
    base.update(kw)
    return base


def test_the_node_is_registered_with_tooltips(pack):
    cls = pack.NODE_CLASS_MAPPINGS["FireRedRecaption"]
    assert cls.RETURN_TYPES == ("STRING",) and pack.NODE_DISPLAY_NAME_MAPPINGS["FireRedRecaption"]
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, s in spec[section].items():
            assert s[1].get("tooltip"), f"{name} has no tooltip"
    assert list(spec["required"])[:2] == ["instruction", "backend"] and spec["required"]["backend"][0] == ["local", "http"]


def test_local_on_the_loaded_text_encoder_is_seeded(node, te, monkeypatch):
    seen = []
    generate = te.model.generate
    monkeypatch.setattr(te.model, "generate", lambda **kw: seen.append(kw) or generate(**kw))
    pic = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(0))
    a = node.rewrite(**_args(text_encoder=te, image1=pic))
    b = node.rewrite(**_args(text_encoder=te, image1=pic))
    c = node.rewrite(**_args(text_encoder=te, image1=pic, seed=1))
    assert a["result"] == b["result"] and a["result"] != c["result"]
    assert isinstance(a["result"][0], str) and a["ui"]["text"] == [a["result"][0]]
    assert "pixel_values" in seen[0]  # the picture went in with the instruction
    text = te.processor.tokenizer.decode(seen[0]["input_ids"][0])
    assert "make the door blue" in text and "about 60 words" in text


def test_local_errors_name_what_to_connect(node, te):
    with pytest.raises(ValueError, match="needs the text_encoder input.*FireRed Diffusers Loader"):
        node.rewrite(**_args())
    headless = dataclasses.replace(te, model=te.model.model)  # the bare Qwen2.5-VL: no lm_head
    with pytest.raises(ValueError, match=r"no language head \(lm_head\).*FireRed Diffusers Loader"):
        node.rewrite(**_args(text_encoder=headless))


def test_http_backend(node, monkeypatch):
    seen = []

    def answer(path, headers, body):
        seen.append((headers.get("Authorization"), body))
        return {"choices": [{"message": {"content": "Paint the front door deep blue; keep the rest."}}]}

    monkeypatch.setenv("FIRERED_TEST_NODE_KEY", "k")
    with json_server(answer) as url:
        out = node.rewrite(**_args(backend="http", url=url + "/v1", model="served", api_key_env="FIRERED_TEST_NODE_KEY", seed=3))
    assert out["result"] == ("Paint the front door deep blue; keep the rest.",)
    auth, body = seen[0]
    assert auth == "Bearer k" and body["seed"] == 3 and body["model"] == "served"
    assert "about 60 words" in body["messages"][0]["content"]
    with pytest.raises(RuntimeError, match="could not be reached"):
        node.rewrite(**_args(backend="http", url="http://127.0.0.1:9/v1"))
