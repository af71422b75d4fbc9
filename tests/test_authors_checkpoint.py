"""The authors' layout (hustvl/MaTVLM): import equals an independent forward of their architecture, export/import
round trip of a `--preset paper` conversion is bit-identical, the paper preset, and refusals."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, DynamicCache

from authors_reference import load_authors_reference
from matvlm_hf.authors_checkpoint import export_authors_checkpoint, import_authors_checkpoint
from matvlm_hf.commands import export as export_command
from matvlm_hf.commands import import_ as import_command
from matvlm_hf.modeling_matvlm import checkpoint_key
from matvlm_hf.conversion import ConversionError, convert_tinyllava_to_matvlm
from matvlm_hf.fabricate import write_tinyllava_checkpoint
from matvlm_hf.fabricate_authors import write_authors_checkpoint
from matvlm_hf.paper_preset import paper_mamba_layers
from tinyllava_reference import reference_logits

IMAGE = -200
EIGHT_LAYERS = {"num_hidden_layers": 8}


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def tinyllava(tmp_path_factory):
    return write_tinyllava_checkpoint(tmp_path_factory.mktemp("tinyllava"), lm_type="phi")


@pytest.mark.parametrize("ratio,is_bias", [(0.25, False), (0.5, False), (0.25, True)])
def test_import_equals_the_authors_forward_prefill_and_decode(ratio, is_bias, tmp_path):
    """float64: our prefill and our token-by-token decode (cache) against the reference (their layer, their step
    recurrence over the whole sequence). Ours computes dt and A in float32, as theirs does: ~1e-7 differences."""
    layers = paper_mamba_layers(8, ratio)
    src = write_authors_checkpoint(
        tmp_path / "authors", ssm_layers=layers, lm=EIGHT_LAYERS, is_bias=is_bias, max_shard_size=150_000
    )
    out = import_authors_checkpoint(src, tmp_path / "imported", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["mamba_layers"] == layers and config["mamba_proj_bias"] is is_bias
    assert config["mamba_out_proj_bias"] is is_bias
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float64).eval()

    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 900, (24,), generator=g)
    pixels = torch.randn(1, 3, 32, 32, generator=g, dtype=torch.float64)
    block = torch.full((model.config.num_image_tokens,), model.config.image_token_id)
    ids = torch.cat([text[:3], block, text[3:]])[None]
    theirs = reference_logits(
        load_authors_reference(src), torch.cat([text[:3], torch.tensor([IMAGE]), text[3:]])[None], pixels
    )
    n_prefill = 3 + len(block) + 5
    with torch.no_grad():
        prefill = model(input_ids=ids, pixel_values=pixels, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(input_ids=ids[:, :n_prefill], pixel_values=pixels, past_key_values=cache).logits]
        for t in range(n_prefill, ids.shape[1]):
            steps.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache).logits)
    assert theirs.abs().max() > 1.0  # non-trivial logits
    torch.testing.assert_close(prefill, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat(steps, 1), theirs, rtol=1e-6, atol=1e-6)


def test_imported_tensors_are_the_sources_renamed(tmp_path):
    src = write_authors_checkpoint(tmp_path / "authors", ssm_layers=[0, 2], dtype=torch.bfloat16)
    out = import_authors_checkpoint(src, tmp_path / "imported", progress=False)
    theirs, ours = read_all(src), read_all(out)
    assert len(theirs) == len(ours)
    assert torch.equal(
        ours["language_model.model.layers.2.self_attn.norm_weight"],
        theirs["language_model.model.layers.2.mamba.norm.weight"],
    )
    assert torch.equal(
        ours["vision_tower.post_layernorm.weight"],
        theirs["vision_tower._vision_tower.vision_model.post_layernorm.weight"],
    )
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    assert "hustvl/MaTVLM" in (out / "README.md").read_text() and str(src) in (out / "README.md").read_text()


def test_import_never_asks_to_run_the_folders_remote_code(tmp_path, capfd, monkeypatch):
    """The authors' config.json names TinyLLaVA's remote code (auto_map): reading the tokenizer must not go through
    AutoConfig, which asks "Do you wish to run the custom code?" (and waits for an answer in a terminal)."""
    src = write_authors_checkpoint(tmp_path / "authors", ssm_layers=[0, 2])
    assert "auto_map" in json.loads((src / "config.json").read_text())
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("import asked a question: " + " ".join(map(str, a))))
    out = import_authors_checkpoint(src, tmp_path / "imported", progress=False)
    printed = capfd.readouterr()
    assert "custom code" not in printed.out + printed.err
    assert "to instantiate a model of type" not in printed.out + printed.err
    assert (out / "tokenizer_config.json").exists()


@pytest.mark.parametrize("ratio,preset", [(0.25, "paper"), (0.5, "paper"), (0.25, "matvlm")])
def test_convert_export_import_is_bit_identical(ratio, preset, tinyllava, tmp_path):
    """--preset paper gives their bias-free mixer (is_bias false); the default preset's biased one is their is_bias."""
    converted = convert_tinyllava_to_matvlm(
        tinyllava, tmp_path / "converted", mamba_ratio=ratio, preset=preset, progress=False
    )
    exported = export_authors_checkpoint(converted, tmp_path / "authors", progress=False)
    reimported = import_authors_checkpoint(exported, tmp_path / "reimported", progress=False)
    a, b = read_all(converted), read_all(reimported)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    mamba = json.loads((exported / "mamba_config.json").read_text())
    layers = paper_mamba_layers(4, ratio)
    assert mamba["attn_layers"] == [i for i in range(4) if i not in layers] and mamba["is_bias"] is (preset == "matvlm")
    assert json.loads((exported / "config.json").read_text())["architectures"] == [
        "HybridTinyLlavaForConditionalGeneration"
    ]
    load_authors_reference(exported)  # the exported tensors load strictly into the authors' architecture
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (converted, reimported))
    for key in (
        "mamba_layers",
        "mamba_proj_bias",
        "mamba_out_proj_bias",
        "mamba_d_xb",
        "mamba_nheads",
        "image_token_id",
    ):
        assert ca[key] == cb[key], key


def test_export_refuses_what_the_authors_layout_cannot_hold(tmp_path):
    llama = write_tinyllava_checkpoint(tmp_path / "llama", lm_type="llama")
    converted = convert_tinyllava_to_matvlm(llama, tmp_path / "converted", mamba_ratio=0.25, progress=False)
    with pytest.raises(ConversionError, match="Phi language models only"):
        export_authors_checkpoint(converted, tmp_path / "authors", progress=False)
    assert not (tmp_path / "authors").exists()


def test_paper_layer_lists():
    assert paper_mamba_layers(32, 0.125) == [0, 6, 12, 18]
    assert paper_mamba_layers(32, 0.25) == list(range(0, 32, 4))
    assert paper_mamba_layers(32, 0.5) == list(range(0, 32, 2))
    assert paper_mamba_layers(40, 0.125) == [0, 6, 12, 18, 24]  # the 12.5 % spacing (3/4 of even) kept at other depths
    with pytest.raises(ValueError, match="0.125, 0.25 and 0.5"):
        paper_mamba_layers(32, 0.3)


def test_paper_preset_convert_and_its_random_init_ablation(tinyllava, tmp_path):
    teacher = read_all(tinyllava)
    ablation = convert_tinyllava_to_matvlm(
        tinyllava, tmp_path / "paper-random", mamba_ratio=0.5, preset="paper", init="random", progress=False
    )
    config = json.loads((ablation / "config.json").read_text())
    assert config["mamba_layers"] == [0, 2] and not config["mamba_proj_bias"] and not config["mamba_out_proj_bias"]
    got = read_all(ablation)
    assert "language_model.model.layers.0.self_attn.in_proj.bias" not in got
    for i in (
        0,
        2,
    ):  # Mamba layers: MLP and input LayerNorm at PyTorch's defaults, as the authors' ablation leaves them
        p = f"language_model.model.layers.{i}."
        assert torch.equal(got[p + "input_layernorm.weight"], torch.ones(64))
        assert torch.equal(got[p + "input_layernorm.bias"], torch.zeros(64))
        fc1 = got[p + "mlp.fc1.weight"]
        assert fc1.abs().max() <= 64**-0.5 and not torch.equal(fc1, teacher[p + "mlp.fc1.weight"])
    for i in (1, 3):  # attention layers untouched
        key = f"language_model.model.layers.{i}.mlp.fc1.weight"
        assert torch.equal(got[key], teacher[key])
    mixer_only = read_all(
        convert_tinyllava_to_matvlm(tinyllava, tmp_path / "random", mamba_ratio=0.5, init="random", progress=False)
    )
    key = "language_model.model.layers.0.mlp.fc1.weight"
    assert torch.equal(mixer_only[key], teacher[key])  # the default preset's `random` keeps the teacher's MLP


def test_import_refuses_other_checkpoints(tinyllava, tmp_path):
    with pytest.raises(ConversionError, match="matvlm convert"):
        import_authors_checkpoint(tinyllava, tmp_path / "out", progress=False)
    src = write_authors_checkpoint(tmp_path / "authors", ssm_layers=[0, 2])
    mamba_file = src / "mamba_config.json"
    good = json.loads(mamba_file.read_text())
    cases = [
        ({"attn_layers": [0, 1, 3]}, "does not fit layer"),  # layer 2 holds mamba.* tensors
        ({"bidirectional": True}, "bidirectional"),
        ({"ssm_cfg": {**good["ssm_cfg"], "D_has_hdim": True}}, "D_has_hdim"),
        ({"ssm_cfg": {**good["ssm_cfg"], "d_state": 8}}, "d_inner"),
        ({"intermediate_size": 7}, "intermediate_size"),
    ]
    for change, message in cases:
        mamba_file.write_text(json.dumps({**good, **change}))
        with pytest.raises(ConversionError, match=message):
            import_authors_checkpoint(src, tmp_path / "out", progress=False)
    mamba_file.write_text(json.dumps(good))
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    from safetensors.torch import save_file

    tensors = read_all(broken)
    del tensors["language_model.model.layers.2.mamba.D"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="1 tensors missing"):
        import_authors_checkpoint(broken, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_commands_refuse_unsafe_outputs_and_bad_input(tmp_path, capsys):
    src = write_authors_checkpoint(tmp_path / "authors", ssm_layers=[0])
    before = sorted(p.name for p in src.iterdir())
    for argv in (["--input", str(src), "--output", str(src / "inside")], ["--input", str(src), "--output", str(src)]):
        with pytest.raises(SystemExit) as exit_info:
            import_command.main(argv)
        assert exit_info.value.code == 2 and "input" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == before
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(SystemExit):
        import_command.main(["--input", str(src), "--output", str(out)])
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "user data"
    with pytest.raises(SystemExit):
        export_command.main(["--format", "authors", "--input", str(src), "--output", str(tmp_path / "x")])
    assert "not a matvlm-hf checkpoint" in capsys.readouterr().err
    imported = import_command.main(["--input", str(src), "--output", str(tmp_path / "imported")])
    assert (imported / "config.json").is_file()


def test_full_size_authors_layout_matches_the_importer():
    """TinyLLaVA-Phi-2-SigLIP-3.1B at 25 % (hustvl/MaTVLM_0_25_Mamba2's shape), from meta-device modules: every
    fabricated tensor maps onto the imported model's, same shape (the full write itself runs in the GPU example)."""
    from matvlm_hf.authors_checkpoint import import_key, matvlm_config_from_authors
    from matvlm_hf.fabricate import _lm_config, _vision_config
    from matvlm_hf.fabricate_authors import authors_param_specs, train_script_mamba_config
    from matvlm_hf.modeling_matvlm import MaTVLMForConditionalGeneration

    text, vision = _lm_config("phi", "full", {"bos": 50256, "eos": 50256}, torch.bfloat16), _vision_config("full")
    mamba = train_script_mamba_config(text, paper_mamba_layers(32, 0.25))
    assert mamba["ssm_cfg"] == {"expand": 1, "ngroups": 32, "d_state": 80} and mamba["d_xb"] == 2560
    specs = {k: s for k, s, _ in authors_param_specs(text, vision, mamba)}
    assert specs["language_model.model.layers.4.mamba.in_proj.weight"] == (4 * 2560 + 32, 2560)
    assert specs["language_model.model.layers.4.mamba.conv1d.weight"] == (3 * 2560, 1, 4)
    assert "language_model.model.layers.4.self_attn.q_proj.weight" not in specs
    config = matvlm_config_from_authors({"text_config": text.to_dict(), "vision_config": vision.to_dict()}, mamba)
    with torch.device("meta"):
        expected = {
            checkpoint_key(k): tuple(v.shape) for k, v in MaTVLMForConditionalGeneration(config).state_dict().items()
        }
    assert {import_key(k, set(config.mamba_layers)): s for k, s in specs.items()} == expected
    assert sum(torch.Size(s).numel() for s in specs.values()) > 3.0e9
