"""`matvlm serve`'s chat engine (no web framework): streamed answers equal generate()'s, multi-turn prompts follow the
TinyLLaVA template, and what a user can get wrong becomes an InputError."""

import random

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from matvlm_hf.chat_template import format_conversation
from matvlm_hf.commands.serve import default_model
from matvlm_hf.conversion import convert_tinyllava_to_matvlm
from matvlm_hf.fabricate import write_tinyllava_checkpoint
from matvlm_hf.serving.chat import ChatModel, InputError, Session, Settings, assistant_message, read_image, user_message
from matvlm_hf.synthetic_vqa import render_scene, sample_scene


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    write_tinyllava_checkpoint(work / "tinyllava", seed=0)
    return convert_tinyllava_to_matvlm(work / "tinyllava", work / "hybrid", mamba_ratio=0.5)


@pytest.fixture(scope="module")
def chat_model(hybrid_dir):
    return ChatModel.load(hybrid_dir, "hybrid", device="cpu")


@pytest.fixture(scope="module")
def image():
    return render_scene(sample_scene(random.Random(3)), 32)


def reference_answer(path, image, messages, seed: int = 0, **generate_kwargs) -> str:
    """generate() on a freshly loaded copy of the checkpoint, as the README's Use section does it."""
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs, **generate_kwargs)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_streamed_greedy_answer_equals_generate(chat_model, hybrid_dir, image):
    settings = Settings(max_new_tokens=24)
    steps = list(chat_model.stream(chat_model.prepare(Session(image), "m", "What colour is it?", settings), settings))
    expected = reference_answer(
        hybrid_dir, image, [user_message("What colour is it?", True)], max_new_tokens=24, do_sample=False
    )
    assert steps[-1].done and steps[-1].text == expected
    assert len(steps) > 2, "the answer came in one piece: nothing was streamed"
    assert all(b.text.startswith(a.text) and len(b.text) >= len(a.text) for a, b in zip(steps, steps[1:]))
    assert steps[-1].tokens == 24 and steps[-1].tokens_per_s > 0 and steps[-1].first_token_s > 0


def test_streamed_sampling_equals_generate_with_the_same_seed(chat_model, hybrid_dir, image):
    settings = Settings(temperature=0.8, top_p=0.9, max_new_tokens=16)
    inputs = chat_model.prepare(Session(image), "m", "Describe the image.", settings)
    torch.manual_seed(7)
    streamed = list(chat_model.stream(inputs, settings))[-1].text
    expected = reference_answer(
        hybrid_dir,
        image,
        [user_message("Describe the image.", True)],
        seed=7,
        max_new_tokens=16,
        do_sample=True,
        temperature=0.8,
        top_p=0.9,
        top_k=0,
    )
    assert streamed == expected


def test_second_turn_prompt_is_tinyllavas_template(chat_model, image):
    session = Session(image, {"m": [user_message("How many shapes?", True), assistant_message("two")]})
    inputs = chat_model.prepare(session, "m", "Which colour?", Settings())
    text = format_conversation(
        [
            {"from": "human", "value": "<image>\nHow many shapes?"},
            {"from": "gpt", "value": "two"},
            {"from": "human", "value": "Which colour?"},
        ],
        add_generation_prompt=True,
    )
    assert text.endswith("USER: Which colour? ASSISTANT:") and text.count("<image>") == 1
    expected = chat_model.processor(images=[image], text=text, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    assert torch.equal(inputs["pixel_values"], expected["pixel_values"])


def test_prompt_too_long_is_an_input_error(chat_model, image):
    with pytest.raises(InputError, match="too long.*context of 2048"):
        chat_model.prepare(Session(image), "m", "word " * 2100, Settings(max_new_tokens=8))
    with pytest.raises(InputError, match="2040 new tokens would pass"):  # the answer's room counts too
        chat_model.prepare(Session(image), "m", "What colour?", Settings(max_new_tokens=2040))


def test_undecodable_upload_is_an_input_error(tmp_path, image):
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"\x89PNG but not really")
    with pytest.raises(InputError, match="Could not read 'photo.png' as an image"):
        read_image(bad)
    image.save(tmp_path / "good.png")
    assert read_image(tmp_path / "good.png").size == image.size


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0)])
def test_bad_sampling_settings_are_input_errors(bad):
    with pytest.raises(InputError):
        Settings(**bad).check()


def test_closing_the_stream_stops_generation_and_frees_the_model(chat_model, image):
    settings = Settings(max_new_tokens=400)
    stream = chat_model.stream(chat_model.prepare(Session(image), "m", "Describe the image.", settings), settings)
    first = next(stream)
    stream.close()  # what Gradio does when the browser goes away
    assert not first.done and not chat_model.lock.locked()
    settings = Settings(max_new_tokens=4)
    assert list(chat_model.stream(chat_model.prepare(Session(image), "m", "Again?", settings), settings))[-1].done


def test_default_model_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="matvlm quickstart"):
        default_model()
    (tmp_path / "matvlm-quickstart" / "hybrid-distilled").mkdir(parents=True)
    (tmp_path / "matvlm-quickstart" / "hybrid-distilled" / "config.json").write_text("{}")
    assert default_model().name == "hybrid-distilled"


@pytest.mark.gpu
def test_fast_decode_stream_equals_generate_fast_decode(hybrid_dir, image):
    model = ChatModel.load(hybrid_dir, "hybrid", device="cuda")
    assert model.fast_decode
    for settings in (Settings(max_new_tokens=40), Settings(max_new_tokens=5)):
        inputs = model.prepare(Session(image), "m", "What colour is it?", settings)
        streamed = list(model.stream(inputs, settings))[-1]
        out = model.model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=False, fast_decode=True)
        expected = model.processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert streamed.text == expected and streamed.tokens_per_s > 0
