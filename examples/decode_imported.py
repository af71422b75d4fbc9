"""GPU check of `matvlm import` at full size: an authors'-layout MaTVLM checkpoint (TinyLLaVA-Phi-2-SigLIP-3.1B,
25 %, the shape of hustvl/MaTVLM_0_25_Mamba2, random weights written by streaming) is imported and decodes through
`generate(fast_decode=True)`; its tokens/s beside a `matvlm convert --preset paper` hybrid (and the default
preset's with --with-default).

    python examples/decode_imported.py --workdir /tmp/imported --out results/   # GPU, ~6 GB of disk per checkpoint

Prints and writes decode_imported.json: per model, batch-1 greedy tok/s (image + 64-token prompt, 256 new tokens,
EOS off, after one warm-up call that captures the CUDA graphs) and whether fast_decode's first 32 tokens equal
plain generate()'s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from matvlm_hf.convert.authors_checkpoint import import_authors_checkpoint
from matvlm_hf.convert.conversion import convert_tinyllava_to_matvlm
from matvlm_hf.convert.fabricate import write_tinyllava_checkpoint
from matvlm_hf.convert.fabricate_authors import write_authors_checkpoint
from matvlm_hf.convert.paper_preset import paper_mamba_layers

PROMPT_TOKENS, NEW_TOKENS, CHECK_TOKENS = 64, 256, 32


def measure(path: Path, dtype: torch.dtype) -> dict:
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).cuda().eval()
    config = model.config
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 50000, (PROMPT_TOKENS,), generator=g)
    ids = torch.cat([text[:8], torch.full((config.num_image_tokens,), config.image_token_id), text[8:]])[None].cuda()
    pixels = torch.randn(1, 3, 384, 384, generator=g).cuda()
    kwargs = dict(input_ids=ids, pixel_values=pixels, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(**kwargs, max_new_tokens=CHECK_TOKENS)
        model.generate(**kwargs, max_new_tokens=NEW_TOKENS, fast_decode=True)  # warm-up: graph capture
        torch.cuda.synchronize()
        start = time.perf_counter()
        fast = model.generate(**kwargs, max_new_tokens=NEW_TOKENS, fast_decode=True)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    new = fast.shape[1] - ids.shape[1]
    result = {
        "mamba_layers": config.mamba_layers,
        "in_out_bias": [config.mamba_proj_bias, config.mamba_out_proj_bias],
        "new_tokens": new,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(new / seconds, 1),
        "fast_equals_generate_first_32": bool(torch.equal(fast[:, : ids.shape[1] + CHECK_TOKENS], plain)),
    }
    del model
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="scratch folder for the three checkpoints")
    parser.add_argument("--out", type=Path, default=None, help="folder for decode_imported.json")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16"],
        default="bfloat16",
        help="the authors evaluate in float16; the project's benchmarks use bfloat16",
    )
    parser.add_argument(
        "--with-default", action="store_true", help="also the default preset's conversion (a fourth checkpoint)"
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    w = args.workdir
    layers = paper_mamba_layers(32, 0.25)
    t0 = time.perf_counter()
    authors = write_authors_checkpoint(w / "authors-25", ssm_layers=layers, size="full", dtype=dtype)
    imported = import_authors_checkpoint(authors, w / "imported-25", overwrite=True, progress=False)
    teacher = write_tinyllava_checkpoint(w / "tinyllava", size="full", dtype=dtype)
    paper = convert_tinyllava_to_matvlm(
        teacher, w / "paper-25", mamba_ratio=0.25, preset="paper", overwrite=True, progress=False
    )
    models = [("imported (authors' layout)", imported), ("convert --preset paper", paper)]
    if args.with_default:
        default = convert_tinyllava_to_matvlm(
            teacher, w / "matvlm-25", mamba_ratio=0.25, overwrite=True, progress=False
        )
        models.append(("convert (default preset)", default))
    print(f"checkpoints written in {time.perf_counter() - t0:.0f} s")
    results = {
        "device": torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "batch": 1,
        "prompt": f"1 image + {PROMPT_TOKENS} text tokens",
        "models": {},
    }
    for name, path in models:
        results["models"][name] = measure(path, dtype)
        print(name, results["models"][name])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "decode_imported.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
