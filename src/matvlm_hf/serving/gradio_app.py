"""The `matvlm serve` page (Gradio, the optional extra `[demo]`): upload an image, ask, read the answer as it streams.

One chat per served model: the hybrid alone, or the teacher and the hybrid side by side (each answering every
question in its own conversation, one after the other, so that their tokens/s are measured alone). Sampling
controls (temperature 0 = greedy, top-p, max new tokens) and a Clear button. Each browser session has its own state
(`gr.State`); the queue runs one request at a time, so a model never serves two at once. Whatever a user sends that
cannot be answered (no image, an undecodable upload, an empty question, a prompt too long, a model error) becomes a
message in the chat.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls from a machine that serves a model
import gradio as gr  # noqa: E402

from .chat import ChatModel, InputError, Session, Settings, assistant_message, read_image, user_message  # noqa: E402

log = logging.getLogger(__name__)
WARNING = "⚠️ "
# system fonts only: the default theme would fetch its fonts from the internet
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "Consolas", "monospace"]
)


def _speed_line(name: str, progress) -> str:
    if progress is None:
        return f"**{name}**"
    if not progress.done:
        return f"**{name}**: generating… {progress.tokens} tokens"
    speed = f"{progress.tokens_per_s:.1f} tokens/s" if progress.tokens_per_s else "- tokens/s"
    first = f", first token after {progress.first_token_s:.2f} s" if progress.first_token_s is not None else ""
    return f"**{name}**: {progress.tokens} tokens, {speed}{first}"


def build_app(models: dict[str, ChatModel], *, max_new_tokens: int = 128, title: str = "MaTVLM chat") -> gr.Blocks:
    """The page for `models` (key -> ChatModel, shown left to right and answering in that order)."""
    keys = list(models)
    context = min(m.context for m in models.values())

    def respond(
        message: dict | None, session: Session | None, temperature: float, top_p: float, max_new: float, *chats: list
    ) -> Iterator[tuple]:
        yield from _respond(models, message, session, (temperature, top_p, max_new), chats)

    def clear() -> tuple:
        return (
            gr.MultimodalTextbox(value=None, interactive=True),
            None,
            *([] for _ in keys),
            *(_speed_line(models[k].name, None) for k in keys),
        )

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\n" + "\n".join(f"- **{m.name}**: {m.describe()}" for m in models.values()))
        session = gr.State(None)
        chats, speeds = _chat_columns(models)
        box = gr.MultimodalTextbox(
            file_types=["image"],
            file_count="single",
            elem_id="ask",
            show_label=False,
            placeholder="Upload an image (paperclip) and ask about it; Enter sends",
            max_plain_text_length=100_000,
        )
        with gr.Row():
            temperature, top_p, max_new = _sampling_sliders(context, max_new_tokens)
            clear_button = gr.Button("Clear", elem_id="clear", scale=0)
        event = box.submit(
            respond,
            [box, session, temperature, top_p, max_new, *chats],
            [box, session, *chats, *speeds],
            concurrency_limit=1,
            concurrency_id="models",
        )
        for trigger in (clear_button.click, *(chat.clear for chat in chats)):  # a chat's own bin clears all
            trigger(clear, None, [box, session, *chats, *speeds], queue=False, cancels=[event])
    return app


def _chat_columns(models: dict[str, ChatModel]) -> tuple[list, list]:
    """One column per model, left to right: its chat and, below, its speed line; (chats, speed lines)."""
    chats, speeds = [], []
    with gr.Row():
        for k, model in models.items():
            with gr.Column():
                chats.append(
                    gr.Chatbot(
                        label=model.name,
                        elem_id=f"chat-{k}",
                        height=420,
                        render_markdown=False,
                        buttons=["copy"],
                        feedback_options=None,
                    )
                )
                speeds.append(gr.Markdown(_speed_line(model.name, None), elem_id=f"speed-{k}"))
    return chats, speeds


def _sampling_sliders(context: int, max_new_tokens: int) -> tuple:
    """Temperature (0 = greedy), top-p and max new tokens (at most half the shortest model's `context`)."""
    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)", elem_id="temperature")
    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p", elem_id="top-p")
    max_new = gr.Slider(
        1,
        max(1, min(2048, context // 2)),
        value=min(max_new_tokens, context // 2),
        step=1,
        label="max new tokens",
        elem_id="max-new-tokens",
    )
    return temperature, top_p, max_new


class _Turn:
    """The page during one turn: the session, each model's chat and speed line (left to right), the question."""

    def __init__(self, models: dict[str, ChatModel], session: Session | None, chats: tuple, question: str) -> None:
        self.models, self.keys, self.question = models, list(models), question
        self.session = session or Session()
        self.chats = [list(c or []) for c in chats]
        self.speeds = [_speed_line(models[k].name, None) for k in self.keys]
        self.busy = gr.MultimodalTextbox(value=None, interactive=False)

    def out(self, box=None) -> tuple:
        """The page's outputs: (textbox, session, *chats, *speed lines); the textbox locked unless `box` is given."""
        return (self.busy if box is None else box, self.session, *self.chats, *self.speeds)


def _respond(
    models: dict[str, ChatModel], message: dict | None, session: Session | None, sampling: tuple, chats: tuple
) -> Iterator[tuple]:
    """One turn: the user's message shown in every chat, then each model's answer streamed in turn; a request that
    cannot be answered becomes a message in the chats. `sampling`: (temperature, top-p, max new tokens) as the
    sliders give them. Yields the page's outputs (`_Turn.out`) at every change."""
    question = ((message or {}).get("text") or "").strip()
    files = list((message or {}).get("files") or [])
    turn = _Turn(models, session, chats, question)
    done = gr.MultimodalTextbox(value=None, interactive=True)
    try:
        image, settings = _accept(turn, files, sampling)
        inputs = {
            k: models[k].prepare(Session(image, turn.session.conversations), k, question, settings) for k in turn.keys
        }
    except InputError as e:
        for chat in turn.chats:
            chat.append({"role": "assistant", "content": WARNING + str(e)})
        yield turn.out(done)
        return
    turn.session.image = image
    yield turn.out()
    for i, k in enumerate(turn.keys):
        yield from _stream_answer(turn, i, inputs[k], settings)
    yield turn.out(done)


def _accept(turn: _Turn, files: list[str], sampling: tuple) -> tuple[Any, Settings]:
    """Show the user's message (and upload) in every chat, whatever becomes of it; then (the image the turn is about:
    the upload, else the session's; the sampling settings). InputError for an unusable upload, bad settings, no
    question or no image."""
    image, upload_error = None, None
    try:
        image = _read_upload(turn.session, files)
    except InputError as e:
        upload_error = e
    for chat in turn.chats:
        if files:
            shown = gr.Image(files[0]) if image is not None else f"(uploaded {os.path.basename(files[0])})"
            chat.append({"role": "user", "content": shown})
        chat.append({"role": "user", "content": turn.question or "(no question)"})
    image = image if image is not None else turn.session.image
    if upload_error is not None:
        raise upload_error
    temperature, top_p, max_new = sampling
    settings = Settings(float(temperature), float(top_p), int(max_new))
    settings.check()
    if not turn.question:
        raise InputError("Type a question about the image (an image alone is not a question).")
    if image is None:
        raise InputError(
            "Upload an image with your first question: the model answers questions about "
            "one image (use the paperclip button in the box below)."
        )
    return image, settings


def _stream_answer(turn: _Turn, i: int, inputs: Any, settings: Settings) -> Iterator[tuple]:
    """Model `i`'s answer streamed into its chat and speed line; on success the exchange joins its conversation, a
    failure is reported in its chat (and logged) and the page lives on."""
    key, chat = turn.keys[i], turn.chats[i]
    model = turn.models[key]
    chat.append({"role": "assistant", "content": ""})
    answer = None
    try:
        for answer in model.stream(inputs, settings):
            chat[-1]["content"] = answer.text
            turn.speeds[i] = _speed_line(model.name, answer)
            yield turn.out()
    except Exception as e:  # noqa: BLE001 - a model error is reported in the chat, the page lives on
        log.exception("generation failed on %s", model.name)
        chat[-1]["content"] = f"{WARNING}{model.name} failed: {type(e).__name__}: {e}"
        yield turn.out()
        return
    history = turn.session.conversations.setdefault(key, [])
    history += [user_message(turn.question, with_image=not history), assistant_message(answer.text.strip())]


def _read_upload(session: Session, files: list[str]) -> Any:
    """The uploaded image, or None without an upload; InputError for a second image or an unreadable file."""
    if not files:
        return None
    if len(files) > 1:
        raise InputError("Upload one image per conversation.")
    image = read_image(files[0])
    if any(session.conversations.values()):
        raise InputError("This conversation already has its image: press Clear to start a new one with another.")
    return image


def launch(models: dict[str, ChatModel], host: str = "127.0.0.1", port: int = 7860, max_new_tokens: int = 128) -> None:
    """Serve the page on http://host:port until interrupted; one request at a time."""
    app = build_app(models, max_new_tokens=max_new_tokens)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=host,
        server_port=port,
        share=False,
        show_error=True,
        max_file_size="50mb",
        theme=THEME,
        footer_links=["gradio"],
    )
