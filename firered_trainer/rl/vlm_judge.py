"""The report's fine-grained VLM judge (eq. 4): a 1-5 rating weighted by the rating tokens' probabilities,
from a local Qwen-VL through transformers or an OpenAI-compatible server (:mod:`firered_core.agent.vlm`)."""

from __future__ import annotations

import math

import torch

from firered_core.agent import vlm

from .reward_batch import RewardBatch, as_unit_images

__all__ = ["JUDGE_PROMPT", "RATINGS", "SCORE_LINE", "SCORE_PREFIX", "VLMJudge", "expected_rating", "judge_prompt",
           "rating_from_logprobs"]  # fmt: skip

JUDGE_PROMPT = (
    "You are judging an image edit. The first picture is the source, the last one the result of the "
    "instruction: \"{instruction}\". Reason briefly about whether the instruction was followed, whether "
    "the rest of the picture was kept, and the visual quality. Then end with a line 'Score: N', where N "
    "is an integer from 1 (bad) to 5 (excellent)."
)
SCORE_PREFIX = "Score:"
RATINGS = ("1", "2", "3", "4", "5")
SCORE_LINE = "End with a line 'Score: N', where N is an integer from 1 (bad) to 5 (excellent)."


def judge_prompt(template: str, instruction: str) -> str:
    """The judge's text for one picture: ``template`` with ``{instruction}`` replaced (a plain
    replacement, so rubrics holding JSON braces are safe), or the instruction appended when the
    template has no placeholder; the 'Score: N' line eq. 4 reads is appended when the template
    does not ask for it."""
    if "{instruction}" in template:
        text = template.replace("{instruction}", instruction)
    else:
        text = template.rstrip() + f'\nThe instruction: "{instruction}"'
    if SCORE_PREFIX.lower() not in text.lower():
        text = text.rstrip() + "\n" + SCORE_LINE
    return text


def expected_rating(logits: torch.Tensor) -> torch.Tensor:
    """Eq. 4's inner sum: ``sum_v v softmax(z)_v`` over the rating tokens' logits ``[..., 5]``."""
    p = torch.softmax(logits.float(), dim=-1)
    return (p * torch.arange(1, len(RATINGS) + 1, dtype=torch.float32, device=p.device)).sum(-1)


class VLMJudge:
    """The report's fine-grained logit-weighted reward (eq. 4)::

        R(x, y) = 1/K sum_k sum_{v=1..5} v * softmax(z^(k))_v

    where ``z^(k)`` are the logits of the rating tokens "1".."5" at the score position after the
    judge's k-th sampled reasoning. ``backend="local"``: a Qwen-VL ``model`` + ``processor``
    (transformers; e.g. the Qwen2.5-VL-7B users hold as the text encoder, if its file keeps the
    ``lm_head``): each pass samples the reasoning, cuts it at "Score:", appends "Score: " and reads
    the next-token logits. ``backend="http"``: an OpenAI-compatible server (vLLM, SGLang, ...)
    asked for ``n = K`` completions with ``logprobs``; the score position is the last rating digit
    after "Score:", its ``top_logprobs`` restricted to "1".."5" and renormalised (ratings missing
    from the top list count as probability 0); ``api_key_env`` names the environment variable that
    holds the server's key (sent as a Bearer token; never pass a key itself). Pictures in the
    request: the source(s), then the edit. The text is :func:`judge_prompt` of ``batch.rubrics[i]``
    (e.g. a benchmark category's rubric) or of ``prompt``. Both backends are the core's VLM client
    (:mod:`firered_core.agent.vlm`, shared with instruction rewriting): a local model without its
    language head is refused there, naming what to load instead.
    """

    def __init__(
        self,
        *,
        backend: str = "local",
        model=None,
        processor=None,
        model_path: str | None = None,
        processor_path: str | None = None,
        url: str | None = None,
        api_key_env: str | None = None,
        model_name: str = "judge",
        passes: int = 3,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        prompt: str = JUDGE_PROMPT,
        image_size: int = 448,
        timeout: float = 120.0,
        seed: int = 0,
        **_,
    ):
        if backend not in ("local", "http"):
            raise ValueError(f"VLM judge backend must be 'local' or 'http', got {backend!r}")
        if passes < 1:
            raise ValueError(f"VLM judge passes (K) must be >= 1, got {passes}")
        self.backend, self.passes, self.max_new_tokens = backend, passes, max_new_tokens
        self.temperature, self.prompt, self.image_size, self.timeout = temperature, prompt, image_size, timeout
        self.url, self.model_name, self.seed, self.api_key_env = url, model_name, seed, api_key_env
        self.server = self.local = None
        if backend == "http":
            if not url:
                raise ValueError("the http VLM judge needs url= (an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1)")
            self.server = vlm.ChatServer(url, model=model_name, api_key_env=api_key_env, timeout=timeout, job="VLM judge")
        elif model is None:
            if not model_path:
                raise ValueError("the local VLM judge needs model= and processor=, or model_path= (a Qwen-VL folder)")
            self.local = vlm.LocalVLM.load(model_path, processor=processor_path, job="the VLM judge")
        else:
            self.local = vlm.LocalVLM.from_model(model, processor, job="the VLM judge")
        self.model = self.local.model if self.local else None
        self.processor = self.local.processor if self.local else None

    def _pictures(self, img: torch.Tensor, batch: RewardBatch, i: int):
        pics = []
        src = batch.get("sources", i)
        if src is not None:
            pics.append(vlm.to_pil(torch.as_tensor(src, dtype=torch.float32)))
        pics.append(vlm.to_pil(img))
        return [vlm.shrink(p, self.image_size) for p in pics]

    # -- local ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _local_one(self, pics, text: str, gen: torch.Generator) -> float:
        chat = self.local.chat_text(vlm.chat_messages(text, pics))
        ids = [self.local.token_id(r) for r in RATINGS]
        scores = []
        for _ in range(self.passes):
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))  # one seed per pass
            reasoning = self.local.generate(chat, pics, seed=seed, temperature=self.temperature,
                                            max_new_tokens=self.max_new_tokens)  # fmt: skip
            cut = reasoning.rfind(SCORE_PREFIX)
            reasoning = (reasoning[:cut] if cut >= 0 else reasoning.rstrip() + "\n")
            logits = self.local.next_token_logits(chat + reasoning + SCORE_PREFIX + " ", pics)
            scores.append(float(expected_rating(logits[ids])))
        return sum(scores) / len(scores)

    # -- http ----------------------------------------------------------------------------------

    def _http_one(self, pics, text: str) -> float:
        reply = self.server.complete(
            vlm.chat_messages(text, pics, urls=True),
            n=self.passes,
            temperature=self.temperature,
            max_tokens=self.max_new_tokens,
            logprobs=True,
            top_logprobs=20,
        )
        scores = [s for ch in reply["choices"] if (s := rating_from_logprobs(ch)) is not None]
        if not scores:
            raise RuntimeError(f"the VLM judge at {self.url} returned no 'Score: N' with logprobs in any choice")
        return sum(scores) / len(scores)

    def __call__(self, images, batch: RewardBatch) -> torch.Tensor:
        imgs = as_unit_images(images)
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for i in range(imgs.shape[0]):
            pics = self._pictures(imgs[i], batch, i)
            text = judge_prompt(batch.get("rubrics", i) or self.prompt, batch.prompts[i])
            if self.backend == "local":
                out.append(self._local_one(pics, text, gen))
            else:
                out.append(self._http_one(pics, text))
        return torch.tensor(out, dtype=torch.float32)


def rating_from_logprobs(choice: dict) -> float | None:
    """Eq. 4 for one OpenAI-style choice: the expected rating at the last rating digit that follows
    "Score:" in its ``logprobs.content``; ``None`` if there is none."""
    toks = (choice.get("logprobs") or {}).get("content") or []
    text = ""
    pos = None
    for k, t in enumerate(toks):
        if t.get("token", "").strip() in RATINGS and SCORE_PREFIX.lower() in text.lower()[-16:]:
            pos = k
        text += t.get("token", "")
    if pos is None:
        return None
    top = {d["token"].strip(): d["logprob"] for d in toks[pos].get("top_logprobs", []) if d["token"].strip() in RATINGS}
    top.setdefault(toks[pos]["token"].strip(), toks[pos]["logprob"])
    logits = torch.tensor([top.get(r, -math.inf) for r in RATINGS])
    return float(expected_rating(logits))
