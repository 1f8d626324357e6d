"""Instruction rewriting (recaption) and the VLM client under it: seeded local generation on the tiny
Qwen2.5-VL (its text is gibberish on random weights; what is checked is determinism, the seed's
effect and what reaches the model), the OpenAI-compatible path on a stub server, the errors
(no language head, unreachable server, unset key), the prompt file and the CLI flag."""

import fnmatch
from pathlib import Path

import pytest
import torch
from PIL import Image

from firered_core.agent import recaption as R
from firered_core.agent import vlm
from tests.conftest import json_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    return vlm.LocalVLM.load(tiny_model_dir)


@pytest.fixture(scope="module")
def headless_file(tiny_model_dir, tmp_path_factory):
    """The tiny text encoder as one file without ``lm_head`` (what ComfyUI's files hold), with its tokenizer."""
    from safetensors.torch import load_file, save_file

    (src,) = (tiny_model_dir / "text_encoder").glob("*.safetensors")
    state = load_file(src)
    assert "lm_head.weight" in state  # the release folder keeps the language head
    del state["lm_head.weight"]
    out = tmp_path_factory.mktemp("te") / "qwen_2.5_vl_tiny.safetensors"
    save_file(state, out)
    return out


PIC = Image.new("RGB", (96, 64), (200, 40, 30))


# ---------------------------------------------------------------------------------------------
# The prompt file
# ---------------------------------------------------------------------------------------------


def test_the_prompt_file_states_its_source_and_is_packaged():
    fields = R.prompt_file_fields()
    assert "FireRed-Image-Edit" in fields["source"] and "agent/recaption.py" in fields["source"]
    assert "own words" in fields["source"]
    text = R.system_prompt()
    assert "{target_words}" not in text and "about 512 words" in text and not text.startswith("---")
    assert "about 80 words" in R.system_prompt(target_words=80)
    # the wheel ships it: pyproject's package-data names it
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    rel = R.PROMPT_FILE.relative_to(ROOT / "firered_core").as_posix()
    assert any(fnmatch.fnmatch(rel, pat) for pat in data.get("firered_core", [])), data


def test_clean_reply():
    assert R.clean_reply("<think>the user wants blue</think>\nPaint the door blue.") == "Paint the door blue."
    assert R.clean_reply('Rewritten instruction: "Paint the door blue."') == "Paint the door blue."
    assert R.clean_reply("```\nPaint it.\n```") == "Paint it."
    # quotes inside the instruction stay
    assert R.clean_reply('Replace "OPEN" with "CLOSED" on the sign.') == 'Replace "OPEN" with "CLOSED" on the sign.'
    assert R.clean_reply("<think>never ends") == ""


# ---------------------------------------------------------------------------------------------
# Local backend
# ---------------------------------------------------------------------------------------------


def test_local_recaption_is_seeded_and_the_system_prompt_reaches_the_model(local, monkeypatch, tmp_path):
    seen = []
    generate = local.model.generate

    def spy(**kw):
        seen.append(kw["input_ids"][0].tolist())
        return generate(**kw)

    monkeypatch.setattr(local.model, "generate", spy)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    kw = dict(backend="local", model=local, max_new_tokens=12)
    a = R.recaption("make the door blue", [PIC], seed=0, **kw)
    b = R.recaption("make the door blue", [PIC], seed=0, **kw)
    c = R.recaption("make the door blue", [PIC], seed=1, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is left as it was
    assert a == b and a != c and a.strip()
    text = local.tokenizer.decode(seen[0])
    assert R.system_prompt() in text  # the whole prompt file's body, as the system turn
    assert "make the door blue" in text and "One input picture" in text
    assert text.count("<|vision_start|>") == 1
    # a tensor picture (ComfyUI IMAGE) gives what the PIL picture gives
    t = torch.from_numpy(__import__("numpy").asarray(PIC, dtype="float32") / 255)[None]
    assert R.recaption("make the door blue", [t], seed=0, **kw) == a
    # a picture file, too
    PIC.save(tmp_path / "pic.png")
    assert R.recaption("make the door blue", [str(tmp_path / "pic.png")], seed=0, **kw) == a
    # another system prompt reaches the model instead
    R.recaption("make the door blue", None, seed=0, system="Answer in one word.", **kw)
    assert "Answer in one word." in local.tokenizer.decode(seen[-1]) and R.system_prompt() not in local.tokenizer.decode(seen[-1])


def test_greedy_ignores_the_seed(local):
    kw = dict(backend="local", model=local, max_new_tokens=8, temperature=0.0)
    assert R.recaption("make it red", seed=0, **kw) == R.recaption("make it red", seed=5, **kw)


def test_no_language_head_is_refused_and_says_what_to_load(tiny_model_dir, headless_file):
    from transformers import Qwen2_5_VLModel

    from firered_core.formats.text_encoder_files import load_text_encoder

    tok = tiny_model_dir / "tokenizer"
    with pytest.raises(vlm.NoLanguageHeadError, match=r"has no language head \(lm_head\)") as e:
        vlm.LocalVLM.load(headless_file, processor=tok)
    msg = str(e.value)
    assert headless_file.name in msg and "text_encoder/" in msg and "http backend" in msg
    # the same file loaded by the pack's loader (which ties the input embedding in its place)
    te = load_text_encoder(headless_file, dtype=torch.float32, processor=vlm.LocalVLM.load(tiny_model_dir).processor)
    assert not vlm.has_language_head(te)
    with pytest.raises(vlm.NoLanguageHeadError, match="rewriting the instruction"):
        R.recaption("make it red", model=te, processor=object())
    # a model built without a head at all
    bare = Qwen2_5_VLModel(te.config)
    assert not vlm.has_language_head(bare)
    # the release folder's file keeps its head
    (full,) = (tiny_model_dir / "text_encoder").glob("*.safetensors")
    assert vlm.has_language_head(load_text_encoder(full, dtype=torch.float32, processor=vlm.LocalVLM.load(tiny_model_dir).processor))


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible backend
# ---------------------------------------------------------------------------------------------


def test_http_recaption_sends_the_system_prompt_seed_and_key(monkeypatch):
    seen = []

    def answer(path, headers, body):
        seen.append((path, headers.get("Authorization"), body))
        return {"choices": [{"message": {"content": "<think>blue door</think>\nRewritten instruction: \"Paint the front door a deep blue.\""}}]}

    monkeypatch.setenv("FIRERED_TEST_RECAPTION_KEY", "s3cret")
    with json_server(answer) as url:
        out = R.recaption("door blue", [PIC], backend="http", url=f"{url}/v1", server_model="qwen2.5-vl-7b",
                          api_key_env="FIRERED_TEST_RECAPTION_KEY", seed=7, max_new_tokens=300)  # fmt: skip
    assert out == "Paint the front door a deep blue."
    path, auth, body = seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer s3cret"
    assert body["model"] == "qwen2.5-vl-7b" and body["seed"] == 7 and body["max_tokens"] == 300
    assert body["temperature"] == pytest.approx(R.TEMPERATURE)
    assert body["messages"][0] == {"role": "system", "content": R.system_prompt()}
    user = body["messages"][1]["content"]
    assert user[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert user[-1]["type"] == "text" and user[-1]["text"].endswith("door blue")


def test_http_errors_name_the_server_and_the_key():
    with pytest.raises(vlm.VLMServerError, match=r"recaption server at http://127\.0\.0\.1:9/v1 could not be reached"):
        R.recaption("door blue", backend="http", url="http://127.0.0.1:9/v1", timeout=5)
    with pytest.raises(vlm.MissingKeyError, match=r"\$FIRERED_TEST_UNSET_KEY, which is not set"):
        R.recaption("door blue", backend="http", url="http://127.0.0.1:9/v1", api_key_env="FIRERED_TEST_UNSET_KEY")
    with json_server(lambda *a: {"error": "model not loaded"}) as url:
        with pytest.raises(vlm.VLMServerError, match="answered without choices.*model not loaded"):
            R.recaption("door blue", backend="http", url=url)
    with pytest.raises(ValueError, match="http"):
        vlm.ChatServer("127.0.0.1:8000/v1")


def test_an_empty_answer_keeps_the_instruction():
    with json_server(lambda *a: {"choices": [{"message": {"content": "<think>hmm"}}]}) as url:
        assert R.recaption("  door blue ", backend="http", url=url) == "door blue"


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="non-empty string"):
        R.recaption("   ", backend="http", url="http://127.0.0.1:9")
    with pytest.raises(ValueError, match="backend must be one of"):
        R.recaption("door", backend="gemini")
    with pytest.raises(ValueError, match="needs url="):
        R.recaption("door", backend="http")
    with pytest.raises(ValueError, match="needs model="):
        R.recaption("door", backend="local")
    with pytest.raises(ValueError, match="picture 1 must be"):
        R.recaption("door", [torch.rand(3, 8, 8)], backend="http", url="http://127.0.0.1:9")
    with pytest.raises(FileNotFoundError, match="picture 1 'nowhere.png' could not be read"):
        R.recaption("door", ["nowhere.png"], backend="http", url="http://127.0.0.1:9")


# ---------------------------------------------------------------------------------------------
# The CLI flag
# ---------------------------------------------------------------------------------------------


def _edit_args(tmp_path, *extra):
    pic = tmp_path / "in.png"
    PIC.save(pic)
    return ["edit", "--image", str(pic), "--prompt", "door blue", "--out", str(tmp_path / "out.png"),
            "--steps", "1", "--cfg", "1", "--width", "64", "--height", "64", *extra]  # fmt: skip


def test_cli_recaption_through_a_server(tmp_path, tiny_model_dir, capsys):
    from firered_core import cli

    seen = []

    def answer(path, headers, body):
        seen.append(body)
        return {"choices": [{"message": {"content": "Paint the front door a deep blue."}}]}

    with json_server(answer) as url:
        rc = cli.main(_edit_args(tmp_path, "--model", str(tiny_model_dir), "--recaption", "--recaption-url", url,
                                 "--recaption-model", "served-name", "--seed", "5"))  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "Paint the front door a deep blue." in err  # the rewritten instruction is shown
    assert seen[0]["seed"] == 5 and seen[0]["model"] == "served-name"
    assert (tmp_path / "out.png").is_file()


def test_cli_recaption_errors(tmp_path, tiny_model_dir, headless_file, capsys):
    from firered_core import cli

    rc = cli.main(_edit_args(tmp_path, "--model", str(tiny_model_dir), "--recaption", "--recaption-url", "http://127.0.0.1:9/v1"))
    assert rc == 2 and "could not be reached" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()
    rc = cli.main(_edit_args(tmp_path, "--model", str(tiny_model_dir), "--text-encoder", str(headless_file),
                             "--tokenizer", str(tiny_model_dir / "tokenizer"), "--recaption"))  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "no language head" in err and "--recaption-url" in err
    rc = cli.main(_edit_args(tmp_path, "--recaption-url", "http://127.0.0.1:9/v1"))
    assert rc == 2 and "--recaption-url needs --recaption" in capsys.readouterr().err


def test_cli_recaption_local_on_the_tiny_model(tmp_path, tiny_model_dir, capsys):
    from firered_core import cli

    rc = cli.main(_edit_args(tmp_path, "--model", str(tiny_model_dir), "--recaption", "--recaption-tokens", "6"))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "rewritten instruction:" in err
    assert (tmp_path / "out.png").stat().st_size > 0
