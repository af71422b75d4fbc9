"""Where a Mamba-2 mixer's prefill time goes, next to the attention it replaces (TinyLLaVA-3.1B sizes, GPU, bf16).

python examples/profile_mixer.py --length 16384
"""

import argparse
import copy

import torch
import torch.nn.functional as F
from transformers import PhiConfig, SiglipVisionConfig
from transformers.models.phi.modeling_phi import PhiDecoderLayer, PhiRotaryEmbedding

from matvlm_hf import MaTVLMConfig
from matvlm_hf.fabricate import FULL_PHI, FULL_VISION
from matvlm_hf.mamba2_mixer import MaTVLMMamba2Mixer
from matvlm_hf.mamba2_ops import causal_conv1d, rmsnorm_gated, ssd_scan


def timed(fn, reps: int = 10) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=16384)
    args = parser.parse_args()
    text = PhiConfig(**FULL_PHI, partial_rotary_factor=0.4, max_position_embeddings=65536, attn_implementation="sdpa")
    attn_config = copy.deepcopy(text)  # MaTVLMConfig takes over `text` (and its attention setting)
    config = MaTVLMConfig(text_config=text, vision_config=SiglipVisionConfig(**FULL_VISION), mamba_layers=[0])
    dev, dt = "cuda", torch.bfloat16
    with torch.device(dev):
        layer = PhiDecoderLayer(attn_config, 1).to(dt)
        mixer = MaTVLMMamba2Mixer(config, 0).to(dt)
        mixer.init_ssm_parameters()
        rope = PhiRotaryEmbedding(text)
    x = torch.randn(1, args.length, 2560, device=dev, dtype=dt)
    pos = torch.arange(args.length, device=dev)[None]
    emb = rope(x, pos)
    rows = {}
    with torch.no_grad():
        rows["attention module (qkv, rope, sdpa causal, dense)"] = timed(
            lambda: layer.self_attn(x, position_embeddings=emb, attention_mask=None)
        )
        rows["mlp (fc1, gelu_new, fc2)"] = timed(lambda: layer.mlp(x))
        rows["mixer forward (whole)"] = timed(lambda: mixer(x))
        zxbcdt = mixer.in_proj(x)
        rows["  in_proj"] = timed(lambda: mixer.in_proj(x))
        z, xBC, dtr = zxbcdt.split([mixer.d_inner, mixer.conv_dim, mixer.nheads], dim=-1)
        xt = xBC.transpose(1, 2).contiguous()
        rows["  conv (torch depthwise conv1d + silu)"] = timed(
            lambda: causal_conv1d(xt, mixer.conv1d.weight[:, 0], mixer.conv1d.bias, use_kernel=False)
        )
        xs, B, C = xBC.split([mixer.d_xb, mixer.d_xb, mixer.d_inner], dim=-1)
        xh, Bh, Ch = (t.unflatten(-1, (32, 80)).contiguous() for t in (xs, B, C))
        dts = F.softplus(dtr.float() + mixer.dt_bias.float())
        A = -torch.exp(mixer.A_log.float())
        rows["  ssd scan (mamba_chunk_scan_combined)"] = timed(lambda: ssd_scan(xh, dts, A, Bh, Ch, 256, D=mixer.D))
        y = torch.randn(1, args.length, 2560, device=dev, dtype=dt)
        rows["  gated rmsnorm"] = timed(lambda: rmsnorm_gated(y, z, mixer.norm_weight, 1e-5, 80))
        rows["  out_proj"] = timed(lambda: mixer.out_proj(y))
    print(f"prefill of {args.length} tokens, one layer, bf16, {torch.cuda.get_device_name()}")
    for name, ms in rows.items():
        print(f"{name:<52} {ms:8.3f} ms")


if __name__ == "__main__":
    main()
