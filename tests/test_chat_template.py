"""TinyLLaVA "phi" template: text, jinja twin, tokenisation and label masking."""

import pytest

from matvlm_hf.chat_template import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    format_conversation,
    tokenize_conversation,
)
from matvlm_hf.fabricate import write_tinyllava_checkpoint
from matvlm_hf.processing_matvlm import processor_from_tinyllava

IMG_ID, N_IMG = 1200, 15  # an unused embedding row of the tiny checkpoints; 4x4 patches - 1

TWO_ROUNDS = [
    {"from": "human", "value": "What is in the picture?\n<image>"},
    {"from": "gpt", "value": "A cat on a sofa."},
    {"from": "human", "value": "What color is it?"},
    {"from": "gpt", "value": "It is brown."},
]


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {
        lm: processor_from_tinyllava(write_tinyllava_checkpoint(root / lm, lm_type=lm), IMG_ID)
        for lm in ("phi", "llama")
    }


def test_format_conversation_text():
    expected = (
        SYSTEM_PROMPT + " USER: <image>\nWhat is in the picture? ASSISTANT: A cat on a sofa.<|endoftext|>"
        "USER: What color is it? ASSISTANT: It is brown.<|endoftext|>"
    )
    assert format_conversation(TWO_ROUNDS) == expected
    assert SYSTEM_PROMPT == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions."
    )


def test_image_moves_to_front_and_generation_prompt():
    q = [{"from": "human", "value": "  Describe it. <image> "}]
    assert format_conversation(q).endswith("USER: <image>\nDescribe it. ")
    assert format_conversation(q, add_generation_prompt=True).endswith("USER: <image>\nDescribe it. ASSISTANT:")
    assert format_conversation(q + [{"from": "gpt", "value": None}]).endswith("Describe it. ASSISTANT:")
    assert format_conversation([{"from": "human", "value": "<image>"}]).endswith("USER: <image> ")
    # a question without an image is left as is (TinyLLaVA does not strip it)
    assert format_conversation([{"from": "human", "value": " hi "}]).endswith("USER:  hi  ")


def test_turns_must_alternate():
    with pytest.raises(ValueError, match="alternate"):
        format_conversation([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}])


def _hf_messages(turns, with_system=False):
    """LLaVA turns -> HF messages (image as a content item, placed where the placeholder was)."""
    msgs = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}] if with_system else []
    for t in turns:
        role = "user" if t["from"] == "human" else "assistant"
        if "<image>" in t["value"]:
            before, after = t["value"].split("<image>")
            content = ([{"type": "text", "text": before}] if before.strip() else []) + [{"type": "image"}]
            content += [{"type": "text", "text": after}] if after.strip() else []
            if len(content) == 3:  # text on both sides: keep one text part (parts join with "\n")
                content = [{"type": "image"}, {"type": "text", "text": t["value"].replace("<image>", "")}]
        else:
            content = [{"type": "text", "text": t["value"]}]
        msgs.append({"role": role, "content": content})
    return msgs


CONVERSATIONS = [
    TWO_ROUNDS,
    [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A dog."}],
    [
        {"from": "human", "value": "Describe the image. <image>"},
        {"from": "gpt", "value": "Trees and sky."},
        {"from": "human", "value": "And the ground?"},
        {"from": "gpt", "value": "Grass."},
        {"from": "human", "value": "Anything else?"},
        {"from": "gpt", "value": "No."},
    ],
]


@pytest.mark.parametrize("lm_type", ["phi", "llama"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_jinja_equals_format_conversation(processors, lm_type, conv):
    proc = processors[lm_type]
    turns = CONVERSATIONS[conv]
    eos = proc.tokenizer.eos_token
    assert proc.apply_chat_template(_hf_messages(turns)) == format_conversation(turns, eos_token=eos)
    # inference prompt: everything but the last answer, plus "ASSISTANT:"
    prompt = proc.apply_chat_template(_hf_messages(turns[:-1]), add_generation_prompt=True)
    assert prompt == format_conversation(turns[:-1], add_generation_prompt=True, eos_token=eos)
    assert prompt.endswith("ASSISTANT:")
    # a system message replaces the default system prompt
    system_turn = [{"from": "system", "value": "Be brief."}]
    assert proc.apply_chat_template(_hf_messages(turns, with_system=True)) == format_conversation(
        system_turn + turns, eos_token=eos
    )
    # plain-string content works too
    str_msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
    assert proc.apply_chat_template(str_msgs) == format_conversation(turns, eos_token=eos)


@pytest.mark.parametrize("lm_type", ["phi", "llama"])
def test_labels_cover_exactly_the_answers(processors, lm_type):
    tok = processors[lm_type].tokenizer
    ids, labels = tokenize_conversation(TWO_ROUNDS, tok, IMG_ID, N_IMG)
    assert len(ids) == len(labels)
    assert ids.count(IMG_ID) == N_IMG
    start = ids.index(IMG_ID)
    assert ids[start : start + N_IMG] == [IMG_ID] * N_IMG  # one contiguous block
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i == IMG_ID)
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    supervised = [lab for lab in labels if lab != IGNORE_INDEX]
    eos = tok.eos_token
    assert tok.decode(supervised) == f" A cat on a sofa.{eos} It is brown.{eos}"
    assert supervised.count(tok.eos_token_id) == 2
    # the text around the image decodes back to the prompt (BOS only once, at the start for llama)
    text_ids = [i for i in ids if i != IMG_ID]
    prompt = format_conversation(TWO_ROUNDS, eos_token=eos).replace("<image>", "")
    assert tok.decode(text_ids, skip_special_tokens=False) == (tok.bos_token if lm_type == "llama" else "") + prompt


def _tinyllava_encode(prompt, tokenizer):
    """TinyLLaVA Factory's Template.tokenizer_image_token + make_labels ("phi" separator), for comparison."""

    def tokenizer_image_token(text):
        chunks = [tokenizer(c).input_ids for c in text.split("<image>")]
        out, offset = [], 0
        if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
            offset = 1
            out.append(chunks[0][0])
        seps = [x for pair in zip(chunks, [[-200] * (offset + 1)] * len(chunks)) for x in pair][:-1]
        for x in seps:
            out.extend(x[offset:])
        return out

    ids = tokenizer_image_token(prompt)
    labels = list(ids)
    sep, eos = " ASSISTANT: ", "<|endoftext|>"
    eos_len = len(tokenizer.encode(eos))
    cur = 0
    for rou in prompt.split(eos):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer_image_token(rou)) + eos_len
        instruction_len = len(tokenizer_image_token(parts[0])) - 1
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * (len(labels) - cur)
    total_len = sum(i != tokenizer.pad_token_id for i in ids)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        total_len += prompt.count(eos)
    assert cur == total_len  # TinyLLaVA's "tokenization mismatch" check
    return ids, labels


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_matches_tinyllava_factory_phi(processors, conv):
    """Collapsing our image block to one -200 gives TinyLLaVA's ids and labels exactly (phi tokenizer)."""
    tok = processors["phi"].tokenizer
    turns = CONVERSATIONS[conv]
    ids, labels = tokenize_conversation(turns, tok, IMG_ID, N_IMG)
    start = ids.index(IMG_ID)
    ids = ids[:start] + [-200] + ids[start + N_IMG :]
    labels = labels[:start] + [IGNORE_INDEX] + labels[start + N_IMG :]
    ref_ids, ref_labels = _tinyllava_encode(format_conversation(turns), tok)
    assert ids == ref_ids
    assert labels == ref_labels


def test_max_length(processors):
    tok = processors["phi"].tokenizer
    ids, labels = tokenize_conversation(TWO_ROUNDS, tok, IMG_ID, N_IMG)
    end = max(i for i, t in enumerate(ids) if t == IMG_ID) + 1
    cut_ids, cut_labels = tokenize_conversation(TWO_ROUNDS, tok, IMG_ID, N_IMG, max_length=end + 3)
    assert cut_ids == ids[: end + 3] and cut_labels == labels[: end + 3]
    assert tokenize_conversation(TWO_ROUNDS, tok, IMG_ID, N_IMG, max_length=len(ids)) == (ids, labels)
    with pytest.raises(ValueError, match=rf"max_length={end - 1}.*{len(ids)} tokens.*end at position {end}"):
        tokenize_conversation(TWO_ROUNDS, tok, IMG_ID, N_IMG, max_length=end - 1)
    with pytest.raises(ValueError, match="cut into the image tokens"):
        tokenize_conversation(TWO_ROUNDS, tok, IMG_ID, N_IMG, max_length=5)
