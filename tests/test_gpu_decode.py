"""`generate(fast_decode=True)` on the GPU: trained models' greedy tokens equal `generate()`'s over 128 tokens, and the
benchmark's capacity probe (`StaticDecoder.position_at`) times a step as `generate()` does end to end. Marked `gpu`.

The trained-model test needs trained checkpoints (nothing here can download one): it reads a `matvlm study` work
folder from MATVLM_TRAINED_STUDY (teacher-matvlm/, variants/*/distilled/, data/test.json) and is skipped without it;
examples/decode_eval_gpu.sh trains one and runs it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from matvlm_hf.chat_template import format_conversation
from matvlm_hf.modeling_matvlm import MaTVLMForConditionalGeneration
from matvlm_hf.processing_matvlm import MaTVLMProcessor

pytestmark = pytest.mark.gpu
STUDY = os.environ.get("MATVLM_TRAINED_STUDY")


def study_checkpoints() -> list[Path]:
    work = Path(STUDY or ".")
    return [work / "teacher-matvlm", *sorted(work.glob("variants/*/distilled"))]


@pytest.mark.skipif(not STUDY, reason="set MATVLM_TRAINED_STUDY to a `matvlm study` work folder (trained models)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("compile", [False, True])
def test_fast_decode_greedy_equals_generate_on_trained_models(dtype, compile):
    work = Path(STUDY)
    checkpoints = study_checkpoints()
    assert len(checkpoints) >= 2, f"{work} holds no distilled variant"
    processor = MaTVLMProcessor.from_pretrained(work / "teacher-matvlm")
    records = json.loads((work / "data" / "test.json").read_text())[:8]
    prompts = [format_conversation(r["conversations"][:1], add_generation_prompt=True) for r in records]
    images = [work / "data" / "images" / r["image"] for r in records]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt").to("cuda")
    for path in checkpoints:
        model = MaTVLMForConditionalGeneration.from_pretrained(path, dtype=dtype).cuda().eval()
        kw = dict(**inputs, max_new_tokens=128, do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            expected = model.generate(**kw)
            fast = model.generate(**kw, fast_decode=True, fast_decode_compile=compile)
        assert fast.shape == expected.shape
        same = (fast == expected).all(1)
        assert same.all(), f"{path.name} ({dtype}): rows {(~same).nonzero().flatten().tolist()} differ"


def test_positioned_decoder_times_a_step_as_generate_does():
    """The capacity probe's step (cache positioned at the context without a prefill) costs what a step after a real
    prefill costs through `generate()`: within 3 %, hybrid-50 at TinyLLaVA-3.1B sizes, batch 4, 4K context."""
    from matvlm_hf.synthetic.benchmark import build_model, decoder_at_context, release, time_decode

    model = build_model(0.5, "full", "cuda", torch.bfloat16)
    batch, context, steps = 4, 4096, 128
    ends = []
    for _ in range(3):  # best of three each way: the host is shared
        ends.append(time_decode(model, batch, context, steps, "cuda")["ms_per_step"])
    release(model)
    decoder = decoder_at_context(model, batch, context, steps + 8)
    decoder.decode(8)  # graph capture
    probes = []
    for _ in range(3):
        decoder.position_at(context)
        torch.cuda.synchronize()
        start = time.perf_counter()
        decoder.decode(steps)
        torch.cuda.synchronize()
        probes.append((time.perf_counter() - start) / steps * 1e3)
    end_to_end, probe = min(ends), min(probes)
    assert abs(probe - end_to_end) / end_to_end < 0.03, f"probe {probe:.3f} ms vs generate {end_to_end:.3f} ms"


@pytest.mark.parametrize("mamba_layers", [(0, 2, 5), ()])
def test_compiled_fast_decode_equals_generate_on_a_tiny_model(mamba_layers, monkeypatch):
    """`fast_decode_compile=True`: torch.compile of the fused step with its Triton kernels inside (GEMV, block end,
    attention step, the Mamba step; dependent launch off while compiling) gives generate()'s greedy tokens over 40
    steps: tiny float32 model, two left-padded prompts with images."""
    from conftest import image_prompt, tiny_model

    from matvlm_hf import mamba2_ops

    # the prefill's scan by the reference: mamba_ssm's kernel would autotune for ~100 s, and the prefill is not
    # what this test checks (both paths share it)
    monkeypatch.setattr(mamba2_ops, "_chunk_scan_kernel", None)
    model = tiny_model("phi", mamba_layers).cuda()
    prompts = [image_prompt(model.config, text_len=n, seed=n)[0] for n in (5, 12)]
    width = max(len(p) for p in prompts)
    ids, mask = torch.zeros(2, width, dtype=torch.long), torch.zeros(2, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), pixel_values=pixels.cuda(), max_new_tokens=40)
    kw.update(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        compiled = model.generate(**kw, fast_decode=True, fast_decode_compile=True)
        decoder = model.fast_decoders.decoder
        assert decoder is not None and decoder.step != decoder._step  # the compiled step ran (eager: equal)
        assert torch.equal(compiled, model.generate(**kw))
