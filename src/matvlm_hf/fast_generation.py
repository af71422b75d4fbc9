"""Fast decoding: a preallocated hybrid cache and one CUDA graph per decode step.

Reached from plain `model.generate(..., fast_decode=True)` (or `model.generation_config.fast_decode = True`).
The cache is transformers' `StaticCache` built from the config's layer types: key/value tensors of `max_length` for
attention layers, fixed-size conv and SSM states for Mamba layers, all updated in place, so one decode step (embed,
decoder, LM head, token choice, mask and position update) is captured once as a CUDA graph per (batch size, cache
length bucket) and replayed. The teacher (no Mamba layers) takes the very same path. On a CPU the same static-cache
step runs without a graph, which is how the CPU tests check it against `generate()`.

Supports greedy and sampling (temperature, top-k, top-p), EOS stopping, left-padded batches and images. Beam search
and other generate() features go through the regular path.

Public interface: `fast_generate` (what `generate(fast_decode=True)` calls); `DecoderPool`, the model's owned
`model.fast_decoders` (at most one decoder at a time, `clear()` frees its cache); `StaticDecoder` with `prefill`,
`decode` and `position_at` (benchmarks: move a prefilled decoder to a context length without computing it);
`prefill_chunk_length` (how a prompt is cut: a token budget summed over the batch, like serving engines' max batched
tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import StaticCache

from .decode_matmul import decode_linear
from .fused_decode_step import fused_step_for
from .mamba2_mixer import CACHE_ARG

BUCKET = 256  # cache lengths are rounded up to a multiple of this, so nearby lengths reuse one graph


def bucket_length(length: int) -> int:
    """`length` (tokens) rounded up to a multiple of BUCKET: the cache length a decoder for it allocates."""
    return -(-length // BUCKET) * BUCKET


# Prompt tokens per prefill chunk, summed over the batch (serving engines' "max batched tokens"). At TinyLLaVA-3.1B
# sizes one token's prefill activations are ~0.1 MB (the MLP's 10240-wide bf16 intermediates, the attention mask's row
# over the cache): 8192 tokens ~ 1 GiB, below the KV cache of any batch x context worth chunking (batch 16 x 8K =
# 43 GiB), where a per-sequence chunk of 4096 had put 65K tokens in one chunk and run out of memory.
PREFILL_TOKEN_BUDGET = 8192


def prefill_chunk_length(
    batch_size: int, token_budget: int = PREFILL_TOKEN_BUDGET, per_sequence: int | None = None
) -> int:
    """Tokens of each sequence per prefill chunk: `per_sequence` when given (generation config `prefill_chunk_size`),
    else `token_budget` split over the batch, rounded down to a multiple of 64 when at least 64 (never below 1)."""
    if per_sequence:
        return int(per_sequence)
    length = max(1, token_budget // batch_size)
    return length - length % 64 if length >= 64 else length


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    suppress_ids: tuple[int, ...] = ()  # token ids never chosen (the image token id)


def choose_tokens(logits: torch.Tensor, params: SamplingParams, suppress: torch.Tensor | None = None) -> torch.Tensor:
    """(b, vocab) float logits -> (b,) next tokens; graph-safe (no host synchronisation). suppress: (k,) token ids on
    the logits' device never chosen (`params.suppress_ids`, made once by the caller: no copy inside a graph)."""
    if suppress is not None:
        logits = logits.index_fill(-1, suppress, float("-inf"))
    if not params.do_sample:
        return logits.argmax(-1)
    logits = logits / max(params.temperature, 1e-5)
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]


class StaticDecoder:
    """A static hybrid cache plus the buffers and (on CUDA) the CUDA graph of one decode step."""

    def __init__(self, model, batch_size: int, max_length: int, params: SamplingParams, compile: bool = False):
        self.model, self.batch_size, self.params = model, batch_size, params
        self.max_length = bucket_length(max_length)
        device, dtype = model.device, model.dtype
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_length)
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # the token fed to the next step
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.mask = torch.full((batch_size, 1, 1, self.max_length), torch.finfo(dtype).min, dtype=dtype, device=device)
        self.suppress = (
            torch.tensor(params.suppress_ids, dtype=torch.long, device=device) if params.suppress_ids else None
        )
        self.graph: torch.cuda.CUDAGraph | None = None
        self.use_graph = device.type == "cuda"
        # the LM family's fused step (fused projections, fused_decode_step.py), else transformers' modules
        self.fused = fused_step_for(model, self.cache)
        # optional: inductor fuses the step's small kernels; the fused step is still captured in our own graph
        self.step = torch.compile(self._step, dynamic=False) if compile else self._step

    def _attention_layer(self):
        return next(layer for layer in self.cache.layers if hasattr(layer, "cumulative_length"))

    def _step(self) -> None:
        """One decode step on the static buffers: write the mask slot, run the LM, choose, advance."""
        slot = self._attention_layer().cumulative_length.view(1)
        self.mask.index_fill_(-1, slot, 0.0)
        lm = self.model.model.language_model
        embeds = lm.get_input_embeddings()(self.tokens)
        if self.fused is not None:
            hidden = self.fused(embeds, self.positions, self.mask)
        else:
            lm_mask, _ = self.model.model.language_model_masks(
                {"full_attention": self.mask, "linear_attention": None}, None, None, None
            )
            out = lm(
                inputs_embeds=embeds,
                attention_mask=lm_mask,
                position_ids=self.positions,
                use_cache=True,
                **{CACHE_ARG: self.cache},
            )
            hidden = out.last_hidden_state
        head = self.model.lm_head
        last = hidden[:, -1]
        logits = decode_linear(last, head.weight, head.bias) if type(head) is nn.Linear else head(last)
        self.tokens.copy_(choose_tokens(logits.float(), self.params, self.suppress)[:, None])
        self.positions.add_(1)

    def position_at(self, context: int) -> None:
        """Moves a prefilled decoder to `context` cached tokens without computing them: the attention layers' fill
        pointer, the mask and the positions jump there (the Mamba states keep the prefill's values). For benchmarks:
        a decode step's cost does not depend on the cached values, so large batches at long contexts need no
        prefill; `tests/test_gpu_kernels.py` checks the step time so measured against `generate()` end to end.
        ValueError when `context` leaves no room for a step."""
        if not 0 < context < self.max_length:
            raise ValueError(f"context {context} must lie in (0, {self.max_length}) for this decoder")
        for layer in self.cache.layers:
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length.fill_(context)
        self.mask[..., :context] = 0.0
        self.positions.fill_(context)

    def prefill(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Runs the prompt (b, length) into the static cache, `chunk_size` tokens of each sequence at a time (bounding
        activation memory; the Mamba states carry across chunks; unset = `prefill_chunk_length(b)`); returns the first
        generated tokens (b,)."""
        self.cache.reset()
        self.mask.fill_(torch.finfo(self.mask.dtype).min)
        length = input_ids.shape[1]
        self.mask[:, 0, 0, :length].masked_fill_(attention_mask.bool(), 0.0)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        chunk_size = chunk_size or prefill_chunk_length(input_ids.shape[0])
        with torch.no_grad():
            embeds = self.model.embed_inputs(input_ids, pixel_values)  # images scattered before chunking
            for start in range(0, length, chunk_size):
                end = min(start + chunk_size, length)
                out = self.model(
                    inputs_embeds=embeds[:, start:end],
                    attention_mask=attention_mask[:, :end],
                    position_ids=positions[:, start:end],
                    cache=self.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        first = choose_tokens(out.logits[:, -1].float(), self.params, self.suppress)
        self.tokens.copy_(first[:, None])
        self.positions.copy_(positions[:, -1:] + 1)
        return first

    @torch.no_grad()
    def decode(self, steps: int) -> torch.Tensor:
        """`steps` decode steps; returns the chosen tokens (b, steps). Captures the graph on first use."""
        out = torch.empty(self.batch_size, steps, dtype=torch.long, device=self.tokens.device)
        done = 0
        if self.use_graph and self.graph is None and steps > 3:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up (Triton autotuning, compilation, allocator) on real steps
                for _ in range(2):
                    self.step()
                    out[:, done] = self.tokens[:, 0]
                    done += 1
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.step()
        for i in range(done, steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
            out[:, i] = self.tokens[:, 0]
        return out


class DecoderPool:
    """The fast-decoding state a model owns (`model.fast_decoders`): at most one `StaticDecoder` at a time, since one
    holds a full-length KV cache. A request of another (batch size, cache-length bucket, sampling, compile) replaces
    it; `clear()` frees its memory (benchmarks call it between points; users when they need the memory back)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.decoder: StaticDecoder | None = None

    def get(self, model, batch_size: int, total_length: int, params: SamplingParams, compile: bool) -> StaticDecoder:
        """The decoder for `batch_size` sequences of up to `total_length` tokens (prompt + new), built on first use."""
        key = (batch_size, bucket_length(total_length), params, compile)
        if key != self.key:
            self.clear()  # free the old cache before allocating the new one
            self.decoder, self.key = StaticDecoder(model, batch_size, total_length, params, compile=compile), key
        return self.decoder

    def clear(self) -> None:
        self.key, self.decoder = None, None


def fast_generate(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    params: SamplingParams,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    prefill_chunk_size: int | None = None,
    prefill_token_budget: int = PREFILL_TOKEN_BUDGET,
    compile: bool = False,
) -> torch.LongTensor:
    """Prompt + up to max_new_tokens new tokens (b, prompt + new), like `generate()`; after EOS, pad_token_id.
    The prompt is prefilled in chunks of `prefill_chunk_length(b, prefill_token_budget, prefill_chunk_size)` tokens
    per sequence. The decoder is kept in `model.fast_decoders` for the next call of the same shape."""
    b, prompt_length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    total = prompt_length + max_new_tokens
    decoder = model.fast_decoders.get(model, b, total, params, compile)
    eos = (
        None
        if eos_token_id is None
        else torch.tensor(
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=input_ids.device
        )
    )
    chunk = prefill_chunk_length(b, prefill_token_budget, prefill_chunk_size)
    chunks = [decoder.prefill(input_ids, attention_mask, pixel_values, chunk)[:, None]]
    remaining = max_new_tokens - 1
    while remaining > 0:  # chunks of steps between checks, so finished batches stop early without a sync per step
        chunks.append(decoder.decode(min(remaining, 64)))
        remaining -= chunks[-1].shape[1]
        if eos is not None and bool(torch.isin(torch.cat(chunks, 1), eos).any(1).all()):
            break
    new = torch.cat(chunks, dim=1)
    if eos is not None:
        finished = torch.isin(new, eos).cumsum(1) - torch.isin(new, eos).long() > 0  # strictly after the first EOS
        new = new.masked_fill(finished, pad_token_id if pad_token_id is not None else eos[0].item())
        last = int((~finished).sum(1).max())  # trim columns where every sequence had finished
        new = new[:, :last]
    return torch.cat([input_ids, new], dim=1)
