"""The lmms-eval model `matvlm`: a MaTVLM checkpoint (teacher or hybrid, local or remote code) answering lmms-eval's
`generate_until` and `loglikelihood` requests with TinyLLaVA's prompt conventions.

    lmms-eval --model matvlm --model_args pretrained=PATH[,fast_decode=True,batch_size=8,dtype=bfloat16] --tasks pope

Registered through the `lmms_eval.models` entry point (see `manifest` in this package's __init__), so the command works
once matvlm-hf is installed. This module imports lmms-eval; nothing else in matvlm_hf does.

Prompts are TinyLLaVA's "phi" template (`chat_template.format_conversation`): the task's text (which already carries
the paper's suffix, e.g. "\\nAnswer the question using a single word or phrase.") becomes the user turn, after the
`<image>` placeholder when the document has an image, and the model answers after "ASSISTANT:". Generation is greedy
unless the task asks for temperature > 0; batches are left-padded, so a batch answers exactly as one-by-one does.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from ...chat_template import IMAGE_PLACEHOLDER, format_conversation

DEFAULT_MAX_NEW_TOKENS = 128  # TinyLLaVA's / LLaVA's evaluation scripts


def build_prompt(context: str, has_image: bool) -> str:
    """TinyLLaVA inference prompt for one task text: "<system> USER: <image>\\n{context} ASSISTANT:"."""
    question = f"{IMAGE_PLACEHOLDER}\n{context}" if has_image and IMAGE_PLACEHOLDER not in context else context
    return format_conversation([{"from": "human", "value": question}], add_generation_prompt=True)


def _dtype(name: str) -> torch.dtype | str:
    if name == "auto":
        return "auto"
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype={name!r}: use auto, float32, bfloat16 or float16")
    return value


class MaTVLM(lmms):
    """lmms-eval model for MaTVLM checkpoints.

    Args (all from `--model_args`):
        pretrained: checkpoint folder or Hub id (a `matvlm convert` output; loads with trust_remote_code).
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
        batch_size: requests per forward pass (generation: left-padded batch; loglikelihood: right-padded).
        fast_decode: decode with the static cache (+ CUDA graphs on a GPU) of `fast_generation`.
        max_new_tokens: used when a task does not set one (default 128).
    Raises ValueError for an unknown dtype and TypeError for an unknown argument.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int | str = 1,
        fast_decode: bool = False,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.model = AutoModelForImageTextToText.from_pretrained(
            pretrained, trust_remote_code=True, dtype=_dtype(dtype)
        ).to(self._device)
        self.model.eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=True)
        self.tokenizer = self.processor.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.fast_decode = bool(fast_decode)
        self.max_new_tokens = int(max_new_tokens)
        self._warned_multi_image = False

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "MaTVLM":
        """As lmms-eval's, except that `--model_args` win over the CLI's defaults (its --batch_size is always 1 when
        not given, which would otherwise clash with `--model_args batch_size=N`)."""
        from lmms_eval import utils

        args = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args.update(utils.simple_parse_args_string(arg_string))
        return cls(**args)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------------------------------------------------
    def _visuals(self, request_args: tuple) -> list[Any]:
        doc_to_visual, doc_id, task, split = request_args[2:6]
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        visuals = [v for v in (visuals if isinstance(visuals, list) else [visuals]) if v is not None]
        if len(visuals) > 1:  # TinyLLaVA takes one image per question
            if not self._warned_multi_image:
                warnings.warn(
                    f"task {task}: a document has {len(visuals)} images; TinyLLaVA models see the first one only",
                    stacklevel=2,
                )
                self._warned_multi_image = True
            visuals = visuals[:1]
        return [v.convert("RGB") for v in visuals]

    def _left_padded(self, prompts: list[str], images: list[list[Any]]) -> dict[str, torch.Tensor]:
        flat = [im for ims in images for im in ims]
        inputs = self.processor(
            images=flat or None, text=prompts, padding=True, padding_side="left", return_tensors="pt"
        )
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs.to(self._device)

    def _progress(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, disable=self.rank != 0, desc=desc)

    # ------------------------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers (stop at EOS, the task's `until` strings or max_new_tokens), in request order."""
        order = sorted(range(len(requests)), key=lambda i: str(requests[i].args[1]))  # group equal gen kwargs
        results: list[str | None] = [None] * len(requests)
        bar = self._progress(len(requests), "MaTVLM generate")
        start = 0
        while start < len(order):
            key = str(requests[order[start]].args[1])
            chunk = []
            while start < len(order) and len(chunk) < self.batch_size and str(requests[order[start]].args[1]) == key:
                chunk.append(order[start])
                start += 1
            answers = self._generate([requests[i].args for i in chunk])
            for i, answer in zip(chunk, answers):
                results[i] = answer
            bar.update(len(chunk))
        bar.close()
        return results

    def _generate(self, batch_args: list[tuple]) -> list[str]:
        gen_kwargs = dict(batch_args[0][1] or {})
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0)
        sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
        images = [self._visuals(args) for args in batch_args]
        prompts = [build_prompt(args[0], bool(ims)) for args, ims in zip(batch_args, images)]
        inputs = self._left_padded(prompts, images)
        options: dict[str, Any] = dict(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            do_sample=sample,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if sample:
            options.update(temperature=temperature, top_p=gen_kwargs.get("top_p"))
        with torch.inference_mode():
            out = self.model.generate(**inputs, **options, fast_decode=self.fast_decode)
        texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers = []
        for text in texts:
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            answers.append(text.strip())
        return answers

    # ------------------------------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation tokens | prompt), whether greedy decoding gives exactly those tokens).

        The prompt is the generation prompt of `build_prompt(context)`; the continuation (e.g. " B") follows
        "ASSISTANT:" as an answer does in TinyLLaVA's template.
        """
        results: list[tuple[float, bool]] = []
        bar = self._progress(len(requests), "MaTVLM loglikelihood")
        for start in range(0, len(requests), self.batch_size):
            chunk = [r.args for r in requests[start : start + self.batch_size]]
            results.extend(self._loglikelihood(chunk))
            bar.update(len(chunk))
        bar.close()
        return results

    def _continuation(self, args: tuple) -> str:
        target = args[1]
        if callable(target):
            doc_to_visual, doc_id, task, split = args[2:6]
            target = target(self.task_dict[task][split][doc_id])
        return str(target[0] if isinstance(target, list) else target)

    def _loglikelihood(self, batch_args: list[tuple]) -> list[tuple[float, bool]]:
        images = [self._visuals(args) for args in batch_args]
        contexts = [
            self.processor(text=build_prompt(args[0], bool(ims)), images=ims or None, return_tensors=None)
            for args, ims in zip(batch_args, images)
        ]
        continuations = [
            self.tokenizer(self._continuation(args), add_special_tokens=False)["input_ids"] for args in batch_args
        ]
        sequences = [c["input_ids"][0] + t for c, t in zip(contexts, continuations)]
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=self._device)
        attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=self._device)
        kwargs = {}
        if any(images):
            kwargs["pixel_values"] = torch.cat([c["pixel_values"] for c in contexts if "pixel_values" in c]).to(
                self._device, self.model.dtype
            )
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        out = []
        for row, context in enumerate(contexts):
            n_context, n_total = len(context["input_ids"][0]), len(sequences[row])
            targets = input_ids[row, n_context:n_total]
            predicted = logprobs[row, n_context - 1 : n_total - 1]
            token_logprobs = predicted.gather(-1, targets[:, None])[:, 0]
            out.append((float(token_logprobs.sum()), bool((predicted.argmax(-1) == targets).all())))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("matvlm answers single-round tasks; multi-round generation is not supported")
