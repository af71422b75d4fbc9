"""The authors' conversion choices (hustvl/MaTVLM) as the `paper` preset of `matvlm convert`.

What differs from the project's default (`matvlm`) preset, as read from the authors' code and configs
(mamba2_tinyllava/tinyllava_{0.125,0.25,0.50}_mamba2_665k.yaml, train_tinyllava_mamba2/train_hybrid.py,
mamba2/hybrid_wrapper_tinyllava.py):

- bias-free mixers (`is_bias: False`): in_proj and out_proj have no bias, so Phi-2's q/k/v and `dense` biases are
  dropped (the default preset carries them over to x/B/C and out_proj);
- their layer lists (`ssm_layers`) for 32 layers: 12.5 % = [0, 6, 12, 18], 25 % = [0, 4, ..., 28],
  50 % = [0, 2, ..., 30] (the default preset's `even` gives [0, 8, 16, 24] for 12.5 %; 25 % and 50 % agree);
- their random-initialisation ablation (`init_with_kqvo: False`): a Mamba layer's MLP and input LayerNorm are left at
  PyTorch's default initialisation too, not copied from the teacher (`--init random` of the default preset
  re-initialises only the mixer). Here that is `init="random-layer"`.

Other depths: the authors publish lists for 32 layers only. 25 % and 50 % are "every 4th / every 2nd layer from 0",
which is `even` spacing at any depth; the 12.5 % list is spaced 6 layers apart instead of 8 (3/4 of even spacing,
covering the first 60 % of the depth), and that relative spacing is what this preset keeps:
layer_k = floor(k * 0.75 * n / count), count = round(n / 8). Only these three ratios (or explicit layers) are
accepted: the authors published nothing else.
"""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM

PRESETS = ("matvlm", "paper")
PAPER_RATIOS = (0.125, 0.25, 0.5)
#: the authors' `ssm_layers` for their 32-layer teacher, by Mamba ratio
PAPER_LAYERS_32 = {0.125: [0, 6, 12, 18], 0.25: list(range(0, 32, 4)), 0.5: list(range(0, 32, 2))}
#: the authors' `model_max_length` (tokens, image features included) by Mamba ratio, for the distillation recipe
PAPER_MAX_LENGTH = {0.125: 1428, 0.25: 1428, 0.5: 1228}


def paper_mamba_layers(num_layers: int, ratio: float) -> list[int]:
    """The authors' Mamba layer list for `ratio` (0.125, 0.25 or 0.5) of `num_layers` decoder layers.

    Exact for 32 layers (PAPER_LAYERS_32); other depths keep the relative spacing (module docstring).
    Raises ValueError for another ratio or a depth too shallow for one Mamba layer.
    """
    ratio = next((r for r in PAPER_RATIOS if math.isclose(ratio, r)), ratio)
    if ratio not in PAPER_RATIOS:
        raise ValueError(
            f"the paper preset knows the authors' Mamba ratios 0.125, 0.25 and 0.5, not {ratio}; pass --mamba-layers "
            "or use the default preset (--placement even)."
        )
    count = round(num_layers * ratio)
    if count == 0:
        raise ValueError(f"{ratio:.1%} of {num_layers} layers rounds to no Mamba layer.")
    step = num_layers / count * (0.75 if ratio == 0.125 else 1.0)
    return [math.floor(k * step) for k in range(count)]


def resolve_init(preset: str, init: str) -> str:
    """The init the converter applies: under the paper preset `random` means the authors' ablation (`random-layer`)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}.")
    return "random-layer" if preset == "paper" and init == "random" else init


def preset_mixer_options(preset: str) -> dict[str, bool]:
    """MaTVLMConfig options of the preset's mixer: the paper's has no in_proj / out_proj bias."""
    return {"mamba_proj_bias": False, "mamba_out_proj_bias": False} if preset == "paper" else {}


class FreshDecoderLayers:
    """The non-attention tensors (MLP, norms) of freshly built decoder layers, for the authors' random-init ablation.

    As in the authors' PhiMambaDecoderLayer, the modules keep PyTorch's default initialisation (nn.Linear: uniform
    +-1/sqrt(fan_in); LayerNorm: weight 1, bias 0). One layer is built at a time, seeded by (seed, layer), so the
    values do not depend on the order the converter asks for them. Keys are MaTVLM's
    (`language_model.model.layers.N.mlp.fc1.weight`, ...).
    """

    def __init__(self, text_config, mamba_layers: list[int], seed: int):
        with torch.device("meta"):
            self._layer_class = type(AutoModelForCausalLM.from_config(text_config).model.layers[0])
        self._config, self._layers, self._seed = text_config, set(mamba_layers), seed
        self._built: tuple[int, dict[str, torch.Tensor]] | None = None

    def get(self, key: str) -> torch.Tensor | None:
        """The fresh tensor replacing `key`, or None when `key` is not a Mamba layer's MLP or norm tensor."""
        prefix = "language_model.model.layers."
        if not key.startswith(prefix):
            return None
        index, name = key[len(prefix) :].split(".", 1)
        if int(index) not in self._layers or name.startswith("self_attn."):
            return None
        if self._built is None or self._built[0] != int(index):
            torch.manual_seed(self._seed * 1_000_003 + int(index))
            layer = self._layer_class(self._config, int(index))
            self._built = (
                int(index),
                {k: v.detach() for k, v in layer.state_dict().items() if not k.startswith("self_attn.")},
            )
        if name not in self._built[1]:
            raise ValueError(f"{key} is not a parameter of a fresh {self._layer_class.__name__}.")
        return self._built[1][name]
