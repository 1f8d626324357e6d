"""Instruction rewriting ("recaption"): a terse edit instruction expanded into a precise one by a
vision-language model, as FireRed's agent does, on a local Qwen2.5-VL or an OpenAI-compatible server.

Upstream's agent sends the instruction to Gemini / an OpenAI-compatible API with an "Edit Instruction
Rewriter" system prompt (see the source stated in ``prompts/recaption.md``, the one file holding the
system prompt). Here the same job runs on:

* ``backend="local"``: a :class:`~.vlm.LocalVLM` -- the Qwen2.5-VL-7B the pack already holds as the
  text encoder, when it has its language head (the diffusers release's ``text_encoder/`` folder; a
  ComfyUI single text-encoder file has none and gets :class:`~.vlm.NoLanguageHeadError` saying what
  to load instead), or any Qwen2.5-VL folder;
* ``backend="http"``: a :class:`~.vlm.ChatServer` (vLLM, SGLang, llama.cpp, a hosted API; the key
  from the environment variable named by ``api_key_env``).

Sampling is seeded: the same seed, settings and model give the same text (locally; a server gets
``seed`` in the request, which vLLM and OpenAI honour). :func:`recaption` returns the text; the node
shows it as a ``STRING`` users can read and edit.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from . import vlm

log = logging.getLogger("FireRed")

PROMPT_FILE = Path(__file__).resolve().parent / "prompts" / "recaption.md"
BACKENDS = ("local", "http")
#: upstream agent's target length (RECAPTION_TARGET_LENGTH): words, or characters for CJK text
TARGET_WORDS = 512
#: upstream agent's sampling temperature
TEMPERATURE = 0.4
#: the longer side of each picture the model sees (Qwen2.5-VL reads any size; this bounds the cost)
IMAGE_SIZE = 448

__all__ = [
    "BACKENDS",
    "PROMPT_FILE",
    "Recaptioner",
    "clean_reply",
    "prompt_file_fields",
    "recaption",
    "system_prompt",
    "user_text",
]


def _split_front_matter(text: str) -> tuple[str, str]:
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end >= 0:
            return text[4:end], text[end + 5 :]
    return "", text


def prompt_file_fields(path=PROMPT_FILE) -> dict[str, str]:
    """The ``key: value`` fields of the prompt file's front matter (``source``, ``job`` ...); folded
    (``>-``) values are joined into one line."""
    head, _ = _split_front_matter(Path(path).read_text(encoding="utf-8"))
    fields: dict[str, str] = {}
    key = None
    for line in head.splitlines():
        m = re.match(r"^([A-Za-z_]+):\s*(.*)$", line)
        if m:
            key, value = m.group(1), m.group(2).strip()
            fields[key] = "" if value in (">-", ">", "|") else value.strip('"')
        elif key is not None and line.startswith(" "):
            fields[key] = (fields[key] + " " + line.strip()).strip()
    return fields


def system_prompt(path=PROMPT_FILE, *, target_words: int = TARGET_WORDS) -> str:
    """The system prompt: the body of ``path`` (after its front matter), ``{target_words}`` filled in."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"the recaption system prompt file {str(p)!r} could not be read: {e}") from e
    body = _split_front_matter(text)[1].strip()
    if not body:
        raise ValueError(f"the recaption system prompt file {str(p)!r} is empty after its front matter")
    if target_words < 1:
        raise ValueError(f"target_words must be at least 1, got {target_words}")
    return body.replace("{target_words}", str(int(target_words)))


def user_text(instruction: str, n_pictures: int) -> str:
    """The user turn: how many pictures come with it, then the instruction to rewrite."""
    if n_pictures == 0:
        lead = "No input picture: the instruction describes a new picture."
    elif n_pictures == 1:
        lead = "One input picture (Picture 1) is given above."
    else:
        lead = f"{n_pictures} input pictures are given above, in order: Picture 1 to Picture {n_pictures}."
    return f"{lead}\nRewrite this edit instruction:\n{instruction.strip()}"


_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_LABEL = re.compile(r"^\s*(?:\*\*)?(?:rewritten|revised|expanded|new)?\s*(?:edit\s+)?instruction(?:\*\*)?\s*[:：]\s*", re.I)
_QUOTED = re.compile(r'^\s*(["\u201c])(.*)(["\u201d])\s*$', re.S)


def clean_reply(text: str) -> str:
    """The instruction out of a model's answer: reasoning (``<think>...</think>``, or an unclosed
    ``<think>`` cut off), code fences, a leading "Rewritten instruction:" label and quotes around the
    whole answer removed; whitespace trimmed."""
    text = _THINK.sub("", text)
    if "<think>" in text.lower():  # reasoning that never ended: nothing usable after it
        text = text[: text.lower().index("<think>")]
    text = text.strip()
    if text.startswith("```"):
        text = text.strip("`").strip()
        text = re.sub(r"^(?:text|markdown)\n", "", text)
    text = _LABEL.sub("", text, count=1)
    m = _QUOTED.match(text)
    if m and '"' not in m.group(2) and "\u201c" not in m.group(2):  # quotes round the whole answer only
        text = m.group(2)
    return text.strip()


def _check_instruction(instruction) -> str:
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"the instruction to rewrite must be a non-empty string, got {instruction!r}")
    return instruction


@dataclass
class Recaptioner:
    """A recaption backend with its settings; call it like :func:`recaption`.

    backend: "local" (``local``: a :class:`~.vlm.LocalVLM`) or "http" (``server``: a
    :class:`~.vlm.ChatServer`). temperature: sampling temperature (0: greedy); max_new_tokens: the
    answer's length limit; target_words: the length the prompt asks for; image_size: the longer side
    of each picture the model sees; system: the system prompt (default: :func:`system_prompt`).
    """

    backend: str = "local"
    local: vlm.LocalVLM | None = None
    server: vlm.ChatServer | None = None
    temperature: float = TEMPERATURE
    max_new_tokens: int = 1024
    target_words: int = TARGET_WORDS
    image_size: int = IMAGE_SIZE
    system: str | None = None

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"recaption backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "local" and self.local is None:
            raise ValueError(
                "the local recaption backend needs a Qwen2.5-VL with its language head (a LocalVLM: the release's "
                "text_encoder/ folder, or the text encoder the pack loaded from it); or use backend='http' with a url"
            )
        if self.backend == "http" and self.server is None:
            raise ValueError("the http recaption backend needs a server (an OpenAI-compatible url, e.g. http://127.0.0.1:8000/v1)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.image_size < 28:
            raise ValueError(f"image_size must be at least 28 pixels, got {self.image_size}")

    def messages(self, instruction: str, pictures: Sequence = (), *, urls: bool = False) -> list[dict]:
        system = self.system if self.system is not None else system_prompt(target_words=self.target_words)
        return vlm.chat_messages(user_text(instruction, len(pictures)), pictures, system, urls=urls)

    def __call__(self, instruction: str, pictures: Sequence | None = None, *, seed: int = 0,
                 on_token: Callable[[], None] | None = None) -> str:  # fmt: skip
        """The rewritten instruction. ``pictures``: PIL pictures or ``[H, W, 3]`` / ``[1, H, W, 3]``
        tensors in [0, 1]; ``seed``: the sampling seed. An empty answer falls back to the
        instruction as given (with a log line)."""
        _check_instruction(instruction)
        pics = [vlm.shrink(vlm.to_pil(p, f"picture {k + 1}"), self.image_size) for k, p in enumerate(pictures or [])]
        if self.backend == "local":
            text = self.local.chat_text(self.messages(instruction, pics))
            raw = self.local.generate(text, pics, seed=seed, max_new_tokens=self.max_new_tokens,
                                      temperature=self.temperature, top_p=1.0, top_k=0, on_token=on_token)  # fmt: skip
        else:
            reply = self.server.complete(
                self.messages(instruction, pics, urls=True),
                temperature=self.temperature,
                max_tokens=self.max_new_tokens,
                seed=int(seed) % 2**63,
            )
            raw = self.server.texts(reply)[0]
        out = clean_reply(raw)
        if not out:
            log.warning("FireRed recaption: the model answered nothing usable (%r); keeping the instruction as given", raw[:80])
            return instruction.strip()
        return out


def recaption(
    instruction: str,
    pictures: Sequence | None = None,
    *,
    backend: str = "local",
    model=None,
    processor=None,
    url: str | None = None,
    server_model: str = "default",
    api_key_env: str | None = None,
    seed: int = 0,
    max_new_tokens: int = 1024,
    temperature: float = TEMPERATURE,
    target_words: int = TARGET_WORDS,
    image_size: int = IMAGE_SIZE,
    timeout: float = 120.0,
    system: str | None = None,
) -> str:
    """Rewrite ``instruction`` (with its ``pictures``) into a precise, expanded edit instruction.

    ``backend="local"``: ``model`` is a :class:`~.vlm.LocalVLM`, a loaded Qwen2.5-VL (then pass its
    ``processor``) or a path (:meth:`~.vlm.LocalVLM.load`: a Qwen2.5-VL folder, a release folder, a
    single file that keeps its ``lm_head``). ``backend="http"``: ``url`` of an OpenAI-compatible
    server, ``server_model`` the model name it serves, ``api_key_env`` the environment variable
    holding its key. See :class:`Recaptioner` for the rest.

    Raises:
        NoLanguageHeadError: the local model has no ``lm_head`` (a ComfyUI single text-encoder file).
        VLMServerError: the server could not be reached or gave no answer.
        MissingKeyError: ``api_key_env`` names an unset variable.
        ValueError: an empty instruction, an unknown backend, a bad setting.
    """
    _check_instruction(instruction)
    if backend not in BACKENDS:
        raise ValueError(f"recaption backend must be one of {BACKENDS}, got {backend!r}")
    local = server = None
    if backend == "local":
        if model is None:
            raise ValueError("the local recaption backend needs model= (a Qwen2.5-VL with its language head, or its folder)")
        if isinstance(model, vlm.LocalVLM):
            local = model
        elif isinstance(model, (str, Path)):
            local = vlm.LocalVLM.load(model, processor=processor, job="rewriting the instruction")
        else:
            local = vlm.LocalVLM.from_model(model, processor, job="rewriting the instruction")
    else:
        if not url:
            raise ValueError("the http recaption backend needs url= (an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1)")
        server = vlm.ChatServer(url, model=server_model or "default", api_key_env=api_key_env, timeout=timeout, job="recaption")
    r = Recaptioner(backend, local, server, temperature=temperature, max_new_tokens=max_new_tokens,
                    target_words=target_words, image_size=image_size, system=system)  # fmt: skip
    return r(instruction, pictures, seed=seed)
