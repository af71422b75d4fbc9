"""`matvlm demo`: the whole conversion path on an embedded default, in about a minute on a CPU.

With no checkpoint it fabricates a tiny random TinyLLaVA-Phi checkpoint in the published layout, repackages it as the
teacher (ratio 0) and converts it to a 25 % hybrid, then asks both one question about a generated image and times
their decoding. Random weights answer gibberish: the point is the path (conversion, remote code, processor,
generate). Distillation (`matvlm distill`) is what makes a hybrid answer like its teacher.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from ..convert.conversion import convert_tinyllava_to_matvlm
from ..convert.fabricate import write_tinyllava_checkpoint
from ..safe_output import claim_workdir
from .synthetic_vqa import make_question, render_scene, sample_scene


def decode_speed(model, processor, image, question: str, new_tokens: int) -> tuple[str, float]:
    """Greedy answer and decode tokens/s (prefill excluded) for one image + question."""
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)  # warm-up, and the prefill cost
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(**inputs, **kwargs)
        elapsed = time.perf_counter() - start - prefill
    answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return answer, (new_tokens - 1) / max(elapsed, 1e-9)


def run(
    workdir: str | Path = "matvlm-demo",
    *,
    teacher: str | Path | None = None,
    mamba_ratio: float = 0.25,
    new_tokens: int = 32,
    seed: int = 0,
) -> dict[str, dict]:
    """Convert `teacher` (default: a tiny random TinyLLaVA fabricated in `workdir`) to the teacher and a hybrid at
    `mamba_ratio`, ask both one question about a generated image and print the answers and decode speeds; returns
    name -> {"answer", "tokens_per_s", "mamba_layers"}. UnsafeOutputError for an unusable `workdir`."""
    work = claim_workdir(workdir, [("--teacher", teacher)])
    teacher_src = Path(teacher) if teacher else work / "tinyllava-tiny"
    if teacher is None and not (teacher_src / "config.json").exists():
        print(f"fabricating a tiny random TinyLLaVA checkpoint in {teacher_src}")
        write_tinyllava_checkpoint(teacher_src, seed=seed)
    paths = {}
    for name, ratio in (("teacher", 0.0), (f"hybrid-{mamba_ratio:g}", mamba_ratio)):
        paths[name] = convert_tinyllava_to_matvlm(teacher_src, work / name, mamba_ratio=ratio, overwrite=True)
        print(f"converted {name}: {paths[name]}")

    scene = sample_scene(random.Random(seed))
    question, truth = next(
        qa
        for kind in ("count", "color", "shape", "size")
        if (qa := make_question(scene, kind, random.Random(seed))) is not None
    )
    results = {}
    for name, path in paths.items():
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        image = render_scene(scene, model.config.vision_config.image_size)
        answer, speed = decode_speed(model, processor, image, question, new_tokens)
        results[name] = {"answer": answer, "tokens_per_s": speed, "mamba_layers": model.config.mamba_layers}
    print(f"\nQ: {question}  (true answer: {truth})")
    for name, r in results.items():
        print(
            f"{name:>14}  mamba layers {r['mamba_layers']}  decode {r['tokens_per_s']:8.1f} tok/s  A: {r['answer']!r}"
        )
    print("\nRandom weights answer gibberish; distil the hybrid from its teacher to make it answer like it.")
    return results


def main(argv: list[str] | None = None) -> dict:
    """`matvlm demo` (`commands/demo.py`, imported when called), kept here for old callers."""
    from ..commands.demo import main as command

    return command(argv)
