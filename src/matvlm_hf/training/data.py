"""LLaVA-format training data for distillation: a lazy dataset and a padding collator.

A LLaVA-format JSON file is a list of samples

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

(`image` is optional: text-only samples are fine; it may also be a list of paths for several `<image>`s).
Each sample is rendered with TinyLLaVA's "phi" template and tokenised by `chat_template.tokenize_conversation`:
every `<image>` becomes `num_image_tokens` copies of the image token id, and only the answers (with their
end-of-text token) are supervised. Images are opened in `__getitem__` (nothing is read up front) and go through
the processor's TinyLLaVA preprocessing ("pad" to a square with the mean colour or "square", then SigLIP).

    processor = MaTVLMProcessor.from_pretrained(student_dir)
    dataset = LLaVADataset("llava.json", "images/", processor, max_length=1428)
    collator = LLaVACollator(processor.tokenizer.pad_token_id)
    batch = collator([dataset[0], dataset[1]])  # input_ids, attention_mask, labels, pixel_values
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ..chat_template import IGNORE_INDEX, IMAGE_PLACEHOLDER, image_block_end, tokenize_conversation
from ..errors import UserError
from ..processing_matvlm import expand_to_square

#: ShareGPT / OpenAI-style speaker names accepted as LLaVA's
ROLE_ALIASES = {"user": "human", "assistant": "gpt"}


def normalize_turns(turns: list[Any]) -> list[Any]:
    """LLaVA turns from ShareGPT-style ones: `role`/`content` keys become `from`/`value`, speakers `user` and
    `assistant` become `human` and `gpt` (other turns are returned unchanged)."""
    out = []
    for turn in turns:
        if isinstance(turn, dict):
            turn = dict(turn)
            if "from" not in turn and "role" in turn:
                turn["from"] = turn.pop("role")
            if "value" not in turn and "content" in turn:
                turn["value"] = turn.pop("content")
            turn["from"] = ROLE_ALIASES.get(turn.get("from"), turn.get("from"))
        out.append(turn)
    return out


class LLaVADataError(UserError):
    """A sample that cannot be turned into a training example; the message names the sample."""


class LLaVADataset(torch.utils.data.Dataset):
    """Lazy LLaVA-format dataset: each item is a dict of `input_ids`, `labels` (1-D LongTensors) and, for samples
    with images, `pixel_values` (num_images, 3, H, W).

    Args:
        json_path: the LLaVA-format JSON file (a list of samples), or an already loaded list of samples.
        image_folder: image paths in the JSON are relative to it (None: as written).
        processor: a `MaTVLMProcessor`, or a `(tokenizer, image_processor)` pair; with a pair, `image_token_id` and
            `num_image_tokens` must be given (and `image_aspect_ratio` defaults to "square").
        max_length: cut longer sequences at the end (answers may be cut; image tokens never are: a sample whose
            image tokens would not fit raises `LLaVADataError`). None: no limit.
        image_token_id, num_image_tokens, image_aspect_ratio: override the processor's.
    """

    def __init__(
        self,
        json_path: str | os.PathLike | list[dict[str, Any]],
        image_folder: str | os.PathLike | None,
        processor: Any,
        max_length: int | None = None,
        *,
        image_token_id: int | None = None,
        num_image_tokens: int | None = None,
        image_aspect_ratio: str | None = None,
    ):
        if isinstance(processor, (tuple, list)):
            tokenizer, image_processor = processor
            default_aspect = "square"
        else:
            tokenizer, image_processor = processor.tokenizer, processor.image_processor
            image_token_id = processor.image_token_id if image_token_id is None else image_token_id
            num_image_tokens = processor.num_image_tokens if num_image_tokens is None else num_image_tokens
            default_aspect = processor.image_aspect_ratio
        if image_token_id is None or num_image_tokens is None:
            raise ValueError("LLaVADataset needs image_token_id and num_image_tokens (or a MaTVLMProcessor)")
        self.image_aspect_ratio = image_aspect_ratio or default_aspect
        if self.image_aspect_ratio not in ("pad", "square"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'square', got {self.image_aspect_ratio!r}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = int(image_token_id)
        self.num_image_tokens = int(num_image_tokens)
        self.max_length = max_length
        self.image_folder = Path(image_folder) if image_folder is not None else None
        if isinstance(json_path, (str, os.PathLike)):
            self.json_path = Path(json_path)
            samples = read_samples(self.json_path)
        else:
            self.json_path, samples = None, list(json_path)
        if not isinstance(samples, list):
            raise LLaVADataError(f"{self.json_path}: expected a JSON list of samples, got {type(samples).__name__}")
        if not samples:
            raise LLaVADataError(f"{self.json_path or 'the data'}: the list of samples is empty; nothing to train on")
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    # ------------------------------------------------------------------------------------------------
    def sample_name(self, index: int) -> str:
        sample = self.samples[index]
        sid = sample.get("id", "<no id>") if isinstance(sample, dict) else "<not a dict>"
        where = f" in {self.json_path}" if self.json_path is not None else ""
        return f"sample {sid!r} (index {index}{where})"

    def image_paths(self, index: int) -> list[Path]:
        """Paths of the images of sample `index` (empty for a text-only sample)."""
        image = self.samples[index].get("image")
        if image is None:
            return []
        names = image if isinstance(image, list) else [image]
        if not all(isinstance(n, str) and n for n in names):
            raise LLaVADataError(f"{self.sample_name(index)}: 'image' must be a path or a list of paths, got {image!r}")
        return [self.image_folder / n if self.image_folder is not None else Path(n) for n in names]

    def load_image(self, index: int, path: Path) -> Image.Image:
        """Open and fully decode one image (RGB); `LLaVADataError` naming the sample and the path otherwise."""
        if not path.is_file():
            raise LLaVADataError(f"{self.sample_name(index)}: image file not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()  # decode now: a truncated or corrupt file fails here, not later in a worker
                image = im.convert("RGB")
        except Exception as err:  # noqa: BLE001 - any decode failure is reported the same way
            raise LLaVADataError(
                f"{self.sample_name(index)}: cannot decode image {path} ({type(err).__name__}: {err})"
            ) from err
        if self.image_aspect_ratio == "pad":
            image = expand_to_square(image, tuple(int(x * 255) for x in self.image_processor.image_mean))
        return image

    def tokenize(self, index: int) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of sample `index`, truncated to max_length (never into the image tokens)."""
        sample = self.samples[index]
        turns = sample.get("conversations") if isinstance(sample, dict) else None
        if not isinstance(turns, list) or not turns:
            raise LLaVADataError(f"{self.sample_name(index)}: no 'conversations' list")
        try:
            ids, labels = tokenize_conversation(
                normalize_turns(turns), self.tokenizer, self.image_token_id, self.num_image_tokens
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise LLaVADataError(f"{self.sample_name(index)}: {err}") from err
        if self.max_length is not None and len(ids) > self.max_length:
            end = image_block_end(ids, self.image_token_id)
            if end > self.max_length:
                raise LLaVADataError(
                    f"{self.sample_name(index)}: max_length={self.max_length} would cut into its image tokens "
                    f"(they end at position {end} of {len(ids)}); raise max_length or drop the sample"
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return ids, labels

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, labels = self.tokenize(index)
        paths = self.image_paths(index)
        n_placeholders = sum(
            t.get("value", "").count(IMAGE_PLACEHOLDER)
            for t in normalize_turns(self.samples[index]["conversations"])
            if isinstance(t, dict) and isinstance(t.get("value"), str)
        )
        n_blocks = ids.count(self.image_token_id) // self.num_image_tokens
        if len(paths) != n_blocks:
            raise LLaVADataError(
                f"{self.sample_name(index)}: {len(paths)} image(s) but {n_blocks} image placeholder(s) in the "
                f"conversation ({n_placeholders} '{IMAGE_PLACEHOLDER}' in the text; the template keeps one per turn)"
            )
        item = {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}
        if paths:
            images = [self.load_image(index, p) for p in paths]
            item["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
        return item


def read_samples(path: Path) -> Any:
    """The parsed JSON of a data file; `LLaVADataError` naming the file (and line/column) when unreadable."""
    if not path.is_file():
        raise LLaVADataError(f"{path}: no such data file" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise LLaVADataError(
            f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}; a "
            "LLaVA-format file is one JSON list of samples (not JSON lines)"
        ) from err
    except UnicodeDecodeError as err:
        raise LLaVADataError(f"{path} is not UTF-8 text ({err}); save it as UTF-8 JSON") from err


class LLaVACollator:
    """Pad a list of `LLaVADataset` items into a batch.

    input_ids are padded with `pad_token_id`, labels with -100, attention_mask marks the real tokens (from the
    lengths, not from `input_ids != pad`: Phi-2's pad is its end-of-text token, which also ends every answer).
    pixel_values of the samples that have images are concatenated in order (text-only samples contribute none;
    the model scatters the features into the image tokens in the same order); no key when no sample has one.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_token_id is None:
            raise ValueError("LLaVACollator needs a pad_token_id")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(it["input_ids"]) for it in items)
        b = len(items)
        input_ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, length), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            sl = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            input_ids[row, sl] = it["input_ids"]
            labels[row, sl] = it["labels"]
            attention_mask[row, sl] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pixels = [it["pixel_values"] for it in items if it.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels, dim=0)
        return batch


__all__ = ["LLaVACollator", "LLaVADataError", "LLaVADataset"]
