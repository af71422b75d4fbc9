"""TinyLLaVA's "phi" conversation template and its tokenisation, with image placeholders.

This file is saved beside model weights as remote code: it imports only the standard library (and is
imported by `processing_matvlm.py` through a relative import).

Template (TinyLLaVA Factory, `PhiTemplate`):

    "{SYSTEM_PROMPT} USER: <image>\\n{q1} ASSISTANT: {a1}<|endoftext|>USER: {q2} ASSISTANT: {a2}<|endoftext|>"

- the question of a turn that holds `<image>` loses every `<image>` and is stripped, then becomes
  "<image>\\n{question}" (so the placeholder always leads the question, whatever its position was);
- a conversation that ends on a question (or on an answer whose value is None) ends with "ASSISTANT:"
  when a generation prompt is asked for: that is the inference prompt;
- only the answers and their end-of-text token are supervised (labels -100 elsewhere).

Tokenisation follows TinyLLaVA's `tokenizer_image_token`: the text is split on "<image>", each chunk is
tokenised on its own (a BOS, if the tokenizer adds one, is kept only on the first chunk) and the image
tokens go between the chunks. Unlike TinyLLaVA (one id -200 that the model later replaces by 728
features) the placeholder becomes `num_image_tokens` copies of a real `image_token_id`, so positions
equal TinyLLaVA's splice exactly.
"""

from __future__ import annotations

from typing import Any, Sequence

IMAGE_PLACEHOLDER = "<image>"
EOS_TOKEN = "<|endoftext|>"
IGNORE_INDEX = -100
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER_PREFIX = "USER: "
ASSISTANT_PREFIX = "ASSISTANT: "
GENERATION_PROMPT = "ASSISTANT:"

# Jinja version of `format_conversation` for `processor.apply_chat_template` with HF-style messages:
# [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}, {"role": "assistant", ...}]
# `content` may also be a plain string (holding "<image>" or not). Several text parts join with "\n".
# An optional leading "system" message replaces the default system prompt.
CHAT_TEMPLATE = (
    "{%- set eos = eos_token if eos_token is defined and eos_token else '<|endoftext|>' -%}"
    '{%- set ns = namespace(system="' + SYSTEM_PROMPT + '", start=0) -%}'
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
    "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('\\n') -%}{%- endif -%}"
    "{%- set ns.start = 1 -%}"
    "{%- endif -%}"
    "{{- ns.system + ' ' -}}"
    "{%- for message in messages[ns.start:] -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}"
    "{%- set has_image = '<image>' in text -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('\\n') -%}"
    "{%- set has_image = (message['content'] | selectattr('type', 'equalto', 'image') | list | length > 0)"
    " or '<image>' in text -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if has_image -%}{%- set text = ('<image>\\n' + (text | replace('<image>', '') | trim)) | trim -%}"
    "{%- endif -%}"
    "{{- 'USER: ' + text + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' + text + eos -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def format_question(question: str) -> str:
    """TinyLLaVA: a question holding `<image>` loses all placeholders, is stripped and gets one in front."""
    if IMAGE_PLACEHOLDER in question:
        return (IMAGE_PLACEHOLDER + "\n" + question.replace(IMAGE_PLACEHOLDER, "").strip()).strip()
    return question


def _render(
    turns: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
    system_prompt: str = SYSTEM_PROMPT,
    eos_token: str = EOS_TOKEN,
) -> tuple[str, list[tuple[int, int]]]:
    """Render LLaVA-format turns; also return the character spans that are supervised (answer + eos)."""
    turns = list(turns)
    if turns and turns[0].get("from") == "system":
        system_prompt = turns[0]["value"]
        turns = turns[1:]
    if turns and turns[0].get("from") != "human":  # TinyLLaVA drops a leading non-question turn
        turns = turns[1:]
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise ValueError(
                f"turn {i} is from {turn.get('from')!r}, expected {expected!r}: turns must alternate human/gpt"
            )
    text = system_prompt + " "
    spans: list[tuple[int, int]] = []
    for i, turn in enumerate(turns):
        value = turn.get("value")
        if turn["from"] == "human":
            if not isinstance(value, str):
                raise ValueError(f"turn {i}: the question must be a string, got {type(value).__name__}")
            text += USER_PREFIX + format_question(value) + " "
        elif value is None:  # TinyLLaVA's inference prompt: an answer of None renders as "ASSISTANT:"
            if i != len(turns) - 1:
                raise ValueError(f"turn {i}: only the last answer may be None")
            text += GENERATION_PROMPT
            return text, spans
        else:
            if not isinstance(value, str):
                raise ValueError(f"turn {i}: the answer must be a string, got {type(value).__name__}")
            # the supervised span starts at the space of "ASSISTANT: ": TinyLLaVA's labels start at the token
            # holding it (usually the answer's first token, " The"; a lone " " token when the tokenizer has
            # no merge for it, which TinyLLaVA then supervises too)
            text += ASSISTANT_PREFIX
            start = len(text) - 1
            text += value + eos_token
            spans.append((start, len(text)))
    if add_generation_prompt:
        if turns and turns[-1]["from"] != "human":
            raise ValueError("add_generation_prompt=True needs a conversation that ends with a question")
        text += GENERATION_PROMPT
    return text, spans


def format_conversation(
    turns: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
    system_prompt: str = SYSTEM_PROMPT,
    eos_token: str = EOS_TOKEN,
) -> str:
    """Prompt text of LLaVA-format turns `[{"from": "human"|"gpt", "value": str}, ...]` (TinyLLaVA "phi").

    A final gpt turn with value None, or `add_generation_prompt=True` after a final question, ends the text
    with "ASSISTANT:" (the inference prompt). A leading {"from": "system"} turn replaces `system_prompt`.
    """
    return _render(
        turns, add_generation_prompt=add_generation_prompt, system_prompt=system_prompt, eos_token=eos_token
    )[0]


def _chunk_ids_and_offsets(tokenizer, chunk: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer: character offsets are needed "
            "to place the labels; load it with AutoTokenizer (tokenizer.json)"
        )
    enc = tokenizer(chunk, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode_with_image_placeholders(
    text: str,
    tokenizer,
    image_token_id: int,
    num_image_tokens: int,
    *,
    add_special_tokens: bool = True,
    placeholder: str = IMAGE_PLACEHOLDER,
) -> tuple[list[int], list[tuple[int, int] | None]]:
    """Token ids of `text` with each placeholder expanded to `num_image_tokens` x `image_token_id`.

    Returns (ids, offsets): offsets are character spans into `text` for text tokens (a special token the
    tokenizer adds has an empty span) and None for image tokens. Chunks between placeholders are tokenised
    separately, as TinyLLaVA's `tokenizer_image_token` does; a BOS is kept only on the first chunk.
    """
    chunks = text.split(placeholder)
    bos = getattr(tokenizer, "bos_token_id", None)
    ids: list[int] = []
    offsets: list[tuple[int, int] | None] = []
    pos = 0
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.extend([image_token_id] * num_image_tokens)
            offsets.extend([None] * num_image_tokens)
            pos += len(placeholder)
        chunk_ids, chunk_offsets = _chunk_ids_and_offsets(tokenizer, chunk, add_special_tokens)
        if i > 0 and add_special_tokens and bos is not None and chunk_ids and chunk_ids[0] == bos:
            chunk_ids, chunk_offsets = chunk_ids[1:], chunk_offsets[1:]
        ids.extend(chunk_ids)
        offsets.extend((pos + s, pos + e) for s, e in chunk_offsets)
        pos += len(chunk)
    return ids, offsets


def image_block_end(ids: Sequence[int], image_token_id: int) -> int:
    """Index one past the last image token (0 when there is none)."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == image_token_id:
            return i + 1
    return 0


def check_truncation(ids: Sequence[int], image_token_id: int, max_length: int) -> None:
    """Raise if cutting `ids` to `max_length` would cut into (or before the end of) the image tokens."""
    end = image_block_end(ids, image_token_id)
    if len(ids) > max_length and end > max_length:
        raise ValueError(
            f"max_length={max_length} would cut into the image tokens: the sequence has {len(ids)} tokens and "
            f"its image tokens end at position {end}; raise max_length to at least {end} (better more, for the "
            "answer) or shorten the text before the image"
        )


def tokenize_conversation(
    turns: Sequence[dict[str, Any]],
    tokenizer,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int | None = None,
    *,
    system_prompt: str = SYSTEM_PROMPT,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a LLaVA-format conversation for training.

    Labels are -100 everywhere except on the tokens of each gpt answer and its end-of-text token: a token
    is supervised when its characters overlap the answer or the space before it (the leading-space token
    "ĠThe" of the answer "The ..."), which reproduces TinyLLaVA Factory's `make_labels` exactly. Image
    tokens are never supervised. `max_length` cuts the end of the sequence but never
    into the image tokens (ValueError then).
    """
    eos_token = getattr(tokenizer, "eos_token", None) or EOS_TOKEN
    text, spans = _render(turns, system_prompt=system_prompt, eos_token=eos_token)
    ids, offsets = encode_with_image_placeholders(text, tokenizer, image_token_id, num_image_tokens)
    labels = []
    for tok, off in zip(ids, offsets):
        supervised = off is not None and off[1] > off[0] and any(off[0] < e and off[1] > s for s, e in spans)
        labels.append(tok if supervised else IGNORE_INDEX)
    if max_length is not None and len(ids) > max_length:
        check_truncation(ids, image_token_id, max_length)
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels
