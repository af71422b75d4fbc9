"""TinyLLaVA -> MaTVLM conversion: equality with an independent TinyLLaVA forward, the paper's weight mapping,
softmax-free attention, bad input, and publishing (captured Hub commits)."""

import json
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor

import matvlm_hf.mamba2_mixer as mixer_module
from matvlm_hf.modeling_matvlm import checkpoint_key
from matvlm_hf.conversion import ConversionError, convert_tinyllava_to_matvlm, main, mixer_from_attention
from matvlm_hf.fabricate import write_tinyllava_checkpoint
from matvlm_hf.errors import UserError
from tinyllava_reference import load_tinyllava_reference, reference_logits

IMAGE = -200


@pytest.fixture(scope="module")
def phi_ckpt(tmp_path_factory):
    return write_tinyllava_checkpoint(tmp_path_factory.mktemp("tinyllava_phi"), lm_type="phi")


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):  # GQA, sharded
    return write_tinyllava_checkpoint(
        tmp_path_factory.mktemp("tinyllava_llama"), lm_type="llama", max_shard_size=60_000
    )


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("lm", ["phi", "llama"])
def test_ratio_zero_equals_independent_tinyllava_forward(lm, phi_ckpt, llama_ckpt, tmp_path):
    src = phi_ckpt if lm == "phi" else llama_ckpt
    out = convert_tinyllava_to_matvlm(src, tmp_path / "teacher", mamba_ratio=0, progress=False)
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    text_ids = processor.tokenizer("A chat. USER: what is here? ASSISTANT:", add_special_tokens=False)["input_ids"]
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(
            input_ids=torch.tensor(
                [text_ids[:3] + [model.config.image_token_id] * model.config.num_image_tokens + text_ids[3:]]
            ),
            pixel_values=pixels,
        ).logits
    ref = load_tinyllava_reference(src)
    theirs = reference_logits(ref, torch.tensor([text_ids[:3] + [IMAGE] + text_ids[3:]]), pixels)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio,layers", [(0.25, [0]), (0.5, [0, 2])])
def test_kept_tensors_identical_and_mixer_takes_vkqo(ratio, layers, phi_ckpt, tmp_path):
    out = convert_tinyllava_to_matvlm(phi_ckpt, tmp_path / "hybrid", mamba_ratio=ratio, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["mamba_layers"] == layers
    src, dst = read_all(phi_ckpt), read_all(out)
    renames = {
        "language_model.": "language_model.",
        "vision_tower._vision_tower.vision_model.": "vision_tower.",
        "connector._connector.": "connector.",
    }
    for key, tensor in src.items():
        new = next(n + key[len(o) :] for o, n in renames.items() if key.startswith(o))
        if any(f"layers.{i}.self_attn." in key for i in layers) and key.startswith("language_model."):
            assert new not in dst
            continue
        assert torch.equal(dst[new], tensor), key
    d = 64  # tiny phi: d_inner = d_xb = 64
    for i in layers:
        a, m = f"language_model.model.layers.{i}.self_attn.", f"language_model.model.layers.{i}.self_attn."
        w, b = dst[m + "in_proj.weight"], dst[m + "in_proj.bias"]
        for name, rows in (
            ("v_proj", slice(d, 2 * d)),
            ("k_proj", slice(2 * d, 3 * d)),
            ("q_proj", slice(3 * d, 4 * d)),
        ):
            assert torch.equal(w[rows], src[a + name + ".weight"]), name
            assert torch.equal(b[rows], src[a + name + ".bias"]), name
        assert torch.equal(dst[m + "out_proj.weight"], src[a + "dense.weight"])
        assert torch.equal(dst[m + "out_proj.bias"], src[a + "dense.bias"])
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert {checkpoint_key(k) for k in model.state_dict()} == set(dst)  # the layout the model itself saves
    assert [i for i, layer in enumerate(model.decoder_layers) if hasattr(layer.self_attn, "A_log")] == layers


def test_gqa_teacher_mixer_has_kv_sized_x_and_b(llama_ckpt, tmp_path):
    out = convert_tinyllava_to_matvlm(llama_ckpt, tmp_path / "h", mamba_layers=[1, 3], progress=False)
    dst, src = read_all(out), read_all(llama_ckpt)
    w = dst["language_model.model.layers.1.self_attn.in_proj.weight"]
    kv = src["language_model.model.layers.1.self_attn.k_proj.weight"].shape[0]  # 2 kv heads x 16 = 32 < 64
    assert kv == 32 and w.shape[0] == 64 + 32 + 32 + 64 + 4
    assert torch.equal(w[64:96], src["language_model.model.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(w[96:128], src["language_model.model.layers.1.self_attn.k_proj.weight"])
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits).all()


def test_initialised_mixer_computes_softmax_free_attention(phi_ckpt, monkeypatch):
    """With A = 0, dt = 1, D = 0, identity conv and no gate/norm, the mixer made from an attention layer computes
    y_n = sum_{t<=n} (Q_n . K_t) V_t per head (no 1/sqrt(d) scale: it is absorbed into W_Q by training; no RoPE)."""
    from matvlm_hf.conversion import matvlm_config_from_tinyllava, read_tinyllava_config

    config = matvlm_config_from_tinyllava(read_tinyllava_config(phi_ckpt), [1])
    src = read_all(phi_ckpt)
    prefix = "language_model.model.layers.1.self_attn."
    attn = {k[len(prefix) :]: v for k, v in src.items() if k.startswith(prefix)}
    mixer = mixer_module.MaTVLMMamba2Mixer(config, 1)
    mixer.load_state_dict(mixer_from_attention(config, 1, attn, generator_seed=0))
    with torch.no_grad():
        mixer.A_log.fill_(-torch.inf)  # A = -exp(-inf) = 0: no decay
        mixer.in_proj.weight[-mixer.nheads :] = 0  # dt = softplus(0 + dt_bias) = 1
        mixer.in_proj.bias[-mixer.nheads :] = 0
        mixer.dt_bias.fill_(torch.log(torch.expm1(torch.tensor(1.0))))
        mixer.D.zero_()
    monkeypatch.setattr(mixer_module, "causal_conv1d_blc", lambda x, w, b, use_kernel=True: x)
    monkeypatch.setattr(mixer_module, "rmsnorm_gated", lambda y, z, w, eps, g, use_kernel=True: y)
    u = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, _ = mixer(u)
        heads = lambda t: t.unflatten(-1, (4, 16)).transpose(1, 2)  # (b, h, l, 16)
        q, k, v = (
            heads(torch.nn.functional.linear(u, attn[f"{n}.weight"], attn[f"{n}.bias"]))
            for n in ("q_proj", "k_proj", "v_proj")
        )
        scores = (q @ k.transpose(-1, -2)).tril()  # causal, no softmax, no scale
        expected = torch.nn.functional.linear(
            (scores @ v).transpose(1, 2).flatten(-2), attn["dense.weight"], attn["dense.bias"]
        )
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_random_init_ablation_does_not_copy_attention(phi_ckpt, tmp_path):
    out = convert_tinyllava_to_matvlm(phi_ckpt, tmp_path / "r", mamba_layers=[2], init="random", progress=False)
    dst, src = read_all(out), read_all(phi_ckpt)
    w = dst["language_model.model.layers.2.self_attn.in_proj.weight"]
    assert not torch.equal(w[64:128], src["language_model.model.layers.2.self_attn.v_proj.weight"])


def test_output_folder_is_complete(phi_ckpt, tmp_path):
    out = convert_tinyllava_to_matvlm(
        phi_ckpt, tmp_path / "o", mamba_ratio=0.5, dtype="bfloat16", progress=False, max_shard_size=100_000
    )
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "README.md",
        "model.safetensors.index.json",
        "configuration_matvlm.py",
        "modeling_matvlm.py",
        "mamba2_mixer.py",
        "mamba2_ops.py",
        "processing_matvlm.py",
        "chat_template.py",
        "tokenizer.json",
    } <= names, names
    assert not list(out.glob("*.bin")) and len(list(out.glob("model-*-of-*.safetensors"))) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert all((out / f).exists() for f in set(index["weight_map"].values()))
    card = (out / "README.md").read_text()
    assert "[0, 2]" in card and "Eq. 6" in card
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_matvlm.MaTVLMForConditionalGeneration"
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


# --- bad input: clear errors and nothing half-written ---------------------------------------------------------------


def no_partial_output(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not [p for p in parent.iterdir() if "partial" in p.name]


def test_not_a_tinyllava_folder(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        convert_tinyllava_to_matvlm(tmp_path / "src", tmp_path / "out", mamba_ratio=0.25)
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ConversionError, match="model_type 'llava'"):
        convert_tinyllava_to_matvlm(tmp_path / "src", tmp_path / "out", mamba_ratio=0.25)
    assert no_partial_output(tmp_path, "out")


def copy_ckpt(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_and_truncated_weights(llama_ckpt, tmp_path):
    broken = copy_ckpt(llama_ckpt, tmp_path / "missing")
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ConversionError, match=f"{shard.name} listed in the index is missing"):
        convert_tinyllava_to_matvlm(broken, tmp_path / "out", mamba_ratio=0.25)
    truncated = copy_ckpt(llama_ckpt, tmp_path / "truncated")
    shard = sorted(truncated.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ConversionError, match="damaged or truncated"):
        convert_tinyllava_to_matvlm(truncated, tmp_path / "out", mamba_ratio=0.25)
    assert no_partial_output(tmp_path, "out")


def test_unsupported_lm_and_bad_ratio(phi_ckpt, tmp_path):
    other = copy_ckpt(phi_ckpt, tmp_path / "gpt2")
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="Unsupported language model type 'gpt2'"):
        convert_tinyllava_to_matvlm(other, tmp_path / "out", mamba_ratio=0.25)
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ConversionError, match=r"mamba ratio must be in \[0, 1\)"):
            convert_tinyllava_to_matvlm(phi_ckpt, tmp_path / "out", mamba_ratio=ratio)
    with pytest.raises(ConversionError, match="out of range"):
        convert_tinyllava_to_matvlm(phi_ckpt, tmp_path / "out", mamba_layers=[7])
    assert no_partial_output(tmp_path, "out")


def test_existing_output_needs_overwrite(phi_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UserError, match="exists and is not empty. Choose a new folder, or pass --overwrite"):
        convert_tinyllava_to_matvlm(phi_ckpt, out, mamba_ratio=0.25)
    assert (out / "keep.txt").read_text() == "user data"
    convert_tinyllava_to_matvlm(phi_ckpt, out, mamba_ratio=0.25, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConversionError, match="(?s)Could not fetch 'someone/tinyllava'.*pass its local folder"):
        convert_tinyllava_to_matvlm("someone/tinyllava", tmp_path / "out", mamba_ratio=0.25)


def test_cli_errors_exit_with_a_message(phi_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), "--mamba-ratio", "0.25"])
    assert exit_info.value.code == 2 and "no such file or folder" in capsys.readouterr().err
    assert main(["--input", str(phi_ckpt), "--output", str(tmp_path / "o"), "--mamba-layers", "0,3"]).exists()


# --- publishing: capture what huggingface_hub would send ---------------------------------------------------------


@pytest.fixture
def captured_commits(monkeypatch):
    from huggingface_hub import HfApi

    commits = []

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            obj = op.path_or_fileobj
            files[op.path_in_repo] = (
                Path(obj).read_bytes()
                if isinstance(obj, (str, Path))
                else (obj if isinstance(obj, bytes) else obj.read())
            )
        commits.append({"repo_id": repo_id, "files": files})

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, *a, **kw: None)  # a server-side check of the card
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    return commits


def test_push_to_hub_uploads_the_whole_folder(phi_ckpt, tmp_path, captured_commits):
    out = convert_tinyllava_to_matvlm(
        phi_ckpt, tmp_path / "o", mamba_ratio=0.25, push_to_hub="me/matvlm-tiny", progress=False
    )
    (commit,) = captured_commits
    assert commit["repo_id"] == "me/matvlm-tiny"
    local = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert commit["files"] == local


def test_loaded_hybrid_push_to_hub_includes_remote_code(phi_ckpt, tmp_path, captured_commits):
    out = convert_tinyllava_to_matvlm(phi_ckpt, tmp_path / "o", mamba_ratio=0.25, progress=False)
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    model.push_to_hub("me/pushed")
    processor.push_to_hub("me/pushed")
    files = set(captured_commits[0]["files"]) | set(captured_commits[1]["files"])
    assert {
        "model.safetensors",
        "config.json",
        "modeling_matvlm.py",
        "mamba2_mixer.py",
        "mamba2_ops.py",
        "configuration_matvlm.py",
        "processing_matvlm.py",
        "tokenizer.json",
    } <= files, files
