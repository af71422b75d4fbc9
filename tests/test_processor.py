"""MaTVLMProcessor: placeholder expansion, padding, images, errors, save/load."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from matvlm_hf.chat_template import format_conversation
from matvlm_hf.fabricate import write_tinyllava_checkpoint
from matvlm_hf.processing_matvlm import (
    MaTVLMProcessor,
    expand_to_square,
    num_image_tokens_for,
    processor_from_tinyllava,
)

IMG_ID = 1200  # an embedding row the tiny tokenizer never produces (it has < 1000 tokens, 1280 rows)
N_IMG = 15  # (32 // 8) ** 2 - 1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tinyllava_checkpoint(tmp_path_factory.mktemp("ck") / "phi", lm_type="phi", image_aspect_ratio="pad")


@pytest.fixture()
def proc(ckpt):
    return processor_from_tinyllava(ckpt, image_token_id=IMG_ID)


def _image(w=40, h=20, color=(200, 30, 60)):
    return Image.new("RGB", (w, h), color)


def _prompt(question="What is it?", image=True):
    q = ("<image>\n" if image else "") + question
    return format_conversation([{"from": "human", "value": q}], add_generation_prompt=True)


def test_from_tinyllava_reads_config(ckpt, proc):
    assert proc.num_image_tokens == N_IMG == num_image_tokens_for(32, 8)
    assert num_image_tokens_for(384, 14) == 728  # TinyLLaVA-Phi-2-SigLIP-3.1B
    assert proc.image_aspect_ratio == "pad"
    assert proc.tokenizer.model_max_length == 3072
    assert proc.padding_side == "left"  # generation's side, whatever TinyLLaVA trained with
    assert proc.image_processor.size == {"height": 32, "width": 32}
    assert type(proc.image_processor).__name__ in ("SiglipImageProcessorPil", "SiglipImageProcessor")


def test_expands_placeholders(proc):
    text = "look <image> and <image> now"
    out = proc(images=[_image(), _image()], text=text)
    ids = out["input_ids"][0].tolist()
    assert ids.count(IMG_ID) == 2 * N_IMG
    tok = proc.tokenizer
    chunks = [tok(c).input_ids for c in text.split("<image>")]
    assert ids == chunks[0] + [IMG_ID] * N_IMG + chunks[1] + [IMG_ID] * N_IMG + chunks[2]
    assert out["attention_mask"].tolist() == [[1] * len(ids)]
    assert out["pixel_values"].shape == (2, 3, 32, 32)
    assert IMG_ID >= len(tok)  # the image id is never produced by the tokenizer
    assert proc.batch_decode(out["input_ids"][:, :3]) == tok.batch_decode(out["input_ids"][:, :3])
    assert proc.decode(chunks[0]) == "look "


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding(proc, side):
    proc.padding_side = side
    texts = [_prompt("What is shown in this picture in detail?"), _prompt("Hi?")]
    out = proc(images=[[_image()], [_image(30, 30)]], text=texts, padding=True)
    single = [proc(images=_image(), text=t)["input_ids"][0].tolist() for t in texts]
    long, short = single
    assert out["input_ids"].shape == (2, len(long))
    n_pad = len(long) - len(short)
    pad = [proc.tokenizer.pad_token_id] * n_pad
    row, mask = out["input_ids"][1].tolist(), out["attention_mask"][1].tolist()
    if side == "left":
        assert row == pad + short and mask == [0] * n_pad + [1] * len(short)
    else:
        assert row == short + pad and mask == [1] * len(short) + [0] * n_pad
    assert out["input_ids"][0].tolist() == long and out["attention_mask"][0].all()
    padded = proc(images=[_image(), _image()], text=texts, padding="max_length", max_length=len(long) + 5)
    assert padded["input_ids"].shape == (2, len(long) + 5)


def test_pixel_values_pad_and_square(ckpt, proc):
    image = _image(40, 20, (200, 30, 60))
    pv = proc(images=image, text="<image>")["pixel_values"][0]
    # TinyLLaVA: expand2square with int(mean * 255) = 127, then SigLIP: bicubic resize, /255, (x - .5) / .5
    square = Image.new("RGB", (40, 40), (127, 127, 127))
    square.paste(image, (0, 10))
    ref = np.asarray(square.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255.0
    ref = torch.from_numpy((ref - 0.5) / 0.5).permute(2, 0, 1)
    assert torch.allclose(pv, ref, atol=1e-5)
    assert torch.allclose(pv[:, 0, 16], torch.full((3,), (127 / 255 - 0.5) / 0.5), atol=1e-5)  # padded band
    assert expand_to_square(image, (0, 0, 0)).size == (40, 40)

    proc.image_aspect_ratio = "square"
    pv_sq = proc(images=image, text="<image>")["pixel_values"][0]
    ref_sq = np.asarray(image.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255.0
    assert torch.allclose(pv_sq, torch.from_numpy((ref_sq - 0.5) / 0.5).permute(2, 0, 1), atol=1e-5)


def test_image_paths(proc, tmp_path):
    path = tmp_path / "img.png"
    _image().save(path)
    a = proc(images=[str(path)], text="<image>")["pixel_values"]
    b = proc(images=[_image()], text="<image>")["pixel_values"]
    assert torch.equal(a, b)


def test_errors(proc, tmp_path):
    with pytest.raises(ValueError, match=r"got 2 image\(s\) but 1 <image> placeholder\(s\)"):
        proc(images=[_image(), _image()], text="<image> hi")
    with pytest.raises(ValueError, match=r"text 0: got 1 image\(s\) but 2 <image> placeholder\(s\)"):
        proc(images=[[_image()], [_image(), _image()]], text=["<image><image>", "<image>"])
    with pytest.raises(ValueError, match=r"got 0 image\(s\) but 1 <image>"):
        proc(text="<image> hi")
    with pytest.raises(ValueError, match=r"image 0: expected a PIL.Image.Image.*numpy.ndarray"):
        proc(images=[np.zeros((8, 8, 3), dtype=np.uint8)], text="<image>")
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"image 1: cannot open .*not_an_image\.png"):
        proc(images=[_image(), str(bad)], text="<image><image>")
    with pytest.raises(ValueError, match=r"cannot open .*missing\.jpg"):
        proc(images=[str(tmp_path / "missing.jpg")], text="<image>")
    long = _prompt("What is shown in this picture in detail?")
    n = len(proc(images=_image(), text=long)["input_ids"][0])
    with pytest.raises(ValueError, match=rf"{n} tokens long \({N_IMG} of them image tokens\).*max_length=20"):
        proc(images=_image(), text=long, max_length=20)
    with pytest.raises(ValueError, match="cut into the image tokens"):
        proc(images=_image(), text=long, max_length=20, truncation=True)
    cut = proc(images=_image(), text=long, max_length=n - 2, truncation=True)
    assert cut["input_ids"].shape == (1, n - 2)
    with pytest.raises(ValueError, match=r"different lengths \(1 to 2 tokens\): pass padding=True"):
        proc(text=["a", "a b"])
    assert [len(x) for x in proc(text=["a", "a b"], return_tensors=None)["input_ids"]] == [1, 2]
    with pytest.raises(ValueError, match="needs max_length"):
        proc(text=["a", "b c"], padding="max_length")


def test_chat_template_and_tokenize(proc):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == _prompt("What is it?")
    out = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    assert out["input_ids"].shape[0] == 1 and (out["input_ids"] == IMG_ID).sum() == N_IMG
    assert out["pixel_values"].shape == (1, 3, 32, 32)


def test_save_load_roundtrip(proc, tmp_path):
    images = [_image(), _image(25, 50)]
    texts = [_prompt(), _prompt("Describe the image.")]
    proc.padding_side = "right"
    before = proc(images=images, text=texts, padding=True)
    proc.save_pretrained(tmp_path / "p")
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "p" / name).exists(), name
    saved = json.loads((tmp_path / "p" / "processor_config.json").read_text())
    assert saved["image_token_id"] == IMG_ID and saved["num_image_tokens"] == N_IMG
    loaded = MaTVLMProcessor.from_pretrained(tmp_path / "p")
    assert loaded.padding_side == "right"
    assert loaded.to_dict() == proc.to_dict()
    assert (loaded.image_token_id, loaded.num_image_tokens, loaded.image_aspect_ratio) == (IMG_ID, N_IMG, "pad")
    assert loaded.chat_template == proc.chat_template
    after = loaded(images=images, text=texts, padding=True)
    assert set(after) == set(before) == {"input_ids", "attention_mask", "pixel_values"}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_auto_processor_remote_code(proc, tmp_path):
    from transformers import AutoProcessor

    before = MaTVLMProcessor._auto_class  # `import matvlm_hf` registers it already: put back what was there
    MaTVLMProcessor.register_for_auto_class("AutoProcessor")
    try:
        proc.save_pretrained(tmp_path / "remote")
    finally:
        MaTVLMProcessor._auto_class = before
    for name in ("processing_matvlm.py", "chat_template.py"):
        assert (tmp_path / "remote" / name).exists(), name
    config = json.loads((tmp_path / "remote" / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_matvlm.MaTVLMProcessor"
    loaded = AutoProcessor.from_pretrained(tmp_path / "remote", trust_remote_code=True)
    assert type(loaded).__name__ == "MaTVLMProcessor"
    a = loaded(images=_image(), text=_prompt())
    b = proc(images=_image(), text=_prompt())
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_defaults_standard_kwargs_and_empty_text(proc):
    bare = MaTVLMProcessor(proc.image_processor, proc.tokenizer)
    assert (bare.image_token_id, bare.num_image_tokens, bare.padding_side) == (50295, 728, "left")
    texts = [_prompt("What is shown in this picture in detail?"), _prompt("Hi?")]
    images = [_image(), _image()]
    plain = proc(images=images, text=texts, padding=True, padding_side="right")
    grouped = proc(
        images=images, text=texts, text_kwargs={"padding": True, "padding_side": "right"}, return_attention_mask=True
    )
    assert all(torch.equal(plain[k], grouped[k]) for k in plain)
    assert plain["attention_mask"][1, -1] == 0
    with pytest.raises(ValueError, match="empty"):
        proc(text="")
    with pytest.raises(TypeError, match="unexpected"):
        proc(text=texts[0], images=images[:1], not_a_processor_kwarg=1)
