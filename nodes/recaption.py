"""The recaption node: a terse edit instruction rewritten into a precise one (FireRed's agent
recaption), on the loaded Qwen2.5-VL or an OpenAI-compatible server; the text comes out as a
``STRING`` to read, edit, and connect to FireRed Edit Encode's prompt."""

from __future__ import annotations

from ..firered_core.agent import recaption, vlm
from . import host

CATEGORY = "FireRed"
MAX_SEED = 0xFFFFFFFFFFFFFFFF

_TIPS = {
    "instruction": "The edit instruction to rewrite; refer to several pictures as Picture 1, Picture 2, Picture 3.",
    "backend": "local: the connected text encoder writes the text (it needs its language head: load the release folder with "
    "FireRed Diffusers Loader; ComfyUI's qwen_2.5_vl_7b*.safetensors files have none). "
    "http: an OpenAI-compatible server (vLLM, SGLang, llama.cpp, a hosted API) at url.",
    "url": "http backend: the server's address, e.g. http://127.0.0.1:8000/v1 (the request goes to url/chat/completions).",
    "model": "http backend: the model name the server serves (e.g. Qwen/Qwen2.5-VL-7B-Instruct).",
    "api_key_env": "http backend: the name of the environment variable holding the server's API key (never the key itself); "
    "empty = no key.",
    "seed": "Sampling seed: the same seed and settings give the same text (a server gets it in the request).",
    "max_new_tokens": "Length limit of the rewritten instruction, in tokens.",
    "target_words": "The length asked for, in words (characters for Chinese); upstream's agent asks for 512.",
    "text_encoder": "local backend: Qwen2.5-VL with its language head, e.g. FireRed Diffusers Loader's text_encoder.",
    "image": "Picture {n} the instruction is about (optional): the model sees it while rewriting.",
}


class FireRedRecaption:
    DESCRIPTION = (
        "Rewrites a short edit instruction into a precise, expanded one, as FireRed's agent does (its 'recaption'): "
        "on the loaded Qwen2.5-VL or an OpenAI-compatible server. The result is a STRING: read it, edit it, or connect "
        "it to FireRed Edit Encode's prompt. The system prompt is firered_core/agent/prompts/recaption.md."
    )
    CATEGORY = CATEGORY
    FUNCTION = "rewrite"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("instruction",)
    OUTPUT_TOOLTIPS = ("The rewritten instruction.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "instruction": ("STRING", {"multiline": True, "default": "", "tooltip": _TIPS["instruction"]}),
                "backend": (list(recaption.BACKENDS), {"default": "local", "tooltip": _TIPS["backend"]}),
                "url": ("STRING", {"default": "http://127.0.0.1:8000/v1", "tooltip": _TIPS["url"]}),
                "model": ("STRING", {"default": "default", "tooltip": _TIPS["model"]}),
                "api_key_env": ("STRING", {"default": "", "tooltip": _TIPS["api_key_env"]}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True, "tooltip": _TIPS["seed"]}),
                "max_new_tokens": ("INT", {"default": 1024, "min": 16, "max": 8192, "tooltip": _TIPS["max_new_tokens"]}),
                "target_words": ("INT", {"default": recaption.TARGET_WORDS, "min": 10, "max": 2000, "tooltip": _TIPS["target_words"]}),
            },
            "optional": {
                "text_encoder": ("FIRERED_TEXT_ENCODER", {"tooltip": _TIPS["text_encoder"]}),
                **{f"image{n}": ("IMAGE", {"tooltip": _TIPS["image"].format(n=n)}) for n in (1, 2, 3)},
            },
        }

    def rewrite(self, instruction, backend="local", url="", model="default", api_key_env="", seed=0,
                max_new_tokens=1024, target_words=recaption.TARGET_WORDS, text_encoder=None,
                image1=None, image2=None, image3=None):  # fmt: skip
        pictures = [img[k] for img in (image1, image2, image3) if img is not None for k in range(img.shape[0])]
        settings = dict(max_new_tokens=max_new_tokens, target_words=target_words)
        if backend == "http":
            server = vlm.ChatServer(url, model=model or "default", api_key_env=api_key_env or None, job="recaption")
            out = recaption.Recaptioner("http", server=server, **settings)(instruction, pictures, seed=seed)
        elif backend == "local":
            if text_encoder is None:
                raise ValueError(
                    "FireRed Recaption with backend local needs the text_encoder input: connect a Qwen2.5-VL with its "
                    "language head (FireRed Diffusers Loader's text_encoder: the release folder has it), or set backend to http"
                )
            local = vlm.LocalVLM.from_model(text_encoder.model, text_encoder.processor, text_encoder.source,
                                            "FireRed Recaption (backend local)")  # fmt: skip
            with host.on_device(text_encoder):
                out = recaption.Recaptioner("local", local, **settings)(instruction, pictures, seed=seed,
                                                                       on_token=host.check_interrupt)  # fmt: skip
        else:
            raise ValueError(f"FireRed Recaption: backend must be one of {recaption.BACKENDS}, got {backend!r}")
        return {"ui": {"text": [out]}, "result": (out,)}


NODE_CLASS_MAPPINGS = {"FireRedRecaption": FireRedRecaption}
NODE_DISPLAY_NAME_MAPPINGS = {"FireRedRecaption": "FireRed Recaption (rewrite the instruction)"}
