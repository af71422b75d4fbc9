"""The hybrid language model on vLLM's layers: the teacher's decoder layers (Phi, Llama, Qwen2) with the attention
module of `config.mamba_layers` replaced by the MaTVLM Mamba-2 mixer, as in the transformers model.

Llama and Qwen2 layers are vLLM's `LlamaDecoderLayer` (Qwen2's differs only in its q/k/v bias, set here). vLLM 0.32
has no native Phi model any more (it serves Phi through its Transformers backend), so the Phi-2 layer is written here
from vLLM's parallel linear layers, rotary embedding and `Attention`: one LayerNorm feeding attention and MLP in
parallel, partial rotary (rope_parameters["partial_rotary_factor"]), biases on q/k/v/dense/fc1/fc2, gelu_new.
Module names follow the checkpoint (`language_model.model.layers.N.self_attn...`, `final_layernorm` for Phi).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer
from vllm.model_executor.models.utils import make_layers, maybe_prefix

from ...configuration_matvlm import MaTVLMConfig
from .mixer import MaTVLMMambaMixer


class PhiAttention(nn.Module):
    """Phi-2 attention: fused q/k/v with biases, partial rotary, `dense` output projection."""

    def __init__(self, config, cache_config, quant_config, prefix: str):
        super().__init__()
        heads = config.num_attention_heads
        self.head_dim = config.hidden_size // heads
        tp = get_tensor_model_parallel_world_size()
        if heads % tp:
            raise ValueError(f"tensor_parallel_size {tp} must divide the attention heads ({heads}).")
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, heads, bias=True, quant_config=quant_config, prefix=f"{prefix}.qkv_proj"
        )
        self.dense = RowParallelLinear(
            config.hidden_size, config.hidden_size, bias=True, quant_config=quant_config, prefix=f"{prefix}.dense"
        )
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            rope_parameters=config.rope_parameters,
            is_neox_style=True,
        )
        self.attn = Attention(
            heads // tp,
            self.head_dim,
            self.head_dim**-0.5,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.chunk(chunks=3, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.dense(self.attn(q, k, v))
        return out


class PhiMLP(nn.Module):
    def __init__(self, config, quant_config, prefix: str):
        super().__init__()
        self.fc1 = ColumnParallelLinear(
            config.hidden_size, config.intermediate_size, quant_config=quant_config, prefix=f"{prefix}.fc1"
        )
        self.fc2 = RowParallelLinear(
            config.intermediate_size, config.hidden_size, quant_config=quant_config, prefix=f"{prefix}.fc2"
        )
        self.act = get_act_fn(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, _ = self.fc1(hidden_states)
        hidden_states, _ = self.fc2(self.act(hidden_states))
        return hidden_states


class PhiDecoderLayer(nn.Module):
    """out = attention(LN(h)) + MLP(LN(h)) + h; `self_attn` is attention or a Mamba mixer."""

    def __init__(self, config, self_attn: nn.Module, quant_config, prefix: str):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = self_attn
        self.mlp = PhiMLP(config, quant_config, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        normed = self.input_layernorm(hidden_states)
        out = self.self_attn(positions=positions, hidden_states=normed) + self.mlp(normed) + hidden_states
        return out, None


def _layer_factory(config: MaTVLMConfig, vllm_config: VllmConfig) -> Callable[[str], nn.Module]:
    """prefix ("...layers.N") -> decoder layer N of the hybrid."""
    tc = config.text_config
    cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
    mamba = set(config.mamba_layers)

    def mixer(prefix: str) -> MaTVLMMambaMixer:
        return MaTVLMMambaMixer(config, vllm_config.model_config, cache_config, quant_config, prefix)

    def build(prefix: str) -> nn.Module:
        index = int(prefix.rsplit(".", 1)[1])
        attn_prefix = f"{prefix}.self_attn"
        if tc.model_type == "phi":
            self_attn = (
                mixer(attn_prefix) if index in mamba else PhiAttention(tc, cache_config, quant_config, attn_prefix)
            )
            return PhiDecoderLayer(tc, self_attn, quant_config, prefix)

        def attention(**kwargs) -> nn.Module:
            if index in mamba:
                return mixer(kwargs["prefix"])
            if tc.model_type == "qwen2":  # Qwen2: q/k/v biases, no o_proj bias
                kwargs.update(bias=True, bias_o_proj=False)
            return LlamaAttention(**kwargs)

        return LlamaDecoderLayer(vllm_config, prefix, config=tc, attn_layer_type=attention)

    return build


class MaTVLMTextModel(nn.Module):
    """Embedding, decoder layers, final norm (the checkpoint's `language_model.model`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: MaTVLMConfig = vllm_config.model_config.hf_config
        tc = config.text_config
        self.is_phi = tc.model_type == "phi"
        self.embed_tokens = VocabParallelEmbedding(
            tc.vocab_size, tc.hidden_size, quant_config=vllm_config.quant_config, prefix=f"{prefix}.embed_tokens"
        )
        _, _, self.layers = make_layers(
            tc.num_hidden_layers, _layer_factory(config, vllm_config), prefix=f"{prefix}.layers"
        )
        if self.is_phi:
            self.final_layernorm = nn.LayerNorm(tc.hidden_size, eps=tc.layer_norm_eps)
        else:
            self.norm = RMSNorm(tc.hidden_size, eps=tc.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        if self.is_phi:
            return self.final_layernorm(hidden_states)
        return self.norm(hidden_states, residual)[0]


class MaTVLMLanguageModel(nn.Module):
    """`language_model`: the text model plus the LM head (with bias for Phi-2)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        tc = vllm_config.model_config.hf_config.text_config
        self.model = MaTVLMTextModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            tc.vocab_size,
            tc.hidden_size,
            bias=tc.model_type == "phi",
            quant_config=vllm_config.quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )
        if tc.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(tc.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)
