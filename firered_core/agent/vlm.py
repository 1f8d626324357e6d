"""The vision-language model client of the agent jobs and the VLM judge: a local Qwen2.5-VL with its
language head, or an OpenAI-compatible chat server.

Two backends, one job each:

* :class:`LocalVLM` -- a transformers Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``, or any
  image-text-to-text model for a judge) with its processor. It writes text (:meth:`LocalVLM.generate`,
  seeded: the same seed gives the same text, and the caller's random state is left as it was) and
  reads next-token logits (:meth:`LocalVLM.next_token_logits`). Writing text needs the language head
  (``lm_head``): the diffusers release's ``text_encoder/`` folder has it; ComfyUI's single
  text-encoder files (``qwen_2.5_vl_7b*.safetensors``) and Qwen2.5-VL GGUFs load without it (image
  editing only reads hidden states; the loader ties the input embedding in its place), and
  :func:`check_language_head` says so and what to load instead.
* :class:`ChatServer` -- an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, SGLang, llama.cpp's
  server, a hosted API). The key is read from the environment variable the user names
  (``api_key_env``), never from a file or an argument; an unreachable server, an HTTP error and a
  reply without choices fail with a message naming the server.

torch is imported at module level; transformers and PIL inside the functions that use them.
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "ChatServer",
    "LocalVLM",
    "MissingKeyError",
    "NoLanguageHeadError",
    "VLMServerError",
    "chat_messages",
    "check_language_head",
    "data_url",
    "has_language_head",
    "shrink",
    "to_pil",
]


class NoLanguageHeadError(ValueError):
    """The model cannot write text: it has no language head (``lm_head``)."""


class VLMServerError(RuntimeError):
    """The chat server could not be reached, refused the request or answered without text."""


class MissingKeyError(ValueError):
    """``api_key_env`` names an environment variable that is not set."""


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def to_pil(img, what: str = "picture"):
    """A PIL picture, a picture file, or a ``[H, W, 3]`` / ``[1, H, W, 3]`` float tensor in [0, 1]
    (ComfyUI's IMAGE layout) -> RGB PIL."""
    from PIL import Image

    if isinstance(img, Image.Image):
        return img.convert("RGB")
    if isinstance(img, (str, os.PathLike)):
        try:
            with Image.open(img) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{what} {str(img)!r} could not be read as a picture: {e}") from e
    if isinstance(img, torch.Tensor):
        t = img.detach().float().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[-1] != 3:
            raise ValueError(f"{what} must be [H, W, 3] or [1, H, W, 3] in [0, 1], got shape {tuple(img.shape)}")
        return Image.fromarray((t.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    raise TypeError(f"{what} is a {type(img).__name__}; expected a PIL picture, a picture file or an image tensor")


def shrink(picture, max_side: int):
    """``picture`` scaled down (never up) so its longer side is at most ``max_side`` (each side >= 28,
    Qwen2.5-VL's smallest patch grid)."""
    s = max_side / max(picture.size)
    if s >= 1:
        return picture
    return picture.resize((max(28, round(picture.width * s)), max(28, round(picture.height * s))))


def data_url(picture) -> str:
    """A PNG ``data:`` URL of a PIL picture, as the OpenAI chat format takes pictures."""
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_messages(user_text: str, pictures: Sequence = (), system: str | None = None, *, urls: bool = False) -> list[dict]:
    """One chat turn: an optional system message, then a user message holding the pictures (in
    order) and ``user_text``. ``urls``: pictures as OpenAI ``image_url`` parts (PNG data URLs), else
    as transformers' ``{"type": "image"}`` placeholders (the pictures go to the processor)."""
    if urls:
        content = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in pictures]
    else:
        content = [{"type": "image"} for _ in pictures]
    content.append({"type": "text", "text": user_text})
    msgs = [{"role": "system", "content": system}] if system is not None else []
    msgs.append({"role": "user", "content": content})
    return msgs


# ---------------------------------------------------------------------------------------------
# The language head
# ---------------------------------------------------------------------------------------------


def _ties_embeddings(model) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return False
    text_cfg = getattr(cfg, "text_config", None)
    return bool(getattr(cfg, "tie_word_embeddings", False) or getattr(text_cfg, "tie_word_embeddings", False))


def has_language_head(model) -> bool:
    """Whether ``model`` can write text: it has an ``lm_head`` of its own. A model built without one
    (``Qwen2_5_VLModel``) has none; one whose ``lm_head`` is the input embedding although its config
    does not tie them (what the single-file loaders do for a file without ``lm_head``) has none either."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if weight is None or weight.is_meta:
        return False
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    emb_w = getattr(emb, "weight", None)
    if emb_w is not None and (emb_w is weight or (emb_w.data_ptr() == weight.data_ptr() and emb_w.shape == weight.shape)):
        return _ties_embeddings(model)
    return True


def check_language_head(model, source: str = "", job: str = "writing text") -> None:
    """Raise :class:`NoLanguageHeadError` when ``model`` has no language head, naming ``source`` (the
    file it came from), the job that needs it and what to load instead."""
    if has_language_head(model):
        return
    name = f" {source!r}" if source else ""
    raise NoLanguageHeadError(
        f"the Qwen2.5-VL text encoder{name} has no language head (lm_head), which {job} needs: ComfyUI's "
        "single text-encoder files (qwen_2.5_vl_7b.safetensors, qwen_2.5_vl_7b_fp8_scaled.safetensors) and "
        "Qwen2.5-VL GGUFs leave it out, since image editing only reads the hidden states. Load the diffusers "
        "release's text_encoder/ folder instead (FireRed-Image-Edit-1.1/text_encoder, which has it: the "
        "FireRed Diffusers Loader node, or --model FOLDER on the command line), or a Qwen2.5-VL-7B-Instruct "
        "folder, or use the http backend (an OpenAI-compatible server)."
    )


# ---------------------------------------------------------------------------------------------
# Local backend
# ---------------------------------------------------------------------------------------------


def _dtype(dtype, device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)} or 'auto', got {dtype!r}")
    return names[dtype]


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()


def _fallback_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Qwen's ChatML with vision placeholders, for processors that carry no chat template (the
    tokenizer folder of a ComfyUI install)."""
    out = []
    if not messages or messages[0]["role"] != "system":
        out.append("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    for m in messages:
        c = m["content"]
        if not isinstance(c, str):
            c = "".join(
                "<|vision_start|><|image_pad|><|vision_end|>" if part.get("type") == "image" else part.get("text", "")
                for part in c
            )
        out.append(f"<|im_start|>{m['role']}\n{c}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


@dataclass
class LocalVLM:
    """A transformers vision-language model and its processor, for writing and scoring text.

    model: ``Qwen2_5_VLForConditionalGeneration`` (or another image-text-to-text model) with its
    language head; processor: its ``Qwen2VLProcessor`` (tokenizer + image settings); source: where it
    was loaded from (for messages). Build one with :meth:`load` (a path) or :meth:`from_model`
    (a loaded model, e.g. the pack's text encoder part), which check the language head."""

    model: Any
    processor: Any
    source: str = ""

    @classmethod
    def from_model(cls, model, processor, source: str = "", job: str = "writing text") -> LocalVLM:
        if processor is None:
            raise ValueError(f"the local VLM{f' {source!r}' if source else ''} needs its processor (tokenizer)")
        check_language_head(model, source, job)
        return cls(model, processor, source)

    @classmethod
    def load(cls, path, *, processor=None, device="cpu", dtype="auto", job: str = "writing text") -> LocalVLM:
        """Load from ``path``: a model folder (``config.json`` + weights: a Qwen2.5-VL-7B-Instruct, an
        edit judge such as EditScore-7B, or a release's ``text_encoder/``), a release folder holding
        ``text_encoder/``, or a single text-encoder file (which must keep its ``lm_head``).
        ``processor``: a processor object or a tokenizer / processor folder; default: ``path`` itself
        when it has tokenizer files, else the release's ``processor/`` or ``tokenizer/``."""
        from ..formats.text_encoder_files import find_processor

        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"the VLM {str(p)!r} does not exist; expected a Qwen2.5-VL folder or text-encoder file")
        dt = _dtype(dtype, device)
        if p.is_dir():
            root = p
            if (p / "text_encoder" / "config.json").is_file() and not (p / "config.json").is_file():
                p = p / "text_encoder"
            elif p.name == "text_encoder":
                root = p.parent
            if not (p / "config.json").is_file():
                raise FileNotFoundError(f"{str(p)!r} has no config.json; expected a Qwen2.5-VL model folder")
            from transformers import AutoModelForImageTextToText, AutoProcessor

            model = AutoModelForImageTextToText.from_pretrained(p, dtype=dt, local_files_only=True)
            model = model.to(device).eval().requires_grad_(False)
            if processor is None or isinstance(processor, (str, os.PathLike)):
                folder = Path(processor) if processor is not None else (p if _has_tokenizer(p) else None)
                if folder is not None:
                    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
                else:
                    processor = find_processor(model_dir=root)
        else:
            from ..formats.text_encoder_files import load_text_encoder

            if processor is None or isinstance(processor, (str, os.PathLike)):
                processor = find_processor(tokenizer_dir=processor, text_encoder_file=p)
            model = load_text_encoder(p, dtype=dt, device=device, processor=processor)
        return cls.from_model(model, processor, str(path), job)

    # -- helpers -------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def chat_text(self, messages: list[dict]) -> str:
        """The model's prompt text for ``messages`` (:func:`chat_messages`), ready for the answer: the
        processor's chat template, or Qwen's ChatML when it has none."""
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if template:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return _fallback_chat(messages)

    def _inputs(self, text: str, pictures: Sequence):
        kw = {"images": list(pictures)} if pictures else {}
        return self.processor(text=[text], return_tensors="pt", **kw).to(self.device)

    # -- the two operations ----------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        text: str,
        pictures: Sequence = (),
        *,
        seed: int = 0,
        max_new_tokens: int = 512,
        temperature: float = 0.7,
        top_p: float | None = None,
        top_k: int | None = None,
        on_token: Callable[[], None] | None = None,
    ) -> str:
        """The model's continuation of ``text`` (a :meth:`chat_text`) with ``pictures``, decoded
        without special tokens. ``temperature > 0`` samples, seeded with ``seed`` inside a fork of
        torch's random state (the same seed gives the same text; the caller's random state is left
        as it was); ``temperature == 0`` is greedy. ``top_p`` / ``top_k``: nucleus and top-k limits
        (``None``: the model's generation config; ``top_k=0``: none). ``on_token`` runs after each new token (raise in
        it to stop, e.g. on Cancel)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        inputs = self._inputs(text, pictures)
        kw: dict[str, Any] = {"max_new_tokens": int(max_new_tokens)}
        if temperature > 0:
            kw.update(do_sample=True, temperature=float(temperature))
            if top_p is not None:
                kw["top_p"] = float(top_p)
            if top_k is not None:
                kw["top_k"] = int(top_k)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if on_token is not None:
            from transformers import StoppingCriteria, StoppingCriteriaList

            class _Hook(StoppingCriteria):
                def __call__(self, input_ids, scores, **_):
                    on_token()
                    return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

            kw["stopping_criteria"] = StoppingCriteriaList([_Hook()])
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(tok, "eos_token_id", None)
        if pad is not None:
            kw["pad_token_id"] = pad
        dev = self.device
        # generate() samples from torch's global generator: seed it inside a fork, so the caller's
        # random state (a trainer's noise, the data order) is left as it was
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(int(seed))
            out = self.model.generate(**inputs, **kw)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]

    @torch.no_grad()
    def next_token_logits(self, text: str, pictures: Sequence = ()) -> torch.Tensor:
        """The logits ``[vocab]`` of the token after ``text`` with ``pictures`` (float32, CPU)."""
        logits = self.model(**self._inputs(text, pictures)).logits[0, -1]
        return logits.float().cpu()

    def token_id(self, text: str) -> int:
        """The id of ``text`` when the tokenizer makes it one token (a rating digit, say)."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"the tokenizer of {self.source or 'the VLM'} splits {text!r} into {len(enc)} tokens")
        return enc[0]


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible server
# ---------------------------------------------------------------------------------------------


@dataclass
class ChatServer:
    """An OpenAI-compatible chat server. url: its base address (``http://127.0.0.1:8000/v1``; the
    request goes to ``url + "/chat/completions"``); model: the model name it serves; api_key_env:
    the environment variable holding its key (sent as a Bearer token; ``None``: no key); job: what
    the messages call it ("VLM judge", "recaption")."""

    url: str
    model: str = "default"
    api_key_env: str | None = None
    timeout: float = 120.0
    job: str = "VLM"

    def __post_init__(self):
        if not self.url or not str(self.url).startswith(("http://", "https://")):
            raise ValueError(
                f"the {self.job} server url must be an http(s) address of an OpenAI-compatible server "
                f"(e.g. http://127.0.0.1:8000/v1), got {self.url!r}"
            )
        if self.api_key_env is not None and not str(self.api_key_env).strip():
            self.api_key_env = None

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/chat/completions"

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env:  # the key is read from the environment, never from a file
            key = os.environ.get(self.api_key_env)
            if not key:
                raise MissingKeyError(
                    f"the {self.job} server's api_key_env names ${self.api_key_env}, which is not set: "
                    f"export {self.api_key_env}=<your key> (or leave api_key_env empty for a server without a key)"
                )
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def complete(self, messages: list[dict], **params) -> dict:
        """POST one chat completion (``messages`` plus ``params``: ``temperature``, ``max_tokens``,
        ``seed``, ``n``, ``logprobs`` ...) and return the parsed reply."""
        import urllib.error
        import urllib.request

        body = {"model": self.model, "messages": messages, **params}
        req = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=self.headers())
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace") if e.fp is not None else ""
            hint = ""
            if e.code in (401, 403):
                hint = f" (check the key in ${self.api_key_env})" if self.api_key_env else " (it may need a key: set api_key_env)"
            raise VLMServerError(f"the {self.job} server at {self.url} answered HTTP {e.code} {e.reason}{hint}: {detail}") from e
        except OSError as e:  # URLError, connection refused, timeouts
            raise VLMServerError(f"the {self.job} server at {self.url} could not be reached: {e}") from e
        try:
            reply = json.loads(raw)
        except ValueError as e:
            raise VLMServerError(f"the {self.job} server at {self.url} did not answer JSON: {raw[:200]!r}") from e
        if not isinstance(reply, dict) or not reply.get("choices"):
            raise VLMServerError(f"the {self.job} server at {self.url} answered without choices: {str(reply)[:300]}")
        return reply

    def texts(self, reply: dict) -> list[str]:
        """The message text of each choice of a :meth:`complete` reply."""
        out = []
        for ch in reply["choices"]:
            content = (ch.get("message") or {}).get("content")
            if isinstance(content, list):  # some servers answer in content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            out.append(content or "")
        return out
