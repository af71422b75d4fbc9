"""An independent reference of the authors' MaTVLM language model (hustvl/MaTVLM), for the import tests.

Written from their code, using nothing from matvlm_hf:
- mamba2/hybrid_model.py `PhiMambaDecoderLayer`: h + mamba(LN(h)) + mlp(LN(h)) with `nn.LayerNorm(d_model,
  eps=layer_norm_eps)`, `PhiMLP` (fc1, ACT2FN[hidden_act], fc2) and dropout (identity in eval);
- mamba2/hybrid_mamba_layer.py `Mamba2` with nheads = ngroups, headdim = d_state, computed token by token as their
  `step` does (their decode path; the chunked scan of their prefill computes the same recurrence):
      z, xBC, dt = in_proj(u) split [d_inner, d_inner + 2 d_xb, nheads]
      conv_state <- roll left, append xBC; xBC = silu(sum(conv_state * conv1d.weight) + conv1d.bias)
      x, B, C = xBC split [d_xb, d_xb, d_inner]; x, B: (d_xb / d_state) groups of d_state, repeat_interleave to nheads
      dt = softplus(dt + dt_bias); A = -exp(A_log)
      state <- state * exp(dt A) + (dt x) outer B;  y = state . C + D x            (mamba_ssm selective_state_update)
      y = RMSNorm_group(y * silu(z)) * norm.weight  (group size d_inner / ngroups, eps 1e-5, norm_before_gate False)
      out = out_proj(y)
- the language model: transformers' PhiForCausalLM with the Mamba layers' decoder layers replaced (as their
  `TinyllavaMambaTransformerHybridModelWrapper` does), loaded with strict=True from the authors' tensor names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers.activations import ACT2FN

from tinyllava_reference import load_tinyllava_reference


class AuthorsMamba2(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_inner: int,
        d_xb: int,
        ngroups: int,
        d_state: int,
        bias: bool,
        d_conv: int = 4,
        conv_bias: bool = True,
    ):
        super().__init__()
        self.d_inner, self.d_xb, self.nheads, self.d_state, self.d_conv = d_inner, d_xb, ngroups, d_state, d_conv
        conv_dim = d_inner + 2 * d_xb
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * d_xb + ngroups, bias=bias)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(ngroups))
        self.A_log = nn.Parameter(torch.zeros(ngroups))
        self.D = nn.Parameter(torch.zeros(ngroups))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        b = u.shape[0]
        conv_state = u.new_zeros(b, self.d_inner + 2 * self.d_xb, self.d_conv)
        ssm_state = u.new_zeros(b, self.nheads, self.d_state, self.d_state)  # (b, h, headdim, d_state)
        return torch.stack([self.step(u[:, t], conv_state, ssm_state) for t in range(u.shape[1])], dim=1)

    def step(self, u: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """One token u (b, d_model); updates the states in place."""
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.d_inner + 2 * self.d_xb, self.nheads], dim=-1)
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = xBC
        xBC = torch.sum(conv_state * self.conv1d.weight[:, 0, :], dim=-1)
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias
        xBC = nn.functional.silu(xBC)
        x, B, C = xBC.split([self.d_xb, self.d_xb, self.d_inner], dim=-1)
        repeat = self.d_inner // self.d_xb
        x = x.reshape(-1, self.d_xb // self.d_state, self.d_state).repeat_interleave(repeat, dim=1)  # (b, h, p)
        B = B.reshape(-1, self.d_xb // self.d_state, self.d_state).repeat_interleave(repeat, dim=1)  # (b, h, n)
        C = C.reshape(-1, self.nheads, self.d_state)
        dt = nn.functional.softplus(dt + self.dt_bias)  # (b, h)
        A = -torch.exp(self.A_log)
        decay = torch.exp(dt * A)[:, :, None, None]
        ssm_state.copy_(ssm_state * decay + (dt[:, :, None] * x)[..., None] * B[:, :, None, :])
        y = (ssm_state * C[:, :, None, :]).sum(-1) + self.D[:, None] * x  # (b, h, p)
        y = y.reshape(-1, self.d_inner) * nn.functional.silu(z)
        groups = y.reshape(-1, self.nheads, self.d_inner // self.nheads)
        y = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(-1, self.d_inner)
        return self.out_proj(y * self.norm.weight)


class AuthorsPhiMLP(nn.Module):
    def __init__(self, d_model: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(d_model, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, d_model)
        self.activation_fn = ACT2FN[hidden_act]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(h)))


class AuthorsPhiMambaDecoderLayer(nn.Module):
    def __init__(self, mamba_config: dict):
        super().__init__()
        c, ssm = mamba_config, mamba_config["ssm_cfg"]
        self.mlp = AuthorsPhiMLP(c["d_model"], c["intermediate_size"], c["hidden_act"])
        self.input_layernorm = nn.LayerNorm(c["d_model"], eps=c["layer_norm_eps"])
        self.mamba = AuthorsMamba2(
            c["d_model"],
            c["d_inner"],
            c["d_xb"],
            ssm["ngroups"],
            ssm["d_state"],
            bias=c["is_bias"],
            d_conv=ssm.get("d_conv", 4),
            conv_bias=ssm.get("conv_bias", True),
        )

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        return self.mamba(normed) + self.mlp(normed) + hidden_states


def load_authors_reference(checkpoint_dir: str | Path, dtype: torch.dtype = torch.float64):
    """TinyLLaVA reference (tinyllava_reference.py) whose Mamba layers are the authors' PhiMambaDecoderLayer."""
    mamba_config = json.loads((Path(checkpoint_dir) / "mamba_config.json").read_text())

    def swap_layers(language_model: nn.Module) -> None:
        for i in range(mamba_config["n_layer"]):
            if i not in mamba_config["attn_layers"]:
                language_model.model.layers[i] = AuthorsPhiMambaDecoderLayer(mamba_config)

    return load_tinyllava_reference(checkpoint_dir, dtype, language_model_hook=swap_layers)
