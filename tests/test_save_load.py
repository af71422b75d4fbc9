"""safetensors round trip, Auto-class registration and remote-code loading without the package."""

import json
import subprocess
import sys
import textwrap

import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from conftest import image_prompt, tiny_model
from matvlm_hf import MaTVLMForConditionalGeneration


def test_fresh_mixer_gets_the_mamba2_init():
    model = tiny_model("phi", (0, 2), seed=0)
    fresh = MaTVLMForConditionalGeneration(model.config)
    mixer = fresh.decoder_layers[0].self_attn
    A = -torch.exp(mixer.A_log)
    assert ((A <= -1) & (A >= -16)).all()
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert ((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all()
    assert torch.equal(mixer.D, torch.ones_like(mixer.D)) and torch.equal(
        mixer.norm_weight, torch.ones_like(mixer.D.new_ones(mixer.d_inner))
    )


def test_save_load_round_trip_is_bit_exact(tmp_path, pixel_values):
    model = tiny_model("llama", (0, 3))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    for name in ("configuration_matvlm.py", "modeling_matvlm.py", "mamba2_mixer.py", "mamba2_ops.py"):
        assert (tmp_path / name).exists(), name
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    assert type(AutoModel.from_pretrained(tmp_path)).__name__ == "MaTVLMModel"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is MaTVLMForConditionalGeneration
    assert isinstance(AutoConfig.from_pretrained(tmp_path), type(model.config))
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is MaTVLMForConditionalGeneration
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = image_prompt(model.config)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, pixel_values=pixel_values).logits,
            loaded(input_ids=ids, pixel_values=pixel_values).logits,
        )


def test_remote_code_loads_without_the_package(tmp_path, pixel_values):
    model = tiny_model("phi", (0, 2, 5))
    model.save_pretrained(tmp_path)
    ids = image_prompt(model.config)
    from safetensors.torch import save_file

    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixel_values).logits
    save_file({"ids": ids, "pixels": pixel_values, "logits": logits}, str(tmp_path / "io.safetensors"))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["matvlm_hf"] = None  # hide the package: `import matvlm_hf` now fails
        try:
            import matvlm_hf
            raise SystemExit("package not hidden")
        except ImportError:
            pass
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoModelForImageTextToText
        d = load_file({str(tmp_path / "io.safetensors")!r})
        base = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert type(base).__name__ == "MaTVLMModel" and "transformers_modules" in type(base).__module__
        model = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        with torch.no_grad():
            out = model(input_ids=d["ids"], pixel_values=d["pixels"]).logits
        assert torch.equal(out, d["logits"]), (out - d["logits"]).abs().max()
        gen = model.generate(input_ids=d["ids"], pixel_values=d["pixels"], max_new_tokens=4, do_sample=False)
        print("OK", type(model).__name__, gen.shape[1])
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK MaTVLMForConditionalGeneration" in result.stdout
