"""`matvlm serve` driven from a real headless browser: Debian's chromium + chromedriver through selenium.

The command is started as a user starts it (`python -m matvlm_hf.cli serve`, teacher and hybrid side by side) on
127.0.0.1 with tiny fabricated-and-converted checkpoints. The page is used as a person would: upload through the
box's file input, type, press Enter, read the chats. Checked: each model's streamed answer (seen growing in the DOM)
equals greedy `generate()` on a freshly loaded copy, in the first and the second turn; the bad inputs become chat
messages and the page keeps working; two browser sessions asking at the same time each get their own answer and see
only their own history; Clear forgets the image.

Needs gradio + selenium (`pip install -e ".[demo-test]"`) and `apt-get install chromium chromium-driver`; skipped with
the reason where they are missing, except with MATVLM_REQUIRE_BROWSER=1 (set by .ci/run), where that is a failure.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from matvlm_hf.conversion import convert_tinyllava_to_matvlm
from matvlm_hf.fabricate import write_tinyllava_checkpoint
from matvlm_hf.synthetic_vqa import render_scene, sample_scene

MAX_NEW_TOKENS = 40
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]
SERVER_START_S = 600  # imports + two model loads; generous for a loaded 2-core machine
ANSWER_S = 240


def _missing() -> list[str]:
    missing = [
        f"python package {m} (pip install -e '.[demo-test]')"
        for m in ("gradio", "selenium")
        if importlib.util.find_spec(m) is None
    ]
    missing += [
        f"{exe} (apt-get install chromium chromium-driver)"
        for exe in ("chromium", "chromedriver")
        if shutil.which(exe) is None
    ]
    return missing


@pytest.fixture(scope="module")
def needs_browser():
    missing = _missing()
    if missing and os.environ.get("MATVLM_REQUIRE_BROWSER") == "1":
        pytest.fail("MATVLM_REQUIRE_BROWSER=1 but missing: " + "; ".join(missing))
    if missing:
        pytest.skip("needs a headless browser: missing " + "; ".join(missing))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, needs_browser):
    work = tmp_path_factory.mktemp("serve-browser")
    write_tinyllava_checkpoint(work / "tinyllava", seed=0)
    return {
        "teacher": convert_tinyllava_to_matvlm(work / "tinyllava", work / "teacher", mamba_ratio=0.0),
        "hybrid": convert_tinyllava_to_matvlm(work / "tinyllava", work / "hybrid", mamba_ratio=0.5),
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        render_scene(sample_scene(random.Random(seed)), 32).save(folder / f"{name}.png")
        paths[name] = folder / f"{name}.png"
    paths["broken"] = folder / "broken.png"
    paths["broken"].write_bytes(b"\x89PNG\r\n\x1a\n but then nothing of a picture")
    return paths


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("server") / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "matvlm_hf.cli",
        "serve",
        "--model",
        str(checkpoints["hybrid"]),
        "--teacher",
        str(checkpoints["teacher"]),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"matvlm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"matvlm serve did not answer on {url} in {SERVER_START_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def open_page(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers = []

    def open_() -> "Page":
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / f'profile-{len(drivers)}'}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
        drivers.append(driver)
        driver.get(server)
        return Page(driver)

    yield open_
    for driver in drivers:
        driver.quit()


def words(text: str) -> str:
    """Whitespace-normalised text (the browser's rendering collapses runs of spaces and line breaks)."""
    return " ".join(text.split())


class Page:
    """The served page in one browser: one session."""

    def __init__(self, driver):
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        # a condition may read an element the page has just re-rendered: poll again instead of failing
        self.wait = lambda seconds=ANSWER_S: WebDriverWait(
            driver, seconds, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
        )
        self.wait(120).until(lambda d: d.find_elements("css selector", "#ask textarea"))

    def texts(self, key: str, role: str) -> list[str]:
        return [e.text for e in self.driver.find_elements("css selector", f"#chat-{key} [data-testid={role}]")]

    def speed(self, key: str) -> str:
        return self.driver.find_element("css selector", f"#speed-{key}").text

    def record(self, key: str) -> None:
        """From now on, remember every text the next reply of chat `key` shows (to see it stream)."""
        self.driver.execute_script(
            """
            const chat = document.querySelector('#chat-' + arguments[0]), n = arguments[1];
            window.seen = [];
            new MutationObserver(() => {
                const bots = chat.querySelectorAll('[data-testid=bot]');
                if (bots.length > n) window.seen.push(bots[n].innerText);
            }).observe(chat, {subtree: true, childList: true, characterData: true});""",
            key,
            len(self.texts(key, "bot")),
        )

    def seen(self) -> list[str]:
        return self.driver.execute_script("return window.seen")

    def send(self, text: str, upload: Path | None = None) -> None:
        """Type (or, when long, paste) `text` in the box, attach `upload`, press Enter."""
        from selenium.webdriver.common.keys import Keys

        box = self.driver.find_element("css selector", "#ask textarea")
        self.wait(30).until(lambda d: box.is_enabled())
        if upload is not None:
            self.driver.find_element("css selector", "#ask input[type=file]").send_keys(str(upload))
            self.wait(60).until(
                lambda d: d.find_elements("css selector", f"#ask .thumbnails img[src*='{upload.name}']")
            )  # uploaded: served back
        if len(text) > 200:
            self.driver.execute_script(
                "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}))",
                box,
                text,
            )
        else:
            box.send_keys(text)
        box.send_keys(Keys.ENTER)

    def ask(self, text: str, upload: Path | None = None) -> list[str]:
        """Send and wait for the replies (answers or warnings) of both chats; returns them (teacher, hybrid)."""
        before = len(self.texts("hybrid", "bot"))
        self.send(text, upload)
        return self.replies(before)

    def replies(self, before: int) -> list[str]:
        """Wait until the hybrid's chat (the one that answers last) has more than `before` replies and the request
        is over (box enabled again, no "generating"); the newest reply of each chat."""

        def finished(d) -> bool:
            return (
                len(self.texts("hybrid", "bot")) > before
                and "generating" not in self.speed("hybrid")
                and d.find_element("css selector", "#ask textarea").is_enabled()
            )

        self.wait().until(finished)
        return [self.texts(k, "bot")[-1] for k in ("teacher", "hybrid")]


def reference_answer(path: Path, image_path: Path, turns: list[tuple[str, str | None]]) -> str:
    """generate() (greedy) on a freshly loaded copy, for the conversation `turns` [(question, answer), ...]."""
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    messages = []
    for i, (question, answer) in enumerate(turns):
        messages.append(
            {"role": "user", "content": ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": question}]}
        )
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[processor.preprocess_images([str(image_path)])[0]], text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_chat_page_in_a_headless_browser(open_page, checkpoints, images):
    alice = open_page()
    bob = open_page()

    # bad input: a chat message each time, and the page goes on working
    assert all("Upload an image with your first question" in r for r in alice.ask("What colour is the square?"))
    assert all(
        "Could not read 'broken.png' as an image" in r for r in alice.ask("What colour?", upload=images["broken"])
    )
    assert all("Type a question" in r for r in alice.ask("   ", upload=images["a"]))
    assert alice.texts("hybrid", "user")[-1] == "(no question)"

    # two sessions ask at the same time (one queue: they are answered one after the other)
    alice.record("hybrid")
    alice_before, bob_before = len(alice.texts("hybrid", "bot")), len(bob.texts("hybrid", "bot"))
    alice.send("What is in the image?", upload=images["a"])
    bob.send("How many shapes are there?", upload=images["b"])
    alice_first, bob_first = alice.replies(alice_before), bob.replies(bob_before)
    for i, key in enumerate(("teacher", "hybrid")):
        expected = reference_answer(checkpoints[key], images["a"], [("What is in the image?", None)])
        assert words(alice_first[i]) == words(expected) != ""
        assert words(bob_first[i]) == words(
            reference_answer(checkpoints[key], images["b"], [("How many shapes are there?", None)])
        )
        assert "tokens/s" in alice.speed(key)
    streamed = [words(t) for t in alice.seen() if t.strip()]
    assert len(set(streamed)) > 1, f"the hybrid's answer appeared in one piece: {streamed}"
    assert all(words(alice_first[1]).startswith(t) for t in streamed)
    # each session sees only its own conversation
    assert "How many shapes are there?" not in alice.driver.page_source
    assert "What is in the image?" not in bob.driver.page_source and "What colour" not in bob.driver.page_source

    # second turn: the answer continues this session's conversation (the TinyLLaVA template, image in turn 1)
    second = alice.ask("And what colour is it?")
    for i, key in enumerate(("teacher", "hybrid")):
        first = words(alice_first[i])
        expected = reference_answer(
            checkpoints[key], images["a"], [("What is in the image?", first), ("And what colour is it?", None)]
        )
        assert words(second[i]) == words(expected)

    # one image per conversation
    assert all("already has its image" in r for r in alice.ask("And this one?", upload=images["b"]))

    # a prompt longer than the model's context: a message, then Clear forgets the conversation and its image
    assert all("too long" in r for r in alice.ask("word " * 2100))
    alice.driver.find_element("css selector", "#clear").click()
    alice.wait(30).until(lambda d: not alice.texts("hybrid", "bot") and not alice.texts("teacher", "user"))
    assert all("Upload an image with your first question" in r for r in alice.ask("And now?"))
    assert len(bob.texts("hybrid", "bot")) == 1  # bob's session untouched
