"""vLLM's multimodal processing for MaTVLM: images through the project's `MaTVLMProcessor` (TinyLLaVA "pad"/"square",
SigLIP resize/rescale/normalise), and each `<image>` in the prompt expanded exactly as the project's processor does.

vLLM tokenises the whole prompt text before multimodal processing. TinyLLaVA instead tokenises the text between
`<image>` placeholders chunk by chunk (BPE merges never cross a placeholder), so the prompt ids are decoded back to
text and re-encoded with the project's `encode_with_image_placeholders`: the ids then equal
`MaTVLMProcessor(text=...)["input_ids"]` token for token, with `num_image_tokens` image-token ids per image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)

from ...chat_template import IMAGE_PLACEHOLDER, encode_with_image_placeholders
from ...configuration_matvlm import MaTVLMConfig
from ...processing_matvlm import MaTVLMProcessor


@lru_cache(maxsize=4)
def _load_processor(path: str, revision: str | None) -> MaTVLMProcessor:
    return MaTVLMProcessor.from_pretrained(path, revision=revision)


class MaTVLMProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> MaTVLMConfig:
        return self.ctx.get_hf_config(MaTVLMConfig)

    def get_hf_processor(self, **kwargs: object) -> MaTVLMProcessor:
        model_config = self.ctx.model_config
        return _load_processor(model_config.model, model_config.revision)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self) -> int:
        return self.get_hf_config().num_image_tokens


class MaTVLMDummyInputsBuilder(BaseDummyInputsBuilder[MaTVLMProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.get_hf_config().vision_config.image_size
        return {
            "image": self._get_dummy_images(
                width=size, height=size, num_images=mm_counts.get("image", 0), overrides=(mm_options or {}).get("image")
            )
        }


class MaTVLMMultiModalProcessor(BaseMultiModalProcessor[MaTVLMProcessingInfo]):
    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        return [
            PromptReplacement(
                modality="image",
                target=IMAGE_PLACEHOLDER,
                replacement=[config.image_token_id] * config.num_image_tokens,
            )
        ]

    def _apply_prompt_updates(self, token_ids: list[int], mm_prompt_updates):
        """Re-tokenise the prompt the TinyLLaVA way (see the module docstring) and locate the image blocks."""
        processor = self.info.get_hf_processor()
        tokenizer = processor.tokenizer
        prefix = tokenizer.encode("", add_special_tokens=True)  # what the tokenizer adds in front (a BOS) if any
        has_prefix = bool(prefix) and token_ids[: len(prefix)] == prefix
        text = tokenizer.decode(
            token_ids[len(prefix) :] if has_prefix else token_ids,
            skip_special_tokens=False,
            clean_up_tokenization_spaces=False,
        )
        n_images = len(mm_prompt_updates.get("image", []))
        if text.count(IMAGE_PLACEHOLDER) != n_images:
            raise ValueError(
                f"The prompt has {text.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholder(s) but "
                f"{n_images} image(s) were given: give exactly one image per placeholder."
            )
        ids, _ = encode_with_image_placeholders(
            text, tokenizer, processor.image_token_id, processor.num_image_tokens, add_special_tokens=has_prefix
        )
        return ids, self._find_mm_placeholders(ids, mm_prompt_updates)
