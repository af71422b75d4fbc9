"""`matvlm bench`: decode speed, prefill time, peak memory and largest batch, teacher vs hybrids, one run.

Teacher and hybrids (12.5 / 25 / 50 % Mamba) are built at the TinyLLaVA-Phi-2-SigLIP-3.1B sizes with random weights
(speed and memory do not depend on the values) and measured on the same path, the public `generate(fast_decode=True)`
(the static hybrid cache, one CUDA graph per step), end to end: a real prefill of the context, then the decode. A
decode step's time is the difference of two generations of the same prompt, 1 and 1 + `steps` new tokens, over
`steps`; the first call of a shape (graph capture, compilation) is timed apart. Every decode point carries its % of
the memory-bandwidth roofline (the bytes one step must read / the GPU's HBM bandwidth). Beside it, transformers' own
static-cache generate (auto-compiled) and its eager generate, for reference. A point that does not fit is reported
with the arithmetic (cache + weights vs the GPU's memory).

The paper does not say how its speed-up was timed: MaTVLM ships no speed script, and MambaInLlama's (which it builds
on) times the hybrid with CUDA graphs against the teacher on HF `generate` with flash-attention-2, in float16.

    python examples/benchmark_generation.py --out docs/benchmarks      # GPU, full size (about 8 minutes on an H100)
    matvlm bench --size tiny --out /tmp/bench                           # CPU smoke mode (the test suite runs it)
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PhiConfig, SiglipVisionConfig, StoppingCriteriaList

from ..configuration_matvlm import MaTVLMConfig, mamba_layer_indices
from ..convert.fabricate import FULL_PHI, FULL_VISION, TINY_LM, TINY_VISION
from ..fast_generation import SamplingParams, StaticDecoder
from ..modeling_matvlm import MaTVLMForConditionalGeneration
from ..training.measure import StepTimer, largest_fitting

# --- knobs -------------------------------------------------------------------------------------------------------
MODELS = {"teacher": 0.0, "hybrid-12.5": 0.125, "hybrid-25": 0.25, "hybrid-50": 0.5}
SIZES = {  # contexts, batches, prefill lengths, memory totals, decode steps timed, eager contexts
    "full": dict(
        contexts=[1024, 4096, 8192, 16384],
        batches=[1, 16],
        prefill=[4096, 16384, 32768],
        memory=[16384, 32768],
        steps=128,
        eager=[(1, 1024)],
        compiled=[(1, 1024), (16, 8192)],
        static=[(1, 1024), (16, 1024)],
        max_batch_context=16384,
        max_batch_cap=512,
    ),
    "tiny": dict(
        contexts=[32, 128],
        batches=[1, 4],
        prefill=[32, 128],
        memory=[64, 256],
        steps=32,  # enough decode time to stand out of the prefill's noise on a busy CPU
        eager=[(1, 32)],
        compiled=[],
        static=[(1, 32)],
        max_batch_context=128,
        max_batch_cap=8,
    ),
}
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # spec bandwidth by GPU name (SXM parts)


def hbm_bytes_per_s(device: str) -> float | None:
    """The spec HBM bandwidth (bytes/s) of the current CUDA GPU when `HBM_BYTES_PER_S` knows it, else None."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in HBM_BYTES_PER_S.items() if key in name), None)


def build_model(ratio: float, size: str, device: str, dtype: torch.dtype) -> MaTVLMForConditionalGeneration:
    """TinyLLaVA-3.1B-sized (or tiny) MaTVLM with random weights, built directly on `device`."""
    lm, vision = (FULL_PHI, FULL_VISION) if size == "full" else (TINY_LM, TINY_VISION)
    text = PhiConfig(**lm, partial_rotary_factor=0.4, max_position_embeddings=65536)
    config = MaTVLMConfig(
        text_config=text,
        vision_config=SiglipVisionConfig(**vision),
        mamba_layers=mamba_layer_indices(text.num_hidden_layers, ratio),
    )
    with torch.device(device):
        model = MaTVLMForConditionalGeneration(config)
    return model.to(dtype).eval()


def lm_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in [*model.language_model.parameters(), *model.lm_head.parameters()])


def kv_cache_bytes(model, batch: int, context: int) -> int:
    """Bytes of the attention layers' keys and values for `batch` sequences of `context` tokens."""
    cfg, tc = model.config, model.config.text_config
    n_attn = tc.num_hidden_layers - len(cfg.mamba_layers)
    return n_attn * 2 * tc.hidden_size * model.dtype.itemsize * context * batch


def roofline_ms(model, batch: int, context: int, hbm: float) -> float:
    """Bytes one decode step must read once (LM weights, KV at `context`, Mamba states) / HBM bandwidth."""
    cfg = model.config
    kv = kv_cache_bytes(model, batch, context)
    state = (
        len(cfg.mamba_layers)
        * batch
        * (
            cfg.mamba_nheads * cfg.mamba_headdim * cfg.mamba_d_state * 4
            + (2 * cfg.mamba_d_xb + cfg.mamba_d_inner) * cfg.mamba_d_conv * 2
        )
    )
    return (lm_bytes(model) + kv + 2 * state) / hbm * 1e3


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def decoder_at_context(model, batch: int, context: int, steps: int) -> StaticDecoder:
    """A static decoder whose cache holds `context` tokens, not computed (`StaticDecoder.position_at`): capacity
    probing for `largest_batch` only; every reported time goes through `generate()`."""
    decoder = StaticDecoder(model, batch, context + steps + 16, SamplingParams())
    ids = torch.randint(0, 1000, (batch, 16), device=model.device)
    decoder.prefill(ids, torch.ones_like(ids), None)
    decoder.position_at(context)
    return decoder


def _generate_seconds(model, ids: torch.Tensor, new_tokens: int, device: str, compile: bool) -> float:
    """Wall time of one `generate(fast_decode=True)` call, greedy, EOS off (exactly `new_tokens` new tokens).
    Raises RuntimeError when the call returned another number of tokens (its time would not be a step count's)."""
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            fast_decode=True,
            fast_decode_compile=compile,
        )
    sync(device)
    seconds = time.perf_counter() - start
    if out.shape[-1] - ids.shape[-1] != new_tokens:
        raise RuntimeError(
            f"generate(fast_decode=True) returned {out.shape[-1] - ids.shape[-1]} new tokens where {new_tokens} were "
            "asked for: the benchmark's step time would be wrong"
        )
    return seconds


def time_decode(model, batch: int, context: int, steps: int, device: str, compile: bool = False) -> dict:
    """One decode point through `generate(fast_decode=True)` end to end, `batch` prompts of `context` tokens: the
    first call (graph capture, compilation: `first_call_s`), then prefill-only and prefill + `steps` calls, best of
    three each (the difference of two calls carries the prefill's noise, seconds long at batch 16 / 8K); the step
    time is their difference / `steps`. Both lengths share one cache bucket
    when `context` is a multiple of 256 and `steps` < 255 (the same graph). Raises torch.OutOfMemoryError when it
    does not fit."""
    ids = torch.randint(0, 1000, (batch, context), device=model.device)
    first = _generate_seconds(model, ids, 1 + steps, device, compile)
    prefill = min(_generate_seconds(model, ids, 1, device, compile) for _ in range(3))
    full = min(_generate_seconds(model, ids, 1 + steps, device, compile) for _ in range(3))
    ms = (full - prefill) / steps * 1e3
    return {
        "ms_per_step": ms,
        "tokens_per_s": batch * 1e3 / ms,
        "prefill_ms": prefill * 1e3,
        "first_call_s": first,
    }


def with_roofline(point: dict | str, model, batch: int, context: int, hbm: float | None) -> dict | str:
    """Adds `roofline_ms` and `pct_of_roofline` (roofline / measured step, %) to a timed point."""
    if isinstance(point, dict) and "ms_per_step" in point and hbm:
        point["roofline_ms"] = roofline_ms(model, batch, context, hbm)
        point["pct_of_roofline"] = 100 * point["roofline_ms"] / point["ms_per_step"]
    return point


def does_not_fit(model, batch: int, total: int, device: str) -> dict:
    """Why a point ran out of memory, in numbers: its static cache + the weights vs the GPU's memory."""
    kv_gib = kv_cache_bytes(model, batch, total) / 2**30
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else None
    return {"error": "OOM", "kv_cache_gib": kv_gib, "weights_gib": weights_gib, "gpu_gib": gpu_gib}


def time_generate(model, batch: int, context: int, steps: int, device: str, **generate_kwargs) -> dict:
    """transformers' generate() end to end (a real prefill of `context` tokens, then `steps` decode steps): median
    step time after the first (prefill) step. No kwargs: the dynamic cache, eager. `cache_implementation="static"`:
    transformers' static cache, whose forward generate() compiles by itself on CUDA (the first call of a shape pays
    the compilation: it is run once untimed)."""
    ids = torch.randint(0, 1000, (batch, context), device=model.device)
    kw = dict(
        input_ids=ids,
        max_new_tokens=steps + 1,
        min_new_tokens=steps + 1,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        **generate_kwargs,
    )
    with torch.no_grad():
        if generate_kwargs:  # warm-up: compilation and CUDA-graph capture of the static-cache path
            model.generate(**kw)
        timer = StepTimer()
        model.generate(**kw, stopping_criteria=StoppingCriteriaList([timer]))
    ms = statistics.median(timer.times) * 1e3
    return {"ms_per_step": ms, "tokens_per_s": batch * 1e3 / ms}


def time_prefill(model, length: int, device: str) -> float:
    """Prefill of `length` tokens at batch 1 as `generate(fast_decode=True, max_new_tokens=1)` runs it (chunked by the
    token budget), ms, after a warm-up of the same length (Triton autotuning)."""
    ids = torch.randint(0, 1000, (1, length), device=model.device)
    _generate_seconds(model, ids, 1, device, False)
    return _generate_seconds(model, ids, 1, device, False) * 1e3


def peak_memory(model, total: int, device: str) -> float | None:
    """Peak GPU memory (GiB) of `generate(fast_decode=True)` at batch 1: a prompt of total-128 tokens, 128 new."""
    if device != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    _generate_seconds(model, torch.randint(0, 1000, (1, total - 128), device=model.device), 128, device, False)
    return torch.cuda.max_memory_allocated() / 2**30


def largest_batch(model, context: int, steps: int, device: str, cap: int) -> dict:
    """The largest batch (up to `cap`) that `generate(fast_decode=True)` serves at a `context`-token prompt, and its
    throughput there, end to end. Capacity is probed cheaply first (a cache positioned at the context, doubling then
    bisection), then confirmed end to end, one batch lower at a time while the real prefill does not fit."""

    def fits(batch: int) -> bool:
        release(model)
        try:
            decoder_at_context(model, batch, context, steps).decode(2)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            release(model)

    if not fits(1):
        return {"batch": 0, "probed": 0}
    lo, first_too_big = largest_fitting(fits, 1, cap)
    for batch in range(lo, 0, -1):
        release(model)
        try:
            return {
                "batch": batch,
                "capped": first_too_big is None,
                "probed": lo,
                **time_decode(model, batch, context, steps, device),
            }
        except torch.OutOfMemoryError:
            continue
    return {"batch": 0, "probed": lo}


def release(model) -> None:
    """Frees the model's fast-decoding cache and the allocator's unused blocks."""
    model.fast_decoders.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


PARTS = ("decode", "eager", "static", "compiled", "prefill", "memory", "max_batch")


def model_jobs(name: str, knobs: dict, parts: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """The (kind, batch, tokens) points one model is measured at; eager/static/compiled for teacher and hybrid-50."""
    jobs = [("decode", b, c) for b in knobs["batches"] for c in knobs["contexts"]]
    jobs += [("prefill", 1, n) for n in knobs["prefill"]] + [("memory", 1, n) for n in knobs["memory"]]
    if name in ("teacher", "hybrid-50"):
        jobs += [("eager", b, c) for b, c in knobs["eager"]] + [("compiled", b, c) for b, c in knobs["compiled"]]
        jobs += [("static", b, c) for b, c in knobs["static"]]
    return [job for job in jobs if job[0] in parts]


def measure_point(model, kind: str, batch: int, n: int, knobs: dict, device: str, hbm: float | None):
    """One benchmark point (see `model_jobs`): a dict of timings (with its % of roofline), a number (prefill ms, peak
    GiB) or, when it runs out of GPU memory, `does_not_fit`'s arithmetic."""
    steps = knobs["steps"]
    calls = {
        "decode": lambda: time_decode(model, batch, n, steps, device),
        "compiled": lambda: time_decode(model, batch, n, steps, device, compile=True),
        "eager": lambda: time_generate(model, batch, n, min(steps, 32), device),
        # transformers' own static-cache path (auto-compiled on CUDA), beside fast_decode
        "static": lambda: time_generate(model, batch, n, steps, device, cache_implementation="static"),
        "prefill": lambda: time_prefill(model, n, device),
        "memory": lambda: peak_memory(model, n, device),
    }
    try:
        point = calls[kind]()
        if kind in ("prefill", "memory"):
            return point
        point = with_roofline(point, model, batch, n, hbm)
        if _beyond_roofline(point):  # physically impossible: a noisy difference of two calls; measured once more
            point = with_roofline(calls[kind](), model, batch, n, hbm)
    except torch.OutOfMemoryError:
        release(model)
        return does_not_fit(model, batch, n, device)
    if _beyond_roofline(point):
        point["invalid"] = (
            f"{point['ms_per_step']:.3f} ms per step is faster than the bandwidth roofline ({point['roofline_ms']:.3f} "
            "ms) twice: the measurement is wrong (left out of the plots)"
        )
    return point


def _beyond_roofline(point: dict) -> bool:
    """Whether a timed point claims a step faster than reading its bytes at the GPU's bandwidth allows."""
    return point.get("pct_of_roofline", 0) > 100


def new_results(size: str, device: str, dtype: torch.dtype, knobs: dict, out: Path, append: bool) -> dict:
    """The results skeleton (device, versions, knobs), or the earlier run's with `append` (same device and size)."""
    results = {
        "size": size,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "hbm_bytes_per_s": hbm_bytes_per_s(device),
        "knobs": knobs,
        "models": {},
    }
    if append:  # add models to an earlier run on the same device
        results["models"] = _earlier_models(out, size, results["device"])
    return results


def run(
    size: str,
    out: Path,
    device: str,
    models: dict[str, float],
    append: bool = False,
    parts: tuple[str, ...] = PARTS,
    **knob_overrides: list[int],
) -> dict:
    """Measures every model at every point of `parts`; writes OUT/benchmark.json after each point (so a timeout keeps
    what was measured) and the plots at the end. Returns the results."""
    knobs = {**SIZES[size], **knob_overrides}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results = new_results(size, device, dtype, knobs, out, append)
    hbm = results["hbm_bytes_per_s"]
    out.mkdir(parents=True, exist_ok=True)
    fields = {"decode": "decode", "compiled": "compiled", "eager": "eager", "static": "static"}
    fields.update(prefill="prefill_ms", memory="peak_gib")
    for name, ratio in models.items():
        model = build_model(ratio, size, device, dtype)
        r = results["models"].setdefault(name, {})
        r.update({"ratio": ratio, "mamba_layers": model.config.mamba_layers, "lm_weight_bytes": lm_bytes(model)})
        for field in fields.values():
            r.setdefault(field, {})
        for kind, batch, n in tqdm(model_jobs(name, knobs, parts), desc=name, unit="point"):
            release(model)
            key = str(n) if kind in ("prefill", "memory") else f"{batch}x{n}"
            r[fields[kind]][key] = measure_point(model, kind, batch, n, knobs, device, hbm)
            (out / "benchmark.json").write_text(json.dumps(results, indent=2))  # partial results survive a timeout
        release(model)
        if "max_batch" in parts:
            point = largest_batch(model, knobs["max_batch_context"], knobs["steps"], device, knobs["max_batch_cap"])
            r["largest_batch"] = with_roofline(point, model, point["batch"], knobs["max_batch_context"], hbm)
        del model
        release_all()
        (out / "benchmark.json").write_text(json.dumps(results, indent=2))
    plot(results, out)
    return results


def _earlier_models(out: Path, size: str, device_name: str) -> dict:
    """The models of an earlier run in `out` (none without one); ValueError if it ran on another device or size."""
    if not (out / "benchmark.json").exists():
        return {}
    earlier = json.loads((out / "benchmark.json").read_text())
    if earlier["device"] != device_name or earlier["size"] != size:
        raise ValueError(f"--append: {out / 'benchmark.json'} was measured on {earlier['device']} ({earlier['size']})")
    return earlier["models"]


def release_all() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _decode_points(runs: dict, batch: int) -> list[tuple[int, float]]:
    """(context, tokens/s) of the measured (not OOM) points of `runs` ("batchxcontext" -> point) at `batch`."""
    return sorted(
        (int(k.split("x")[1]), v["tokens_per_s"])
        for k, v in runs.items()
        if k.startswith(f"{batch}x") and "tokens_per_s" in v and "invalid" not in v
    )


def plot(results: dict, out: Path) -> list[Path]:
    """Decode tokens/s vs context (one panel per batch), peak memory vs length, prefill time vs length."""
    from ..extras import require

    require("matplotlib", "matvlm bench's plots")
    import matplotlib

    matplotlib.use("Agg")
    paths = [out / "decode_throughput.png", out / "memory_prefill.png"]
    _plot_decode(results, paths[0])
    _plot_memory_prefill(results["models"], paths[1])
    return paths


def _plot_decode(results: dict, path: Path) -> None:
    """One panel per batch: decode tokens/s vs context of every model (graph; graph + compile as stars), the
    teacher on HF eager generate dashed."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models, batches, contexts = results["models"], results["knobs"]["batches"], results["knobs"]["contexts"]
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for name, r in models.items():
            pts = _decode_points(r["decode"], batch)
            if not pts:
                continue
            (line,) = ax.plot(*zip(*pts), marker="o", label=f"{name} (graph)")
            comp = _decode_points(r.get("compiled", {}), batch)
            if comp:
                ax.scatter(
                    *zip(*comp),
                    marker="*",
                    s=140,
                    color=line.get_color(),
                    edgecolor="black",
                    zorder=3,
                    label=f"{name} (graph + compile)",
                )
        eager = _decode_points(models.get("teacher", {}).get("eager", {}), batch)
        if eager:
            ax.plot(*zip(*eager), marker="x", linestyle="--", color="gray", label="teacher (HF eager)")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="context length (tokens)",
            ylabel="decode tokens/s",
            title=f"batch {batch}",
        )
        ax.set_xticks(contexts, [f"{c // 1024}K" if c >= 1024 else str(c) for c in contexts])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Decode throughput, {results['device']}, {results['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_memory_prefill(models: dict, path: Path) -> None:
    """Peak memory vs total tokens and prefill time vs prompt tokens, batch 1, every model."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in models.items():
        mem = [(int(k), v) for k, v in r["peak_gib"].items() if isinstance(v, (int, float))]
        pre = [(int(k), v) for k, v in r["prefill_ms"].items() if isinstance(v, (int, float))]
        if mem:
            ax1.plot(*zip(*sorted(mem)), marker="o", label=name)
        if pre:
            ax2.plot(*zip(*sorted(pre)), marker="o", label=name)
    ax1.set(xscale="log", xlabel="total tokens (batch 1)", ylabel="peak GPU memory (GiB)", title="Peak memory")
    ax2.set(xscale="log", yscale="log", xlabel="prompt tokens (batch 1)", ylabel="prefill time (ms)", title="Prefill")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """`matvlm bench` (`commands/bench.py`, imported when called), kept here for `python -m` and old callers."""
    from ..commands.bench import main as command

    return command(argv)


if __name__ == "__main__":
    main()
