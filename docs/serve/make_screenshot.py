"""Makes docs/serve/screenshot.png: `matvlm serve` with a teacher and its hybrid, one question answered, in headless
chromium (Debian's chromium + chromedriver, selenium; `pip install -e ".[demo-test]"`).

    python docs/serve/make_screenshot.py --model matvlm-quickstart/hybrid-distilled \\
        --teacher matvlm-quickstart/teacher-matvlm --out docs/serve/screenshot.png
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from matvlm_hf.synthetic_vqa import make_question, render_scene, sample_scene

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,960"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--out", default="docs/serve/screenshot.png")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    rng = random.Random(args.seed)
    scene = sample_scene(rng)
    question, truth = make_question(scene, "color", rng) or make_question(scene, "count", rng)
    # the scene as the models see it (32 px), enlarged without new detail so that the page shows it
    render_scene(scene, 32).resize((192, 192), Image.NEAREST).save(work / "scene.png")
    print(f"question: {question!r} (true answer: {truth!r})")
    server = subprocess.Popen([sys.executable, "-m", "matvlm_hf.cli", "serve", "--model", args.model,
                               "--teacher", args.teacher, "--port", str(args.port), "--max-new-tokens", "16"])
    try:
        url = f"http://127.0.0.1:{args.port}/"
        for _ in range(600):
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                time.sleep(1)
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium")
        for flag in FLAGS + [f"--user-data-dir={work / 'profile'}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
        wait = WebDriverWait(driver, 300, poll_frequency=0.2)
        driver.get(url)
        box = wait.until(lambda d: d.find_element("css selector", "#ask textarea"))
        driver.find_element("css selector", "#ask input[type=file]").send_keys(str(work / "scene.png"))
        wait.until(lambda d: d.find_elements("css selector", "#ask .thumbnails img[src*='scene.png']"))
        box.send_keys(question + Keys.ENTER)
        wait.until(lambda d: "tokens/s" in d.find_element("css selector", "#speed-hybrid").text
                   and box.is_enabled())
        time.sleep(1)
        driver.save_screenshot(args.out)
        for key in ("teacher", "hybrid"):
            answer = driver.find_elements("css selector", f"#chat-{key} [data-testid=bot]")[-1].text
            print(f"{key}: {answer!r}  ({driver.find_element('css selector', f'#speed-{key}').text})")
        driver.quit()
    finally:
        server.terminate()
        server.wait(30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
