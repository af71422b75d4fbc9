"""MaTVLM: SigLIP vision tower -> mlp2x_gelu connector -> a transformers language model in which the attention module
of the chosen decoder layers is a Mamba-2 mixer (TinyLLaVA architecture; arXiv 2503.13440).

Laid out like transformers' Llava (models/llava/modeling_llava.py): `MaTVLMModel` (vision tower, connector and the
headless LM: what `AutoModel` gives) and `MaTVLMForConditionalGeneration` (`model` + `lm_head`: what
`AutoModelForImageTextToText` gives). The language model is transformers' own (PhiModel, LlamaModel, Qwen2Model):
only the `self_attn` of the Mamba layers is swapped, so norms, MLPs, attention backends, caches and generation are
transformers'. Checkpoints keep the TinyLLaVA-style key layout (`language_model.model.*`, `language_model.lm_head.*`,
`vision_tower.*`, `connector.*`): a registered checkpoint conversion mapping renames on load and back on save, as
transformers does for Llava.

Self-contained (relative imports only) so it can be saved beside the weights as remote code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
import warnings

import torch
from torch import nn
from transformers import AutoModel, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.masking_utils import create_masks_for_generate
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_matvlm import MaTVLMConfig
from .fast_generation import PREFILL_TOKEN_BUDGET, DecoderPool, SamplingParams, fast_generate
from .mamba2_mixer import CACHE_ARG, MaTVLMMamba2Mixer

#: language models whose forward takes a per-layer-type mask dict (they index it with `config.layer_types`)
_MASK_DICT_LANGUAGE_MODELS = ("qwen2",)

#: on-disk key prefix (TinyLLaVA's module names, kept by every MaTVLM checkpoint) -> module name prefix
CHECKPOINT_KEY_PREFIXES = {
    "language_model.lm_head": "lm_head",
    "language_model.model": "model.language_model",
    "vision_tower": "model.vision_tower",
    "connector": "model.connector",
}
# transformers applies these on load and reverses them on save (as for Llava), so checkpoints written by earlier
# versions, by the converter and by save_pretrained share one layout
register_checkpoint_conversion_mapping(
    MaTVLMConfig.model_type,
    [
        WeightRenaming(source_patterns="^" + disk.replace(".", r"\."), target_patterns=module)
        for disk, module in CHECKPOINT_KEY_PREFIXES.items()
    ],
    overwrite=True,
)


def module_key(key: str) -> str:
    """The `MaTVLMForConditionalGeneration` state-dict name of an on-disk key (the inverse of `checkpoint_key`); other
    keys are returned unchanged."""
    for disk, module in CHECKPOINT_KEY_PREFIXES.items():
        if key.startswith(disk + "."):
            return module + key[len(disk) :]
    return key


def checkpoint_key(name: str) -> str:
    """The on-disk key of a `MaTVLMForConditionalGeneration` state-dict entry (e.g. "model.language_model.layers.0..."
    -> "language_model.model.layers.0...")."""
    for disk, module in CHECKPOINT_KEY_PREFIXES.items():
        if name.startswith(module + "."):
            return disk + name[len(module) :]
    return name


def _output_fields(cache: Cache | None) -> dict:
    """The cache under the output field name of the installed transformers, so `generate()` finds it."""
    return {CACHE_ARG: cache}


def _deprecated_cache_name(past_key_values: Cache | None) -> Cache | None:
    """`past_key_values` passed to a forward: from 5.2x transformers calls it `cache` and warns for the old name
    (removal announced for 5.40), as its own models do."""
    if past_key_values is not None and CACHE_ARG == "cache":
        warnings.warn(
            "`past_key_values` is deprecated and will be removed in transformers 5.40.0; pass `cache`.",
            FutureWarning,
            stacklevel=3,
        )
    return past_key_values


def _vision_kwargs(kwargs: dict) -> dict:
    """The output flags of a forward's kwargs that the vision tower honours too (Llava passes them on)."""
    return {k: kwargs[k] for k in ("output_attentions",) if k in kwargs}


@dataclass
class MaTVLMModelOutputWithPast(ModelOutput):
    """`MaTVLMModel` outputs. last_hidden_state (b, l, hidden); the decoding cache under the installed transformers'
    name (`cache` from 5.2x, else `past_key_values`); hidden_states / attentions as the language model returns them;
    image_hidden_states (n_images, num_image_tokens, hidden): the projected image features of this call;
    image_outputs: `get_image_features`' output for them (the vision tower's, pooler_output = image_hidden_states;
    transformers' VLM outputs carry it from 5.2x)."""

    last_hidden_state: torch.FloatTensor | None = None
    if CACHE_ARG == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class MaTVLMCausalLMOutputWithPast(ModelOutput):
    """`MaTVLMForConditionalGeneration` outputs: loss (scalar), logits (b, l or logits_to_keep, vocab), and the fields
    of `MaTVLMModelOutputWithPast` but last_hidden_state."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    if CACHE_ARG == "cache":
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None
    image_outputs: BaseModelOutputWithPooling | None = None


class MaTVLMPreTrainedModel(PreTrainedModel):
    config: MaTVLMConfig
    config_class = MaTVLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["PhiDecoderLayer", "LlamaDecoderLayer", "Qwen2DecoderLayer", "SiglipEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    def __init__(self, config: MaTVLMConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        # remote code: saving records only the Auto class the saved class was registered for; both must resolve
        config.auto_map = {
            **(getattr(config, "auto_map", None) or {}),
            "AutoModel": "modeling_matvlm.MaTVLMModel",
            "AutoModelForImageTextToText": "modeling_matvlm.MaTVLMForConditionalGeneration",
        }

    @property
    def _is_stateful(self) -> bool:
        """Mamba layers keep a recurrent state that cannot be rolled back to an earlier token, so generation modes
        that need that (assisted and prompt-lookup decoding) are refused by `generate()`, as for transformers' own
        Mamba hybrids (Bamba, Jamba). The teacher (no Mamba layer) is not stateful."""
        return bool(self.config.mamba_layers)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, refusing a checkpoint whose tensors do not fill the model exactly.

        transformers only logs missing and unexpected tensors and initialises the missing ones at random; for a
        MaTVLM checkpoint that is always a mistake (a `mamba_layers` in config.json edited by hand, a raw TinyLLaVA
        folder, a truncated file), so it raises ValueError naming the tensors. With `output_loading_info=True` the
        loading info is returned as usual."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        headless = not isinstance(model, GenerationMixin)  # MaTVLMModel: a full checkpoint's head is not for it
        missing = sorted(info.get("missing_keys") or [])
        unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not (headless and k.startswith("lm_head")))
        if missing or unexpected:

            def listed(keys: list[str]) -> str:
                return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")

            def layers_with(keys: list[str]) -> set[int]:  # layers whose A_log (a mixer-only tensor) is listed
                return {int(k.split(".layers.")[1].split(".")[0]) for k in keys if k.endswith("self_attn.A_log")}

            in_weights = sorted(set(model.config.mamba_layers) - layers_with(missing) | layers_with(unexpected))
            raise ValueError(
                f"The checkpoint {args[0] if args else kwargs.get('pretrained_model_name_or_path')!s} does not match "
                f"its config.json: config.json says mamba_layers {model.config.mamba_layers}, the weights hold Mamba "
                f"mixers at layers {in_weights}; "
                + (f"missing tensors: {listed(missing)}. " if missing else "")
                + (f"unexpected tensors: {listed(unexpected)}. " if unexpected else "")
                + "Check that config.json is the one written with these weights (mamba_layers must name exactly the "
                "layers whose weights are Mamba mixers), or re-create the checkpoint with `matvlm convert`."
            )
        return (model, info) if want_info else model

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """`nn.Module.load_state_dict`, also taking the checkpoint layout: keys as `save_pretrained` writes them
        (`language_model.model.*`, `language_model.lm_head.*`, ...) are renamed to module names first. Trainer's
        `resume_from_checkpoint` hands a checkpoint file's keys straight to this method (strict=False), so without the
        renaming a resumed run would silently keep its initial weights."""
        headless = not isinstance(self, GenerationMixin)
        renamed = {}
        for key, value in state_dict.items():
            if headless and key.startswith("language_model.model."):  # MaTVLMModel: the LM is headless here
                key = "language_model." + key[len("language_model.model.") :]
            elif not headless:
                key = module_key(key)
            renamed[key] = value
        return super().load_state_dict(renamed, strict=strict, assign=assign)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        # The mixers sit inside the transformers LM, whose own `_init_weights` reaches only their Linear/Conv layers;
        # their SSM parameters get the Mamba-2 init here (the `init` functions skip parameters already loaded).
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, MaTVLMMamba2Mixer):
                module.init_ssm_parameters()


class MaTVLMModel(MaTVLMPreTrainedModel):
    """Vision tower + connector + the hybrid language model, without the LM head (what `AutoModel` loads)."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # a full checkpoint's head, not part of this model

    def __init__(self, config: MaTVLMConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.connector = nn.Sequential(
            nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size),
            nn.GELU(),
            nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size),
        )
        # built from the shared text config: its flags (output_hidden_states, ...) and layer types are the model's
        self.language_model = AutoModel.from_config(config.text_config)
        for i in config.mamba_layers:
            self.language_model.layers[i].self_attn = MaTVLMMamba2Mixer(config, i)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """pixel_values (n, 3, H, W) -> the vision tower's output with `pooler_output` = the projected image features
        (n, num_image_tokens, text hidden): TinyLLaVA's hidden_states[vision_feature_layer], first token dropped for
        the 'patch' strategy, then the connector. `hidden_states` are the tower's (when output_hidden_states).
        Raises ValueError for a wrong pixel_values shape."""
        vc = self.config.vision_config
        expected = (3, vc.image_size, vc.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (num_images, {', '.join(map(str, expected))}), "
                f"got {tuple(pixel_values.shape)}."
            )
        if output_hidden_states is None:  # the tower's config flag, as when transformers' VLMs call their tower
            output_hidden_states = self.config.vision_config.output_hidden_states
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        out = self.vision_tower(
            pixel_values.to(self.vision_tower.dtype), output_hidden_states=True, return_dict=True, **kwargs
        )
        features = out.hidden_states[layer]
        if strategy == "patch":
            features = features[:, 1:]
        return BaseModelOutputWithPooling(
            last_hidden_state=out.last_hidden_state,
            pooler_output=self.connector(features),
            hidden_states=out.hidden_states if output_hidden_states else None,
            attentions=out.attentions,
        )

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.FloatTensor, image_features: torch.FloatTensor
    ) -> torch.BoolTensor:
        """(b, l, 1) mask of the image-token positions; ValueError when their count differs from the features'."""
        if input_ids is None:
            image_embed = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_embed).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        n_tokens, (n_images, per_image) = int(mask.sum()), image_features.shape[:2]
        if n_images * per_image != n_tokens:
            raise ValueError(
                f"{n_images} image(s) give {n_images * per_image} image features ({per_image} each), but the input "
                f"holds {n_tokens} image tokens (id {self.config.image_token_id}): the number of images must match "
                "the number of <image> placeholders."
            )
        return mask[..., None]

    def embed_inputs(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """(b, l) ids -> (b, l, hidden) token embeddings with the image features scattered into the image-token
        positions. ValueError when placeholders and images disagree."""
        return self._merge_image_features(input_ids, self.get_input_embeddings()(input_ids), pixel_values)[0]

    def _merge_image_features(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        pixel_values: torch.Tensor | None,
        **vision_kwargs,
    ) -> tuple[torch.Tensor, BaseModelOutputWithPooling | None]:
        """inputs_embeds with the projected image features scattered into the image-token positions, and the vision
        output (None without pixel_values). Image tokens without pixel_values raise ValueError, checked on prompts
        (more than one token): a decode step's token is never the image id (generation suppresses it), and skipping
        the check there keeps the step free of host synchronisation."""
        if pixel_values is None:
            if input_ids is not None and input_ids.shape[1] > 1:
                if n_tokens := int((input_ids == self.config.image_token_id).sum()):
                    raise ValueError(f"input_ids hold {n_tokens} image tokens but no pixel_values were given.")
            return inputs_embeds, None
        image_outputs = self.get_image_features(pixel_values, return_dict=True, **vision_kwargs)
        features = image_outputs.pooler_output
        mask = self.get_placeholder_mask(input_ids, inputs_embeds, features)
        return inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.dtype)), image_outputs

    def language_model_masks(
        self,
        attention_mask: torch.Tensor | dict | None,
        inputs_embeds: torch.Tensor,
        cache: Cache | None,
        position_ids: torch.LongTensor | None,
    ):
        """The attention-layer mask in the form the language model takes, and the Mamba layers' padding mask.

        `attention_mask` is the user's 2-D padding mask (b, past + l), a prepared 4-D mask, or the per-layer-type dict
        that `generate()` builds for compilable caches. The Mamba padding mask (b, l), 1 = real token, or None when
        nothing is padded (transformers' `create_recurrent_attention_mask`), travels to each mixer as the `mamba_mask`
        keyword (see `MaTVLMMamba2Mixer.forward`)."""
        if not isinstance(attention_mask, dict):
            masks = create_masks_for_generate(self.config, inputs_embeds, attention_mask, cache, position_ids)
            if not isinstance(masks, dict):  # a 4-D mask given by the caller is used as it is
                masks = {"full_attention": masks, "linear_attention": None}
        else:
            masks = attention_mask
        mamba_mask = masks.get("linear_attention")
        if self.config.text_config.model_type in _MASK_DICT_LANGUAGE_MODELS:
            return masks, mamba_mask
        return masks.get("full_attention"), mamba_mask

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> MaTVLMModelOutputWithPast:
        """input_ids (b, l) or inputs_embeds (b, l, hidden); pixel_values (n_images, 3, H, W) for the prompt's
        image placeholders; attention_mask (b, past + l); `cache` (or its older name `past_key_values`): a
        transformers Cache built from this config (created when use_cache and none is given)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        cache = cache if cache is not None else _deprecated_cache_name(past_key_values)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        inputs_embeds, image_outputs = self._merge_image_features(
            input_ids, inputs_embeds, pixel_values, **_vision_kwargs(kwargs)
        )
        image_features = image_outputs.pooler_output if image_outputs is not None else None
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        lm_mask, mamba_mask = self.language_model_masks(attention_mask, inputs_embeds, cache, position_ids)
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=lm_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            mamba_mask=mamba_mask,
            return_dict=True,
            **{CACHE_ARG: cache},
            **kwargs,
        )
        return MaTVLMModelOutputWithPast(
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            image_hidden_states=image_features,
            image_outputs=image_outputs,
            **_output_fields(getattr(out, CACHE_ARG)),
        )


class MaTVLMForConditionalGeneration(MaTVLMPreTrainedModel, GenerationMixin):
    """`MaTVLMModel` + LM head; `generate()` ready (what `AutoModelForImageTextToText` loads).

    The image token id is suppressed at generation (every path: the saved generation config, `generate()` for older
    checkpoints and `fast_decode`), so only a prompt's placeholders are ever image positions."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # the head is the embedding's parameter when tied, and the text model's plan shards the embedding: shard the head
    # too (as Llava does), or tensor parallelism would gather a replicated head over a sharded embedding
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # generate() options the fast decode path does not implement, with their neutral values
    _FAST_DEFAULTS = {
        "num_beams": 1,
        "num_return_sequences": 1,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "min_new_tokens": 0,
        "penalty_alpha": None,
    }

    def __init__(self, config: MaTVLMConfig):
        super().__init__(config)
        self.model = MaTVLMModel(config)
        tc = config.text_config
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=tc.model_type == "phi")
        self.fast_decoders = DecoderPool()  # generate(fast_decode=True)'s static cache and CUDA graph, kept for reuse
        self.post_init()

    # -- the module tree, as Llava exposes it --
    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    @property
    def connector(self) -> nn.Module:
        return self.model.connector

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.language_model.layers

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        """See `MaTVLMModel.get_image_features`."""
        return self.model.get_image_features(pixel_values, **kwargs)

    def embed_inputs(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """See `MaTVLMModel.embed_inputs`."""
        return self.model.embed_inputs(input_ids, pixel_values)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> MaTVLMCausalLMOutputWithPast:
        """As `MaTVLMModel.forward`, plus labels (b, l) for the next-token loss (-100 ignored) and logits_to_keep
        (keep the last N positions' logits, or the given positions)."""
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=cache if cache is not None else _deprecated_cache_name(past_key_values),
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=num_items_in_batch,
            )
        return MaTVLMCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            image_outputs=outputs.image_outputs,
            **_output_fields(getattr(outputs, CACHE_ARG)),
        )

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs,
    ):
        """generate() repeats every tensor along dim 0 per sample; dim 0 of `pixel_values` counts images, so each
        prompt's own images are repeated with it instead (any number of images per prompt)."""
        pixel_values = model_kwargs.pop("pixel_values", None)
        if pixel_values is not None and expand_size > 1 and input_ids is not None and input_ids.shape[1] > 0:
            per_row = ((input_ids == self.config.image_token_id).sum(1) // self.config.num_image_tokens).tolist()
            if sum(per_row) == pixel_values.shape[0]:
                pixel_values = torch.cat(
                    [chunk.repeat(expand_size, *([1] * (chunk.dim() - 1))) for chunk in pixel_values.split(per_row)],
                    dim=0,
                )
        elif pixel_values is not None and expand_size > 1:
            raise ValueError(
                "generate() with several sequences per prompt needs input_ids with the image "
                "placeholders to keep each image with its prompt; give input_ids, not inputs_embeds."
            )
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs

    def generate(
        self,
        *args,
        fast_decode: bool | None = None,
        fast_decode_compile: bool | None = None,
        prefill_token_budget: int | None = None,
        **kwargs,
    ):
        """transformers' `generate`, or with `fast_decode=True` (argument or generation config attribute) the static
        hybrid cache + one CUDA graph per decode step (greedy and sampling; see fast_generation.py). Generation config
        attributes (or arguments) tune it: `prefill_token_budget` (prompt tokens per prefill chunk summed over the
        batch, default `PREFILL_TOKEN_BUDGET`), `prefill_chunk_size` (a fixed per-sequence chunk instead),
        `fast_decode_compile` (torch.compile the step before capturing it). The image token id is always suppressed."""
        prompt = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        limit = self.config.text_config.max_position_embeddings
        if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 and prompt.shape[1] > limit:
            raise ValueError(
                f"The prompt is {prompt.shape[1]} tokens long, past the language model's position limit ({limit}, "
                "text_config.max_position_embeddings): shorten it, or let the processor cut it (truncation=True, "
                "max_length=...)."
            )
        config = copy.deepcopy(kwargs.pop("generation_config", None) or self.generation_config)
        unused = config.update(**kwargs)
        suppress = list(config.suppress_tokens or [])
        if self.config.image_token_id not in suppress:
            config.suppress_tokens = suppress + [self.config.image_token_id]
        if not (fast_decode if fast_decode is not None else getattr(config, "fast_decode", False)):
            return super().generate(*args, generation_config=config, **unused)
        options = {"compile": fast_decode_compile, "prefill_token_budget": prefill_token_budget}
        return self._fast_generate(args[0] if args else unused.pop("input_ids"), config, unused, **options)

    def _fast_generate(
        self,
        input_ids: torch.LongTensor,
        config: GenerationConfig,
        inputs: dict,
        compile: bool | None,
        prefill_token_budget: int | None,
    ) -> torch.LongTensor:
        """`generate(fast_decode=True)`: checks that `config` asks only for what fast_generation.py does (ValueError
        naming the rest), then runs it on `inputs` (attention_mask, pixel_values)."""
        pixel_values, attention_mask = inputs.pop("pixel_values", None), inputs.pop("attention_mask", None)
        if inputs:
            raise ValueError(f"fast_decode does not take {sorted(inputs)}; use the regular generate() for them.")
        unsupported = {
            name: getattr(config, name)
            for name, default in self._FAST_DEFAULTS.items()
            if getattr(config, name, default) not in (default, None)
        }
        if unsupported:
            raise ValueError(f"fast_decode supports greedy and sampling only; got {unsupported}.")
        if config.max_new_tokens is None:
            raise ValueError("fast_decode needs max_new_tokens.")
        params = SamplingParams(
            bool(config.do_sample),
            float(config.temperature or 1.0),
            config.top_k or None,
            config.top_p if config.top_p not in (None, 1.0) else None,
            tuple(config.suppress_tokens),
        )
        # unset (None) values fall back to the model's generation config, as in generate()
        eos, pad = (
            getattr(config, name) if getattr(config, name) is not None else getattr(self.generation_config, name)
            for name in ("eos_token_id", "pad_token_id")
        )
        return fast_generate(
            self,
            input_ids,
            attention_mask,
            pixel_values,
            max_new_tokens=config.max_new_tokens,
            params=params,
            eos_token_id=eos,
            pad_token_id=pad,
            prefill_chunk_size=getattr(config, "prefill_chunk_size", None),
            prefill_token_budget=prefill_token_budget
            or getattr(config, "prefill_token_budget", None)
            or PREFILL_TOKEN_BUDGET,
            compile=bool(compile if compile is not None else getattr(config, "fast_decode_compile", False)),
        )


__all__ = ["MaTVLMPreTrainedModel", "MaTVLMModel", "MaTVLMForConditionalGeneration", "checkpoint_key"]
