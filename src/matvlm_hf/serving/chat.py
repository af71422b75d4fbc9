"""The chat engine behind `matvlm serve`, free of any web framework: checked inputs, multi-turn prompts in the
TinyLLaVA template, and answers streamed token by token with their decode speed.

- `ChatModel.load(path)` loads a MaTVLM checkpoint (hybrid or teacher) and its processor; one generation at a time
  runs on it (a lock), so a request abandoned by its browser cannot overlap the next one.
- `Session` holds one browser session's image and conversations (one per served model: a teacher and a hybrid
  answer differently, so each continues its own conversation).
- `ChatModel.stream(...)` yields `Progress` (the answer so far, tokens, tokens/s): transformers' `generate()` with a
  `TextIteratorStreamer` or, on CUDA with `fast_decode`, the static-cache CUDA-graph decoder of `fast_generation`
  (same tokens as `generate(fast_decode=True)`), fed to the same streamer.
- Every problem a user can cause raises `InputError`, whose message is meant for the chat.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from ..fast_generation import PREFILL_TOKEN_BUDGET, SamplingParams, StaticDecoder, bucket_length, prefill_chunk_length
from ..processing_matvlm import load_image

FAST_CHUNK = 8  # decode steps per CUDA-graph batch on the fast path (the streaming granularity there)


class InputError(ValueError):
    """A problem with what the user sent; the message says what to do and is shown in the chat."""


@dataclass(frozen=True)
class Settings:
    """Sampling controls. temperature 0 = greedy (do_sample=False); else sampling with temperature and top-p."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": 0,
            "max_new_tokens": self.max_new_tokens,
        }

    def check(self) -> None:
        if not 0 <= self.temperature <= 10:
            raise InputError(f"temperature must be between 0 (greedy) and 10, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top-p must be in (0, 1], got {self.top_p}")
        if int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            raise InputError(f"max new tokens must be a whole number >= 1, got {self.max_new_tokens}")


@dataclass
class Session:
    """One browser session: its image (PIL, RGB) and, per served model, the HF-style messages so far."""

    image: Image.Image | None = None
    conversations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class Progress:
    """The answer so far. tokens: new tokens generated (an end-of-text included); tokens_per_s: decode speed after
    the first token (None until there are two); first_token_s: seconds from the request to the first token."""

    text: str
    tokens: int = 0
    tokens_per_s: float | None = None
    first_token_s: float | None = None
    done: bool = False


def read_image(path: str | Path) -> Image.Image:
    """An uploaded file as an RGB image; InputError naming the file when it is not a readable image."""
    try:
        image = load_image(str(path))
        image.load()
    except ValueError as e:  # the reason without the server's path of the upload
        name, reason = Path(path).name, str(e.__cause__ or e).replace(f"{str(path)!r}", "").replace(str(path), "")
        raise InputError(
            f"Could not read {name!r} as an image ({reason.strip()}). Upload a PNG, JPEG, WebP or similar picture."
        ) from e
    return image


def user_message(question: str, with_image: bool) -> dict[str, Any]:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return {"role": "user", "content": content}


def assistant_message(answer: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


class _TimedStreamer(TextIteratorStreamer):
    """TextIteratorStreamer that also counts the new tokens and stamps the first and the last."""

    def __init__(self, tokenizer, start: float, **kwargs):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)
        self.start, self.tokens = start, 0
        self.first: float | None = None
        self.last: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            now = time.perf_counter()
            self.first = self.first if self.first is not None else now
            self.last, self.tokens = now, self.tokens + value.numel()
        super().put(value)

    def progress(self, text: str, done: bool = False) -> Progress:
        speed = None
        if self.tokens > 1 and self.last > self.first:
            speed = (self.tokens - 1) / (self.last - self.first)
        first = None if self.first is None else self.first - self.start
        return Progress(text, self.tokens, speed, first, done)


class _StopOn(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatModel:
    """A MaTVLM checkpoint served for chat.

    Args:
        model: a MaTVLMForConditionalGeneration in eval mode, on its device.
        processor: its MaTVLMProcessor (chat template, image preprocessing).
        name: how the page labels it.
        fast_decode: use the static-cache CUDA-graph decoder (only on CUDA; ignored elsewhere).
    """

    def __init__(self, model, processor, name: str, fast_decode: bool = True):
        self.model, self.processor, self.name = model, processor, name
        self.fast_decode = fast_decode and model.device.type == "cuda"
        self.context = int(model.config.text_config.max_position_embeddings)
        self.lock = threading.Lock()
        self._decoder: tuple[tuple, StaticDecoder] | None = None

    @classmethod
    def load(
        cls, path: str | Path, name: str, device: str = "auto", dtype: str = "auto", fast_decode: bool = True
    ) -> "ChatModel":
        """Load a MaTVLM checkpoint folder (its remote code included). device: auto (CUDA when available) | cpu |
        cuda[:N]; dtype: auto (as saved) | float32 | bfloat16 | float16. ValueError when the folder is no MaTVLM
        checkpoint."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{path} is not a checkpoint folder (no config.json): give a MaTVLM checkpoint made by "
                "`matvlm convert`, `matvlm distill` or `matvlm quickstart`"
            )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        model = (
            AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=torch_dtype)
            .to(device)
            .eval()
        )
        if getattr(model.config, "model_type", None) != "matvlm":
            raise ValueError(
                f"{path} holds a {model.config.model_type!r} model, not a MaTVLM one: convert it first "
                "with `matvlm convert --input PATH --output OUT`"
            )
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        return cls(model, processor, name, fast_decode=fast_decode)

    def describe(self) -> str:
        layers = self.model.config.mamba_layers
        n = self.model.config.text_config.num_hidden_layers
        kind = f"Mamba-2 in layers {list(layers)} of {n}" if layers else f"attention in all {n} layers"
        fast = ", fast_decode" if self.fast_decode else ""
        return f"{kind} ({self.model.device.type}, {str(self.model.dtype).removeprefix('torch.')}{fast})"

    def prepare(self, session: Session, key: str, question: str, settings: Settings) -> dict[str, torch.Tensor]:
        """Model inputs for `question` after `session`'s conversation `key` (the image goes in its first turn).
        InputError when the prompt plus `settings.max_new_tokens` would not fit the model's context."""
        history = session.conversations.get(key, [])
        messages = history + [user_message(question, with_image=not history)]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(images=[session.image], text=prompt, return_tensors="pt")
        n = inputs["input_ids"].shape[1]
        if n + settings.max_new_tokens > self.context:
            image = int((inputs["input_ids"] == self.processor.image_token_id).sum())
            raise InputError(
                f"The prompt is too long for {self.name}: the conversation is {n} tokens ({image} of them the image) "
                f"and {settings.max_new_tokens} new tokens would pass its context of {self.context} tokens. Ask a "
                "shorter question, lower 'max new tokens', or press Clear to start over."
            )
        return inputs.to(self.model.device)

    def stream(self, inputs: dict[str, torch.Tensor], settings: Settings) -> Iterator[Progress]:
        """Generate an answer in a worker thread, yielding the text so far after each decoded piece; the last item has
        done=True. Closing the iterator early stops the generation at its next token."""
        start = time.perf_counter()
        streamer = _TimedStreamer(self.processor.tokenizer, start)
        stop, errors = threading.Event(), []

        def work() -> None:
            try:
                with self.lock, torch.no_grad():
                    if self.fast_decode:
                        self._fast_generate(inputs, settings, streamer, stop)
                    else:
                        self.model.generate(
                            **inputs,
                            **settings.generate_kwargs(),
                            streamer=streamer,
                            stopping_criteria=StoppingCriteriaList([_StopOn(stop)]),
                        )
            except BaseException as e:  # noqa: BLE001 - handed to the consumer thread below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, name=f"generate-{self.name}", daemon=True)
        thread.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                if piece:
                    yield streamer.progress(text)
        finally:
            stop.set()
            thread.join()
        if errors:
            raise errors[0]
        yield streamer.progress(text, done=True)

    def _fast_generate(self, inputs, settings: Settings, streamer: _TimedStreamer, stop: threading.Event) -> None:
        """`fast_generation.fast_generate` for batch 1, with each batch of FAST_CHUNK tokens handed to the streamer."""
        sampling = settings.generate_kwargs()
        params = SamplingParams(
            sampling["do_sample"],
            float(sampling.get("temperature", 1.0)),
            None,
            sampling["top_p"] if sampling.get("top_p", 1.0) < 1.0 else None,
        )
        input_ids, total = inputs["input_ids"], inputs["input_ids"].shape[1] + settings.max_new_tokens
        key = (bucket_length(total), params)
        if self._decoder is None or self._decoder[0] != key:
            self._decoder = None  # free the old cache first
            self._decoder = (key, StaticDecoder(self.model, 1, total, params))
        decoder = self._decoder[1]
        eos = self.model.generation_config.eos_token_id
        eos = set([eos] if isinstance(eos, int) else (eos or []))
        streamer.put(input_ids.cpu())  # the prompt (skipped by the streamer)
        config = self.model.generation_config
        chunk = prefill_chunk_length(
            1,
            getattr(config, "prefill_token_budget", None) or PREFILL_TOKEN_BUDGET,
            getattr(config, "prefill_chunk_size", None),
        )
        tokens = decoder.prefill(input_ids, inputs["attention_mask"], inputs.get("pixel_values"), chunk)[:, None]
        made = 0
        while True:
            row = tokens[0].tolist()
            end = next((i + 1 for i, t in enumerate(row) if t in eos), None)
            streamer.put(torch.tensor(row[:end]))
            made += len(row)
            if end is not None or made >= settings.max_new_tokens or stop.is_set():
                break
            tokens = decoder.decode(min(FAST_CHUNK, settings.max_new_tokens - made))
        streamer.end()
