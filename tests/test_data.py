"""LLaVADataset / LLaVACollator: template, label masking, lazy images, errors, truncation, batching."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from matvlm_hf.conversion import convert_tinyllava_to_matvlm
from matvlm_hf.data import LLaVACollator, LLaVADataError, LLaVADataset
from matvlm_hf.fabricate import write_tinyllava_checkpoint
from matvlm_hf.processing_matvlm import processor_from_tinyllava

IMG_ID = 1279  # last embedding row of the tiny LM (1280 rows); the tokenizer has < 1000 tokens
N_IMG = 15  # (32 // 8) ** 2 - 1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tinyllava_checkpoint(
        tmp_path_factory.mktemp("ck") / "tinyllava", lm_type="phi", image_aspect_ratio="pad"
    )


@pytest.fixture(scope="module")
def processor(ckpt):
    return processor_from_tinyllava(ckpt, image_token_id=IMG_ID)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "img").mkdir()
    Image.new("RGB", (40, 20), (200, 30, 60)).save(d / "img" / "red.png")
    Image.new("RGB", (24, 24), (10, 120, 240)).save(d / "img" / "blue.jpg")
    (d / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    return d


def conv(
    q1="What is in the picture?", a1="The car is red.", q2="How many people?", a2="There are three people.", image=True
):
    return [
        {"from": "human", "value": ("<image>\n" if image else "") + q1},
        {"from": "gpt", "value": a1},
        {"from": "human", "value": q2},
        {"from": "gpt", "value": a2},
    ]


def write_json(path, samples):
    path.write_text(json.dumps(samples))
    return path


def runs(labels):
    """Contiguous runs of supervised positions: list of token-id lists."""
    out, cur = [], []
    for t in labels.tolist():
        if t == -100:
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        out.append(cur)
    return out


def test_labels_cover_exactly_the_answers(processor, data_dir, tmp_path):
    samples = [{"id": "s0", "image": "red.png", "conversations": conv()}]
    ds = LLaVADataset(write_json(tmp_path / "d.json", samples), data_dir / "img", processor)
    item = ds[0]
    ids, labels = item["input_ids"], item["labels"]
    assert ids.shape == labels.shape
    supervised = labels != -100
    assert torch.equal(labels[supervised], ids[supervised])
    tok = processor.tokenizer
    decoded = [tok.decode(r) for r in runs(labels)]
    eos = tok.eos_token
    assert [d.lstrip() for d in decoded] == ["The car is red." + eos, "There are three people." + eos]
    # the rest of the text (system prompt, questions, "ASSISTANT:") is not supervised; image tokens neither
    assert (ids == IMG_ID).sum() == N_IMG and (labels[ids == IMG_ID] == -100).all()
    unsupervised_text = tok.decode(ids[~supervised & (ids != IMG_ID)])
    assert "USER:" in unsupervised_text and "ASSISTANT:" in unsupervised_text and "red" not in unsupervised_text
    # image: "pad" aspect ratio as in the processor
    ref = processor(images=[Image.open(data_dir / "img" / "red.png")], text="<image>")["pixel_values"]
    torch.testing.assert_close(item["pixel_values"], ref)


def test_missing_and_corrupt_images_name_the_sample(processor, data_dir, tmp_path):
    samples = [
        {"id": "ok", "image": "blue.jpg", "conversations": conv()},
        {"id": "gone-42", "image": "nope/missing.jpg", "conversations": conv()},
        {"id": "broken-7", "image": "corrupt.jpg", "conversations": conv()},
    ]
    ds = LLaVADataset(write_json(tmp_path / "d.json", samples), data_dir / "img", processor)  # lazy: no error yet
    assert ds[0]["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(LLaVADataError, match=r"'gone-42'.*not found.*nope/missing\.jpg"):
        ds[1]
    with pytest.raises(LLaVADataError, match=r"'broken-7'.*cannot decode.*corrupt\.jpg"):
        ds[2]


def test_image_count_must_match_placeholders(processor, data_dir, tmp_path):
    samples = [
        {"id": "no-placeholder", "image": "blue.jpg", "conversations": conv(image=False)},
        {"id": "no-image", "conversations": conv()},
    ]
    ds = LLaVADataset(write_json(tmp_path / "d.json", samples), data_dir / "img", processor)
    with pytest.raises(LLaVADataError, match="'no-placeholder'.*1 image"):
        ds[0]
    with pytest.raises(LLaVADataError, match="'no-image'.*0 image"):
        ds[1]


def test_truncation_never_cuts_image_tokens(processor, data_dir, tmp_path):
    samples = [{"id": "long", "image": "blue.jpg", "conversations": conv(a1="The car is red. " * 20)}]
    path = write_json(tmp_path / "d.json", samples)
    full = LLaVADataset(path, data_dir / "img", processor)[0]
    image_end = int((full["input_ids"] == IMG_ID).nonzero().max()) + 1
    cut = LLaVADataset(path, data_dir / "img", processor, max_length=image_end + 3)[0]
    assert len(cut["input_ids"]) == image_end + 3
    assert (cut["input_ids"] == IMG_ID).sum() == N_IMG
    assert torch.equal(cut["input_ids"], full["input_ids"][: image_end + 3])
    with pytest.raises(LLaVADataError, match="'long'.*cut into its image tokens"):
        LLaVADataset(path, data_dir / "img", processor, max_length=image_end - 1)[0]


def test_collator_mixes_text_only_and_image_samples(processor, data_dir, tmp_path, ckpt):
    samples = [
        {"id": "a", "image": "red.png", "conversations": conv()},
        {"id": "t", "conversations": conv(image=False, a2="Two.")},
        {"id": "b", "image": "blue.jpg", "conversations": conv(a1="Blue.")},
    ]
    ds = LLaVADataset(
        write_json(tmp_path / "d.json", samples),
        data_dir / "img",
        (processor.tokenizer, processor.image_processor),
        image_token_id=IMG_ID,
        num_image_tokens=N_IMG,
        image_aspect_ratio="pad",
    )
    items = [ds[i] for i in range(3)]
    pad = processor.tokenizer.pad_token_id
    batch = LLaVACollator(pad)(items)
    lengths = [len(it["input_ids"]) for it in items]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    torch.testing.assert_close(batch["pixel_values"][0], items[0]["pixel_values"][0])
    torch.testing.assert_close(batch["pixel_values"][1], items[2]["pixel_values"][0])
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][row, n:] == pad).all() and (batch["labels"][row, n:] == -100).all()
        assert torch.equal(batch["input_ids"][row, :n], items[row]["input_ids"])
    # pad == eos for Phi-2: the eos that ends an answer keeps attention_mask 1
    eos = processor.tokenizer.eos_token_id
    assert ((batch["input_ids"] == eos) & (batch["attention_mask"] == 1)).any()
    text_only = LLaVACollator(pad)([items[1]])
    assert "pixel_values" not in text_only

    # the batch runs through a MaTVLM converted from the same checkpoint
    from matvlm_hf import MaTVLMForConditionalGeneration

    out_dir = convert_tinyllava_to_matvlm(ckpt, tmp_path / "hybrid", mamba_ratio=0.5, progress=False)
    model = MaTVLMForConditionalGeneration.from_pretrained(out_dir).eval()
    assert model.config.image_token_id == IMG_ID and model.config.num_image_tokens == N_IMG
    with torch.no_grad():
        out = model(**batch, use_cache=False)
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)

    left = LLaVACollator(pad, padding_side="left")(items)
    assert left["attention_mask"][1].tolist()[-lengths[1] :] == [1] * lengths[1]


def test_bad_json_structure(processor, tmp_path):
    path = write_json(tmp_path / "d.json", [{"id": "x", "conversations": []}])
    with pytest.raises(LLaVADataError, match="'x'.*conversations"):
        LLaVADataset(path, None, processor)[0]
    path = write_json(
        tmp_path / "e.json",
        [{"id": "y", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "gpt", "value": "hi"}]}],
    )
    with pytest.raises(LLaVADataError, match="'y'"):
        LLaVADataset(path, None, processor)[0]
