"""`matvlm bench`: decode speed, prefill time, peak memory and largest batch, teacher vs hybrids, one run.

Teacher and hybrids (12.5 / 25 / 50 % Mamba) are built at the TinyLLaVA-Phi-2-SigLIP-3.1B sizes with random weights
(speed and memory do not depend on the values) and measured on the same decode path: the static hybrid cache with
one CUDA graph per step (`generate(fast_decode=True)`). The teacher is also measured on transformers' eager
`generate` (dynamic cache), for reference. The paper does not say how its speed-up was timed: MaTVLM ships no speed
script, and MambaInLlama's (which it builds on) times the hybrid with CUDA graphs against the teacher on HF `generate`
with flash-attention-2, in float16.

Decode points: the cache is filled to the context length without computing it (one short real prefill initialises
every state, then the attention layers' fill pointer and mask jump to the context length): a decode step's cost does
not depend on the cached values, and large batches at 16K need no hour of prefill. Prefill is timed separately.

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
from transformers import PhiConfig, SiglipVisionConfig, StoppingCriteria, StoppingCriteriaList

from ..configuration_matvlm import MaTVLMConfig, mamba_layer_indices
from ..convert.fabricate import FULL_PHI, FULL_VISION, TINY_LM, TINY_VISION
from ..fast_generation import PREFILL_CHUNK, SamplingParams, StaticDecoder
from ..modeling_matvlm import MaTVLMForConditionalGeneration

# --- knobs -------------------------------------------------------------------------------------------------------
MODELS = {"teacher": 0.0, "hybrid-12.5": 0.125, "hybrid-25": 0.25, "hybrid-50": 0.5}
SIZES = {  # contexts, batches, prefill lengths, memory totals, decode steps timed, eager contexts
    "full": dict(
        contexts=[256, 1024, 4096, 8192, 16384],
        batches=[1, 16, 64],
        prefill=[1024, 4096, 8192, 16384, 32768],
        memory=[1024, 4096, 8192, 16384, 32768],
        steps=64,
        eager=[(1, 1024), (16, 1024), (1, 8192)],
        compiled=[(1, 1024), (16, 8192)],
        static=[(1, 1024), (16, 1024)],
        max_batch_context=16384,
        max_batch_cap=512,
        hbm_bytes_per_s=3.35e12,
    ),
    "tiny": dict(
        contexts=[32, 128],
        batches=[1, 4],
        prefill=[32, 128],
        memory=[64, 256],
        steps=8,
        eager=[(1, 32)],
        compiled=[],
        static=[(1, 32)],
        max_batch_context=128,
        max_batch_cap=8,
        hbm_bytes_per_s=None,
    ),
}


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


def roofline_ms(model, batch: int, context: int, hbm: float) -> float:
    """Bytes one decode step must read once (LM weights, KV at `context`, Mamba states) / HBM bandwidth."""
    cfg = model.config
    tc = cfg.text_config
    n_attn = tc.num_hidden_layers - len(cfg.mamba_layers)
    kv = n_attn * 2 * tc.hidden_size * model.dtype.itemsize * context * batch
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


def decoder_at_context(model, batch: int, context: int, steps: int, compile: bool = False) -> StaticDecoder:
    """A static decoder whose cache holds `context` tokens (values not computed; see the module docstring)."""
    decoder = StaticDecoder(model, batch, context + steps + 16, SamplingParams(), compile=compile)
    ids = torch.randint(0, 1000, (batch, 16), device=model.device)
    decoder.prefill(ids, torch.ones_like(ids), None)
    for layer in decoder.cache.layers:
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length.fill_(context)
    decoder.mask[..., :context] = 0.0
    decoder.positions.fill_(context)
    return decoder


def time_decode(model, batch: int, context: int, steps: int, device: str, compile: bool = False) -> dict:
    decoder = decoder_at_context(model, batch, context, steps + 8, compile)
    decoder.decode(8)  # captures the graph (CUDA) and warms up
    sync(device)
    start = time.perf_counter()
    decoder.decode(steps)
    sync(device)
    ms = (time.perf_counter() - start) / steps * 1e3
    return {"ms_per_step": ms, "tokens_per_s": batch * 1e3 / ms}


class StepTimer(StoppingCriteria):
    """Stamps the time at the end of every generate() step (never stops generation)."""

    def __init__(self, device: str):
        self.device, self.stamps = device, []

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


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
        timer = StepTimer(device)
        model.generate(**kw, stopping_criteria=StoppingCriteriaList([timer]))
    ms = statistics.median(b - a for a, b in zip(timer.stamps[:-1], timer.stamps[1:])) * 1e3
    return {"ms_per_step": ms, "tokens_per_s": batch * 1e3 / ms}


def time_prefill(model, length: int, device: str) -> float:
    """One unchunked prefill of `length` tokens at batch 1 (after a warm-up of the same length: Triton autotuning)."""
    decoder = StaticDecoder(model, 1, length + 1, SamplingParams())
    ids = torch.randint(0, 1000, (1, length), device=model.device)
    decoder.prefill(ids, torch.ones_like(ids), None)
    sync(device)
    start = time.perf_counter()
    decoder.prefill(ids, torch.ones_like(ids), None)
    sync(device)
    return (time.perf_counter() - start) * 1e3


def peak_memory(model, total: int, device: str) -> float | None:
    """Peak GPU memory (GiB) of prefilling total-128 tokens (in chunks, as generate(fast_decode=True) does) and
    decoding 128 at batch 1."""
    if device != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats()
    decoder = StaticDecoder(model, 1, total, SamplingParams())
    ids = torch.randint(0, 1000, (1, total - 128), device=model.device)
    decoder.prefill(ids, torch.ones_like(ids), None, PREFILL_CHUNK)
    decoder.decode(127)
    sync(device)
    return torch.cuda.max_memory_allocated() / 2**30


def largest_batch(model, context: int, steps: int, device: str, cap: int) -> dict:
    """Doubling then bisection on the batch (up to `cap`) that fits a `context`-token cache, and its throughput."""

    def fits(batch: int) -> dict | None:
        release(model)
        try:
            return time_decode(model, batch, context, steps, device)
        except torch.OutOfMemoryError:
            return None
        finally:
            release(model)

    lo, hi, best = 0, 1, None
    while hi <= cap and (r := fits(hi)) is not None:
        lo, best, hi = hi, r, hi * 2
    if hi > cap:
        return {"batch": lo, "capped": True, **best}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (r := fits(mid)) is not None:
            lo, best = mid, r
        else:
            hi = mid
    return {"batch": lo, **(best or {})}


def release(model) -> None:
    model.__dict__.pop("_static_decoders", None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except torch.OutOfMemoryError:
        return "OOM"


PARTS = ("decode", "eager", "static", "compiled", "prefill", "memory", "max_batch")


def run(
    size: str,
    out: Path,
    device: str,
    models: dict[str, float],
    append: bool = False,
    parts: tuple[str, ...] = PARTS,
    **knob_overrides: list[int],
) -> dict:
    """Every point of `parts` for each of `models` (name -> Mamba ratio) at `size` (SIZES) on `device`; results in
    `out`/benchmark.json (written after each model: partial results survive a timeout) and the plots. `append`: add
    the models to an earlier run of `out` (ValueError unless it ran on the same device and size). Returns the
    results (per model: ms per step and tokens/s per "batchxcontext", prefill ms, peak GiB, largest batch)."""
    knobs = {**SIZES[size], **knob_overrides}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    results = {
        "size": size,
        "device": device_name,
        "torch": torch.__version__,
        "dtype": str(dtype),
        "knobs": knobs,
        "models": _earlier_models(out, size, device_name) if append else {},
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, ratio in models.items():
        model = build_model(ratio, size, device, dtype)
        r = results["models"].setdefault(name, {})
        r.update({"ratio": ratio, "mamba_layers": model.config.mamba_layers, "lm_weight_bytes": lm_bytes(model)})
        for field in ("decode", "eager", "static", "compiled", "prefill_ms", "peak_gib"):
            r.setdefault(field, {})
        for kind, batch, n in tqdm(_jobs(name, knobs, parts), desc=name, unit="point"):
            release(model)
            _measure(model, r, kind, batch, n, knobs, device)
        release(model)
        if "max_batch" in parts:
            r["largest_batch"] = largest_batch(
                model, knobs["max_batch_context"], knobs["steps"] // 2, device, knobs["max_batch_cap"]
            )
        del model
        release_all()
        (out / "benchmark.json").write_text(json.dumps(results, indent=2))  # partial results survive a timeout
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


def _jobs(name: str, knobs: dict, parts: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(kind, batch, tokens) of every point measured for model `name`: the eager, compiled and static-cache
    references only for the teacher and hybrid-50."""
    jobs = [("decode", b, c) for b in knobs["batches"] for c in knobs["contexts"]]
    jobs += [("prefill", 1, n) for n in knobs["prefill"]] + [("memory", 1, n) for n in knobs["memory"]]
    if name in ("teacher", "hybrid-50"):
        jobs += [("eager", b, c) for b, c in knobs["eager"]] + [("compiled", b, c) for b, c in knobs["compiled"]]
        jobs += [("static", b, c) for b, c in knobs["static"]]
    return [job for job in jobs if job[0] in parts]


def _measure(model, r: dict, kind: str, batch: int, n: int, knobs: dict, device: str) -> None:
    """One point into the model's results `r` ("OOM" where it runs out of memory); the decode points (fast_decode,
    compiled, transformers' static cache) with their roofline when knobs["hbm_bytes_per_s"] is set."""
    key, steps = f"{batch}x{n}", knobs["steps"]
    if kind == "prefill":
        r["prefill_ms"][str(n)] = guarded(time_prefill, model, n, device)
    elif kind == "memory":
        r["peak_gib"][str(n)] = guarded(peak_memory, model, n, device)
    elif kind == "eager":
        r["eager"][key] = guarded(time_generate, model, batch, n, min(steps, 32), device)
    else:
        if kind == "static":  # transformers' own static-cache path (auto-compiled on CUDA), beside fast_decode
            point = guarded(time_generate, model, batch, n, steps, device, cache_implementation="static")
        else:
            point = guarded(time_decode, model, batch, n, steps, device, kind == "compiled")
        if isinstance(point, dict) and knobs["hbm_bytes_per_s"]:
            point["roofline_ms"] = roofline_ms(model, batch, n, knobs["hbm_bytes_per_s"])
        r[kind][key] = point


def release_all() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _decode_points(runs: dict, batch: int) -> list[tuple[int, float]]:
    """(context, tokens/s) of the measured (not OOM) points of `runs` ("batchxcontext" -> point) at `batch`."""
    return sorted(
        (int(k.split("x")[1]), v["tokens_per_s"])
        for k, v in runs.items()
        if k.startswith(f"{batch}x") and isinstance(v, dict)
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
