"""MaTVLM: SigLIP vision tower -> mlp2x_gelu connector -> a transformers causal LM in which the attention module of
the chosen decoder layers is a Mamba-2 mixer (TinyLLaVA architecture; arXiv 2503.13440).

The language model is transformers' own (PhiForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM): only the `self_attn`
of the Mamba layers is swapped, so norms, MLPs, attention backends, caches and generation are transformers'.
Self-contained (relative imports only) so it can be saved beside the weights as remote code.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

from .configuration_matvlm import MaTVLMConfig
from .fast_generation import PREFILL_CHUNK, SamplingParams, fast_generate
from .mamba2_mixer import MaTVLMMamba2Mixer


class MaTVLMPreTrainedModel(PreTrainedModel):
    config: MaTVLMConfig
    config_class = MaTVLMConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["PhiDecoderLayer", "LlamaDecoderLayer", "Qwen2DecoderLayer", "SiglipEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def initialize_weights(self) -> None:
        # The mixers sit inside the transformers LM, whose own `_init_weights` reaches only their Linear/Conv layers;
        # their SSM parameters get the Mamba-2 init here (the `init` functions skip parameters already loaded).
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, MaTVLMMamba2Mixer):
                module.init_ssm_parameters()


class MaTVLMForConditionalGeneration(MaTVLMPreTrainedModel, GenerationMixin):
    """Vision tower + connector + hybrid language model, with the LM head; `generate()` ready."""

    # generate() options the fast decode path does not implement, with their neutral values
    _FAST_DEFAULTS = {"num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
                      "no_repeat_ngram_size": 0, "min_new_tokens": 0, "penalty_alpha": None}

    def __init__(self, config: MaTVLMConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.connector = nn.Sequential(
            nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size),
            nn.GELU(),
            nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size),
        )
        self.language_model = AutoModelForCausalLM.from_config(config.attention_text_config())
        for i in config.mamba_layers:
            self.language_model.model.layers[i].self_attn = MaTVLMMamba2Mixer(config, i)
        # remote code: saving records the Auto class it was registered for; AutoModel must resolve too
        config.auto_map = {**(getattr(config, "auto_map", None) or {}), "AutoModel": f"modeling_matvlm.{type(self).__name__}"}
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.model.layers

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) -> (n, num_image_tokens, text hidden): TinyLLaVA's hidden_states[layer], first token dropped
        for the 'patch' strategy, then the connector."""
        vc = self.config.vision_config
        expected = (3, vc.image_size, vc.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (num_images, {', '.join(map(str, expected))}), got {tuple(pixel_values.shape)}."
            )
        out = self.vision_tower(pixel_values.to(self.vision_tower.dtype), output_hidden_states=True)
        features = out.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "patch":
            features = features[:, 1:]
        return self.connector(features)

    def embed_inputs(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image features scattered into the image-token positions."""
        image_mask = input_ids == self.config.image_token_id
        n_tokens = int(image_mask.sum())
        inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None:
            if n_tokens:
                raise ValueError(f"input_ids hold {n_tokens} image tokens but no pixel_values were given.")
            return inputs_embeds
        features = self.get_image_features(pixel_values)
        if features.shape[0] * features.shape[1] != n_tokens:
            raise ValueError(
                f"{features.shape[0]} image(s) give {features.shape[0] * features.shape[1]} image features "
                f"({features.shape[1]} each), but input_ids hold {n_tokens} image tokens (id {self.config.image_token_id}): "
                "the number of images must match the number of <image> placeholders."
            )
        return inputs_embeds.masked_scatter(image_mask[..., None], features.to(inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> LlavaCausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is None:
            decoding = pixel_values is None and past_key_values is not None and past_key_values.get_seq_length() > 0
            # after the prompt, a generated image-token id is just a token: only prompts must match their images
            inputs_embeds = self.get_input_embeddings()(input_ids) if decoding else self.embed_inputs(input_ids, pixel_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        # Mamba layers need the 2-D padding mask (pad positions must not touch their state)
        mamba_mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            mamba_mask=mamba_mask,
            **kwargs,
        )
        return LlavaCausalLMOutputWithPast(
            loss=out.loss,
            logits=out.logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    def generate(self, *args, fast_decode: bool | None = None, fast_decode_compile: bool | None = None, **kwargs):
        """transformers' `generate`, or with `fast_decode=True` (argument or generation config attribute) the static
        hybrid cache + one CUDA graph per decode step (greedy and sampling; see fast_generation.py). Generation config
        attribute `prefill_chunk_size` (default 4096) and `fast_decode_compile` (argument or attribute: torch.compile the
        step before capturing it) tune it."""
        config = copy.deepcopy(kwargs.pop("generation_config", None) or self.generation_config)
        unused = config.update(**kwargs)
        if not (fast_decode if fast_decode is not None else getattr(config, "fast_decode", False)):
            return super().generate(*args, generation_config=config, **unused)
        input_ids = args[0] if args else unused.pop("input_ids")
        pixel_values, attention_mask = unused.pop("pixel_values", None), unused.pop("attention_mask", None)
        if unused:
            raise ValueError(f"fast_decode does not take {sorted(unused)}; use the regular generate() for them.")
        unsupported = {name: getattr(config, name) for name, default in self._FAST_DEFAULTS.items()
                       if getattr(config, name, default) not in (default, None)}
        if unsupported:
            raise ValueError(f"fast_decode supports greedy and sampling only; got {unsupported}.")
        if config.max_new_tokens is None:
            raise ValueError("fast_decode needs max_new_tokens.")
        params = SamplingParams(bool(config.do_sample), float(config.temperature or 1.0), config.top_k or None,
                                config.top_p if config.top_p not in (None, 1.0) else None)
        return fast_generate(self, input_ids, attention_mask, pixel_values, max_new_tokens=config.max_new_tokens,
                             params=params, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                             prefill_chunk_size=config.prefill_chunk_size or PREFILL_CHUNK,
                             compile=bool(fast_decode_compile if fast_decode_compile is not None
                                          else getattr(config, "fast_decode_compile", False)))


__all__ = ["MaTVLMPreTrainedModel", "MaTVLMForConditionalGeneration"]
