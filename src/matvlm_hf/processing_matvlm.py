"""MaTVLM processor: TinyLLaVA's preprocessing as a transformers `ProcessorMixin`.

This file is saved beside model weights as remote code: it imports only transformers, torch, PIL and
(relatively) `chat_template.py`.

- Images: TinyLLaVA's optional "pad" step (expand to a square filled with the mean colour,
  `int(mean * 255)` per channel), then SigLIP's PIL-based image processor (resize to 384 bicubic, rescale
  1/255, normalise mean = std = 0.5) -> `pixel_values` [num_images, 3, H, W].
- Text: each "<image>" placeholder becomes `num_image_tokens` copies of `image_token_id` (the ids are
  inserted directly: the id is an embedding row the tokenizer never produces, e.g. 50295 for Phi-2's 51200
  rows), chunks between placeholders tokenised separately as TinyLLaVA does. The model then scatters the
  projected image features into those positions, so positions equal TinyLLaVA's -200 splice.
- Batches are padded on the left by default (what `generate()` needs); `padding_side="right"` per call or
  `processor.padding_side` change it.

    processor = processor_from_tinyllava("TinyLLaVA-Phi-2-SigLIP-3.1B", image_token_id=50295)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image
from transformers import AutoTokenizer, PretrainedConfig
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .chat_template import CHAT_TEMPLATE, IMAGE_PLACEHOLDER, check_truncation, encode_with_image_placeholders

try:  # transformers >= 5: the PIL backend has its own class; "SiglipImageProcessor" needs torchvision
    from transformers import SiglipImageProcessorPil as _SiglipPil
except ImportError:  # transformers 4: SiglipImageProcessor is the PIL/numpy one
    from transformers import SiglipImageProcessor as _SiglipPil

#: TinyLLaVA-Phi-2-SigLIP-3.1B's values: an embedding row Phi-2's tokenizer never produces (50295 of 51200 rows), and
#: SigLIP-so400m-384/14's 27 x 27 patches minus the first ("patch" strategy)
DEFAULT_IMAGE_TOKEN_ID = 50295
DEFAULT_NUM_IMAGE_TOKENS = 728
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]


def num_image_tokens_for(image_size: int, patch_size: int, strategy: str = "patch") -> int:
    """Image tokens per image: (image_size // patch_size) ** 2 patches, minus the first for "patch"."""
    n = (image_size // patch_size) ** 2
    if strategy == "patch":
        return n - 1
    if strategy == "cls_patch":
        return n
    raise ValueError(f"unexpected vision_feature_select_strategy {strategy!r}")


def siglip_image_processor(image_size: int = 384):
    """SigLIP's preprocessing (PIL backend): resize to a square bicubic, rescale 1/255, normalise 0.5/0.5."""
    from transformers.image_utils import PILImageResampling

    return _SiglipPil(
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(SIGLIP_MEAN),
        image_std=list(SIGLIP_STD),
        do_convert_rgb=True,
    )


def expand_to_square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """TinyLLaVA's expand2square: paste the image centred on a square canvas of `background`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def load_image(image: Any, index: int = 0) -> Image.Image:
    """A PIL image (or a path to one) as RGB; ValueError naming the culprit otherwise."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any decode failure is reported the same way
            raise ValueError(f"image {index}: cannot open {str(image)!r} as an image ({type(e).__name__}: {e})") from e
    raise ValueError(
        f"image {index}: expected a PIL.Image.Image or a path to an image file, got {type(image).__module__}."
        f"{type(image).__name__} (convert arrays with PIL.Image.fromarray)"
    )


def _flatten_images(images: Any) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        return flat
    return [images]


class MaTVLMProcessor(ProcessorMixin):
    """Image processor (SigLIP, PIL backend) + tokenizer, with TinyLLaVA's image handling and chat template.

    Args:
        image_processor: a SigLIP image processor (`siglip_image_processor(384)`).
        tokenizer: the LM's tokenizer (a fast one: offsets are used for labels).
        image_token_id: the id written for each image position (not produced by the tokenizer); default
            TinyLLaVA-Phi-2-SigLIP-3.1B's 50295.
        num_image_tokens: image positions per `<image>` (default 728: SigLIP-384/14 with the "patch" strategy).
        image_aspect_ratio: "pad" (expand to a square with the mean colour first) or "square" (just resize).
        chat_template: jinja template; TinyLLaVA's "phi" template by default.
        image_token: the placeholder string in the text.
        padding_side: side batches are padded on, "left" (default: what `generate()` needs) or "right".
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_token_id: int = DEFAULT_IMAGE_TOKEN_ID,
        num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
        image_aspect_ratio: str = "pad",
        chat_template: str | None = None,
        image_token: str = IMAGE_PLACEHOLDER,
        padding_side: str = "left",
        **kwargs,
    ):
        if image_aspect_ratio not in ("pad", "square"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'square', got {image_aspect_ratio!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.image_token_id = int(image_token_id)
        self.num_image_tokens = int(num_image_tokens)
        self.image_aspect_ratio = image_aspect_ratio
        self.image_token = image_token
        self.padding_side = padding_side
        if chat_template is None:
            chat_template = CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    # -- loading: keep SigLIP's PIL backend (TinyLLaVA's preprocessing) even where torchvision exists --
    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        image_processor = _SiglipPil.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return [image_processor, tokenizer]

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`ProcessorMixin.save_pretrained`, without leaving the `auto_map` it records for remote code on `self`
        (so a saved and reloaded processor has the same `to_dict()` as the one saved)."""
        had_auto_map = "auto_map" in self.__dict__
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if not had_auto_map:
                self.__dict__.pop("auto_map", None)

    # ------------------------------------------------------------------------------------------------
    def preprocess_images(self, images: list[Any]) -> list[Image.Image]:
        out = []
        for i, image in enumerate(images):
            image = load_image(image, i)
            if self.image_aspect_ratio == "pad":
                mean = self.image_processor.image_mean
                image = expand_to_square(image, tuple(int(x * 255) for x in mean))
            out.append(image)
        return out

    # keyword arguments transformers' processors take that change nothing here
    _IGNORED_KWARGS = (
        "return_dict",
        "return_mm_token_type_ids",
        "return_attention_mask",
        "return_token_type_ids",
        "verbose",
        "pad_to_multiple_of",
        "return_overflowing_tokens",
        "return_special_tokens_mask",
        "return_offsets_mapping",
        "return_length",
        "do_convert_rgb",
    )

    def __call__(
        self,
        images=None,
        text=None,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
        add_special_tokens: bool = True,
        videos=None,
        audio=None,
        padding_side: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Tokenise `text` (str or list of str) with each `<image>` expanded, and preprocess `images`.

        images: None, one image, a list of images, or a list of lists (per text); each a PIL image or a
        path. There must be exactly one image per `<image>` placeholder, in order. padding: False,
        True/"longest" or "max_length" (needs max_length), on `padding_side`. truncation: cut
        sequences longer than max_length on the right (never into the image tokens); without it a
        sequence longer than max_length is an error. padding_side: "left"/"right" for this call (default
        `self.padding_side`). The keyword groups transformers' processors take (`text_kwargs`, `images_kwargs`,
        `common_kwargs`) are merged in; unknown keywords raise TypeError, an empty text ValueError.
        """
        if videos is not None or audio is not None:
            raise ValueError("MaTVLMProcessor handles images and text only")
        for group in ("text_kwargs", "images_kwargs", "common_kwargs"):
            kwargs.update(kwargs.pop(group, None) or {})
        padding = kwargs.pop("padding", padding)
        truncation = kwargs.pop("truncation", truncation)
        max_length = kwargs.pop("max_length", max_length)
        return_tensors = kwargs.pop("return_tensors", return_tensors)
        padding_side = kwargs.pop("padding_side", padding_side) or self.padding_side
        for key in self._IGNORED_KWARGS:
            kwargs.pop(key, None)
        if kwargs:
            raise TypeError(f"MaTVLMProcessor got unexpected arguments: {sorted(kwargs)}")
        if text is None and images is None:
            raise ValueError("give text, images or both")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")

        flat_images = _flatten_images(images)
        data: dict[str, Any] = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a list of strings")
            empty = [i for i, t in enumerate(texts) if not t.strip()]
            if empty:
                raise ValueError(f"text {empty[0]} is empty: give a prompt (e.g. from processor.apply_chat_template)")
            n_placeholders = sum(t.count(self.image_token) for t in texts)
            if n_placeholders != len(flat_images):
                raise ValueError(
                    f"got {len(flat_images)} image(s) but {n_placeholders} {self.image_token} placeholder(s) in "
                    "the text: give exactly one image per placeholder"
                )
            nested = isinstance(images, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in images)
            if nested and len(images) == len(texts):  # per-text image lists: check each text
                for i, (t, imgs) in enumerate(zip(texts, images)):
                    n_imgs = len(imgs) if isinstance(imgs, (list, tuple)) else 1
                    if t.count(self.image_token) != n_imgs:
                        raise ValueError(
                            f"text {i}: got {n_imgs} image(s) but {t.count(self.image_token)} "
                            f"{self.image_token} placeholder(s)"
                        )
            data.update(self._tokenize(texts, padding, truncation, max_length, add_special_tokens, padding_side))
            lengths = sorted({len(ids) for ids in data["input_ids"]})
            if return_tensors is not None and len(lengths) > 1:
                raise ValueError(
                    f"the texts have different lengths ({lengths[0]} to {lengths[-1]} tokens): pass "
                    "padding=True to batch them as tensors, or return_tensors=None"
                )
        if flat_images:
            pil = self.preprocess_images(flat_images)
            pixel_values = self.image_processor(pil, return_tensors="pt")["pixel_values"]
            data["pixel_values"] = pixel_values
        return BatchFeature(data, tensor_type=return_tensors)

    def _tokenize(
        self, texts, padding, truncation, max_length, add_special_tokens, padding_side: str
    ) -> dict[str, list]:
        batch = []
        for i, t in enumerate(texts):
            ids, _ = encode_with_image_placeholders(
                t,
                self.tokenizer,
                self.image_token_id,
                self.num_image_tokens,
                add_special_tokens=add_special_tokens,
                placeholder=self.image_token,
            )
            if max_length is not None and len(ids) > max_length:
                if not truncation:
                    raise ValueError(
                        f"text {i} is {len(ids)} tokens long ({ids.count(self.image_token_id)} of them image "
                        f"tokens), longer than max_length={max_length}: shorten it, raise max_length or pass "
                        "truncation=True"
                    )
                check_truncation(ids, self.image_token_id, max_length)
                ids = ids[:max_length]
            batch.append(ids)

        if padding is True:
            padding = "longest"
        if padding in (False, None, "do_not_pad"):
            return {"input_ids": batch, "attention_mask": [[1] * len(ids) for ids in batch]}
        if padding == "longest":
            target = max(len(ids) for ids in batch)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max_length
        else:
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token to pad a batch")
        left = padding_side == "left"
        input_ids, attention_mask = [], []
        for ids in batch:
            n = target - len(ids)
            pad, ones = [pad_id] * n, [1] * len(ids)
            input_ids.append(pad + ids if left else ids + pad)
            attention_mask.append([0] * n + ones if left else ones + [0] * n)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


def processor_from_tinyllava(
    checkpoint_dir: str | os.PathLike, image_token_id: int, num_image_tokens: int | None = None
) -> MaTVLMProcessor:
    """Build the processor of a TinyLLaVA folder: its tokenizer files and its config's image size,
    image_aspect_ratio, tokenizer padding side and model_max_length (num_image_tokens from the vision
    config's image/patch size and the "patch" strategy when not given).

    The folder's remote code (TinyLLaVA's config.json `auto_map`) is never consulted nor run: the tokenizer class
    comes from tokenizer_config.json, and one that exists only as remote code raises ValueError."""
    d = Path(checkpoint_dir)
    config = json.loads((d / "config.json").read_text())
    vision = config["vision_config"]
    image_size = vision["image_size"]
    if num_image_tokens is None:
        num_image_tokens = num_image_tokens_for(
            image_size, vision["patch_size"], config.get("vision_feature_select_strategy", "patch")
        )
    tokenizer = AutoTokenizer.from_pretrained(  # an empty config: AutoConfig would ask to run config.json's auto_map
        d,
        config=PretrainedConfig(),
        trust_remote_code=False,
        model_max_length=config.get("tokenizer_model_max_length", 3072),
    )
    if (d / "preprocessor_config.json").exists():
        image_processor = _SiglipPil.from_pretrained(d)
    else:
        image_processor = siglip_image_processor(image_size)
    aspect = config.get("image_aspect_ratio", "square")
    if aspect not in ("pad", "square"):
        raise ValueError(f"image_aspect_ratio {aspect!r} in {d / 'config.json'} is not supported (pad, square)")
    return MaTVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
        image_aspect_ratio=aspect,
    )
