"""MaTVLMDistillationTrainer: losses, the teacher-fed layer loss, trainable selection, optimizer, schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

from matvlm_hf.data import LLaVACollator
from matvlm_hf.distillation import (
    DistillationArguments,
    GradientCheckError,
    MaTVLMDistillationTrainer,
    apply_decoder_layer,
    capture_layer_io,
    kl_loss,
    layer_loss,
    set_trainable,
    trainable_parameter_names,
    vision_path_in_graph,
)

from conftest import image_prompt, tiny_model


def make_pair(mamba_layers=(1, 3), lm_type="phi", seed=0):
    """Teacher (no Mamba layers) and a student holding the teacher's weights except its fresh Mamba mixers."""
    teacher = tiny_model(lm_type, mamba_layers=(), seed=seed)
    student = tiny_model(lm_type, mamba_layers=mamba_layers, seed=seed + 1)
    result = student.load_state_dict(teacher.state_dict(), strict=False)
    assert all(".self_attn." in k for k in result.missing_keys + result.unexpected_keys)
    return teacher, student


def make_items(config, seed=0):
    """Two samples: one with an image (longer) and one text-only (shorter: padded), answers at the end."""
    ids1 = image_prompt(config, text_len=14, seed=seed)[0]
    g = torch.Generator().manual_seed(seed + 7)
    ids2 = torch.randint(0, config.image_token_id - 1, (9,), generator=g)
    lab1, lab2 = torch.full_like(ids1, -100), torch.full_like(ids2, -100)
    lab1[-5:], lab2[-4:] = ids1[-5:], ids2[-4:]
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    return [{"input_ids": ids1, "labels": lab1, "pixel_values": pixels}, {"input_ids": ids2, "labels": lab2}]


def make_trainer(tmp_path, teacher, student, items, *, mode="mamba+connector", steps=1, lr=5e-3, **kwargs):
    distill = kwargs.pop("distill", {})
    set_trainable(student, mode)
    student.train()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=steps,
        per_device_train_batch_size=kwargs.pop("per_device_train_batch_size", len(items)),
        learning_rate=lr,
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.95,
        lr_scheduler_type=kwargs.pop("lr_scheduler_type", "constant"),
        max_grad_norm=1.0,
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=0,
        **kwargs,
    )
    return MaTVLMDistillationTrainer(
        model=student,
        teacher_model=teacher,
        distill_args=distill,
        args=args,
        train_dataset=items,
        data_collator=LLaVACollator(pad_token_id=0),
    )


def batch_of(items):
    return LLaVACollator(pad_token_id=0)(items)


def eval_losses(trainer, batch):
    with torch.no_grad():
        terms = trainer.compute_distillation_losses(trainer.model, batch)
    return {k: float(terms[k]) for k in ("loss", "l_layer", "l_prob", "l_ce")}


# ----------------------------------------------------------------------------------------------------------------


def test_all_distillation_losses_zero_when_student_is_teacher(tmp_path):
    teacher = tiny_model("phi", mamba_layers=())
    student = copy.deepcopy(teacher)
    items = make_items(teacher.config)
    trainer = make_trainer(tmp_path, teacher, student, items, mode="all", distill={"gamma": 1.0})
    terms = trainer.compute_distillation_losses(trainer.model, batch_of(items))
    assert terms["l_layer"].item() == 0.0
    assert terms["l_prob"].item() == 0.0  # exactly: identical logits
    for positions in ("answer",):
        assert (
            kl_loss(
                terms["outputs"].logits, terms["outputs"].logits, positions=positions, labels=batch_of(items)["labels"]
            ).item()
            == 0.0
        )
    # the only non-zero term is the CE on the labels, and it equals the model's own loss
    batch = batch_of(items)
    ref = teacher(**batch, use_cache=False).loss
    torch.testing.assert_close(terms["l_ce"], ref)
    assert terms["loss"].item() == pytest.approx(ref.item())


@pytest.mark.parametrize("lm_type", ["phi", "llama", "qwen2"])
def test_layer_loss_zero_for_identical_hybrid_layers(lm_type):
    """Student layer i on the captured teacher input reproduces the captured teacher output exactly when the two
    layers are the same (a hybrid 'teacher' = copy of the student)."""
    _, student = make_pair(mamba_layers=(1, 5), lm_type=lm_type)
    other = copy.deepcopy(student)
    batch = batch_of(make_items(student.config))
    with torch.no_grad(), capture_layer_io(other.decoder_layers, [1, 5]) as cap:
        other(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
        for i in (1, 5):
            out = apply_decoder_layer(student.decoder_layers[i], cap[i][0], batch["attention_mask"])
            assert layer_loss(out, cap[i][1], attention_mask=batch["attention_mask"]).item() == 0.0


def test_layer_loss_is_fed_the_teacher_hidden_state(tmp_path):
    """Perturb a frozen student layer before the Mamba layers: the student's own hidden states then differ from the
    teacher's, and L_layer must equal the reference computed from the teacher's hidden states."""
    mamba = (2, 5)  # 5 is the last layer: its output is not in hidden_states (the last entry is final-normed)
    teacher, student = make_pair(mamba_layers=mamba)
    with torch.no_grad():
        student.decoder_layers[1].mlp.fc1.weight.add_(0.5 * torch.randn_like(student.decoder_layers[1].mlp.fc1.weight))
    items = make_items(teacher.config)
    trainer = make_trainer(tmp_path, teacher, student, items)
    batch = batch_of(items)
    mask = batch["attention_mask"]
    got = eval_losses(trainer, batch)["l_layer"]

    fwd = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        last = {}
        hook = teacher.decoder_layers[5].register_forward_hook(lambda m, a, o: last.__setitem__("out", o))
        t_hs = teacher(**fwd, use_cache=False, output_hidden_states=True).hidden_states
        hook.remove()
        s_hs = student(**fwd, use_cache=False, output_hidden_states=True).hidden_states
        # transformers 5: hidden_states[-1] is final_layernorm(last layer output), not the layer output
        assert not torch.allclose(t_hs[-1], last["out"])
        torch.testing.assert_close(t_hs[-1], teacher.language_model.final_layernorm(last["out"]))
        assert not torch.allclose(s_hs[2], t_hs[2])  # the perturbation reached the student's Mamba layer input

        def frob(x, y):  # the authors' torch.norm per sample (their batch size is 1), averaged over samples
            return torch.stack([torch.norm((x - y)[j] * mask[j, :, None], p=2) for j in range(len(x))]).mean()

        def student_layer(i, h):
            return student.decoder_layers[i](h, mamba_mask=mask)

        reference = frob(student_layer(2, t_hs[2]), t_hs[3]) + frob(student_layer(5, t_hs[5]), last["out"])
        with_student_input = frob(student_layer(2, s_hs[2]), t_hs[3]) + frob(student_layer(5, s_hs[5]), last["out"])
        with_normed_last = frob(student_layer(2, t_hs[2]), t_hs[3]) + frob(student_layer(5, t_hs[5]), t_hs[6])
    assert got == pytest.approx(reference.item(), rel=1e-5)
    assert abs(with_student_input.item() - got) > 1e-2 * got
    assert abs(with_normed_last.item() - got) > 1e-2 * got


def test_kl_matches_the_authors_batchmean_and_answer_mode():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 7, 11, generator=g), torch.randn(3, 7, 11, generator=g)
    T = 2.0
    authors = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T**2
    torch.testing.assert_close(kl_loss(s, t, temperature=T), authors)
    # batchmean on (b, l, v) = sum over positions and vocab / b (not a per-token mean)
    per_token = (F.softmax(t / T, -1) * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum(-1)
    torch.testing.assert_close(authors, per_token.sum() / 3 * T**2)
    # padding positions are left out
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    torch.testing.assert_close(kl_loss(s, t, temperature=T, attention_mask=mask), (per_token * mask).sum() / 3 * T**2)
    # "answer": logits that predict a supervised token, mean per token
    labels = torch.full((3, 7), -100)
    labels[0, 3:5] = 1
    labels[2, 6] = 2
    sel = [(0, 2), (0, 3), (2, 5)]
    ref = torch.stack([per_token[b, p] for b, p in sel]).mean() * T**2
    torch.testing.assert_close(kl_loss(s, t, temperature=T, positions="answer", labels=labels), ref)


def test_training_lowers_losses_and_touches_only_trainable(tmp_path):
    teacher, student = make_pair(mamba_layers=(1, 3))
    items = make_items(teacher.config)
    trainer = make_trainer(tmp_path, teacher, student, items, steps=12, lr=3e-3)
    batch = batch_of(items)
    before_state = {k: v.clone() for k, v in student.state_dict().items()}
    before = eval_losses(trainer, batch)
    trainer.train()
    after = eval_losses(trainer, batch)
    assert after["l_prob"] < 0.7 * before["l_prob"], (before, after)
    assert after["l_layer"] < 0.7 * before["l_layer"], (before, after)

    trainable = set(trainable_parameter_names(student, "mamba+connector"))
    assert trainable == {n for n, p in student.named_parameters() if p.requires_grad}
    assert any(n.startswith("model.connector.") for n in trainable)
    assert all(n.startswith("model.connector.") or ".self_attn." in n for n in trainable)
    for name, value in student.state_dict().items():
        if name in trainable:
            assert not torch.equal(value, before_state[name]), f"{name} did not change"
        else:
            assert torch.equal(value, before_state[name]), f"frozen {name} changed"
    # the teacher is untouched too
    assert not any(p.requires_grad for p in teacher.parameters())

    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert logged and all({"l_layer", "l_prob", "l_ce", "l_total"} <= set(e) for e in logged)
    assert logged[-1]["l_prob"] < logged[0]["l_prob"]
    assert logged[0]["l_total"] == pytest.approx(logged[0]["l_layer"] + logged[0]["l_prob"], rel=1e-4)


def test_train_modes():
    _, student = make_pair(mamba_layers=(1, 3))
    names = dict(student.named_parameters())
    mamba = set(trainable_parameter_names(student, "mamba"))
    assert mamba and all(
        n.startswith(("model.language_model.layers.1.self_attn.", "model.language_model.layers.3.self_attn."))
        for n in mamba
    )
    with_mlp = set(trainable_parameter_names(student, "mamba+mlp+connector"))
    assert with_mlp - set(trainable_parameter_names(student, "mamba+connector")) == {
        n for n in names if n.startswith(("model.language_model.layers.1.mlp.", "model.language_model.layers.3.mlp."))
    }
    everything = set(trainable_parameter_names(student, "all"))
    left_out = set(names) - everything
    # only vision parameters that cannot reach the LM (pooling head, post_layernorm, last encoder layer)
    assert left_out and all(n.startswith("model.vision_tower.") for n in left_out)
    assert any(".head." in n for n in left_out) and any("layers.1." in n for n in left_out)
    assert not any("layers.0." in n for n in left_out)
    set_trainable(student, "mamba")
    assert {n for n, p in student.named_parameters() if p.requires_grad} == mamba
    teacher_like = tiny_model("phi", mamba_layers=())
    with pytest.raises(ValueError, match="needs Mamba layers"):
        set_trainable(teacher_like, "mamba+connector")


def test_optimizer_groups_and_wsd_schedule(tmp_path):
    teacher, student = make_pair(mamba_layers=(1, 3))
    trainer = make_trainer(
        tmp_path,
        teacher,
        student,
        make_items(teacher.config),
        lr=2e-4,
        lr_scheduler_type="warmup_stable_decay",
        warmup_steps=0.1,
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    opt = trainer.optimizer
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    names = {id(p): n for n, p in student.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.01 for p in g["params"]}
    not_decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert decayed | not_decayed == trainable and not decayed & not_decayed
    for leaf in ("A_log", "dt_bias", "D", "norm_weight", "in_proj.bias", "out_proj.bias", "conv1d.bias"):
        assert f"model.language_model.layers.1.self_attn.{leaf}" in not_decayed
    assert "model.connector.0.bias" in not_decayed
    for w in ("self_attn.in_proj.weight", "self_attn.out_proj.weight", "self_attn.conv1d.weight"):
        assert f"model.language_model.layers.1.{w}" in decayed
    assert "model.connector.0.weight" in decayed

    lrs = []
    for _ in range(100):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        opt.step()
        trainer.lr_scheduler.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(1e-4)  # linear warmup over 10 steps
    assert all(lr == pytest.approx(2e-4) for lr in lrs[10:91])  # stable
    assert lrs[95] < 2e-4 and lrs[99] < 0.05 * 2e-4  # decay over the last 10 steps
    assert trainer.args.lr_scheduler_kwargs["num_decay_steps"] == 10


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    teacher, student = make_pair(mamba_layers=(1, 3))
    items = make_items(teacher.config)
    trainer = make_trainer(tmp_path, teacher, student, items)
    batch = batch_of(items)

    def grads():
        student.zero_grad(set_to_none=True)
        trainer.compute_loss(trainer.model, batch).backward()
        return {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}

    plain = grads()
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert student.decoder_layers[1].gradient_checkpointing
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_text_only_batch_gives_zero_connector_gradients(tmp_path):
    teacher, student = make_pair(mamba_layers=(1, 3))
    items = [make_items(teacher.config)[1]]
    trainer = make_trainer(tmp_path, teacher, student, items)
    trainer.compute_loss(trainer.model, batch_of(items)).backward()
    for name, p in student.named_parameters():
        if name.startswith("model.connector."):
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0
        elif p.requires_grad:
            assert p.grad is not None


def test_bf16_autocast_step(tmp_path):
    teacher, student = make_pair(mamba_layers=(1, 3))
    items = make_items(teacher.config)
    trainer = make_trainer(tmp_path, teacher, student, items, steps=2, bf16=True, gradient_checkpointing=True)
    trainer.train()
    assert next(teacher.parameters()).dtype == torch.bfloat16  # teacher in the mixed-precision dtype
    assert next(student.parameters()).dtype == torch.float32  # fp32 master weights
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert logged and all(math.isfinite(e["l_layer"]) and math.isfinite(e["l_prob"]) for e in logged)


def test_answer_kl_and_mse_variants(tmp_path):
    teacher, student = make_pair(mamba_layers=(1, 3))
    items = make_items(teacher.config)
    trainer = make_trainer(
        tmp_path,
        teacher,
        student,
        items,
        distill=DistillationArguments(kl_positions="answer", layer_loss="mse", gamma=0.5),
    )
    batch = batch_of(items)
    terms = eval_losses(trainer, batch)
    assert terms["loss"] == pytest.approx(terms["l_layer"] + terms["l_prob"] + 0.5 * terms["l_ce"], rel=1e-5)
    with pytest.raises(ValueError, match="kl_positions"):
        DistillationArguments(kl_positions="prompt")


def test_cli_config_yaml_and_flags(tmp_path):
    import json
    from pathlib import Path

    from matvlm_hf.recipe import DistillationRecipe
    from matvlm_hf.train_cli import DEFAULTS, parse_config

    root = Path(__file__).resolve().parents[1]
    paths = ["--student", "s", "--teacher", "t", "--data", "d.json", "--output", "o"]
    cfg = parse_config(["--config", str(root / "examples/configs/distill_paper.yaml"), *paths])
    # the paper's recipe
    assert (cfg["alpha"], cfg["beta"], cfg["gamma"], cfg["temperature"]) == (1.0, 1.0, 0.0, 1.0)
    assert (cfg["learning_rate"], cfg["weight_decay"], cfg["adam_beta1"], cfg["adam_beta2"]) == (2e-4, 0.01, 0.9, 0.95)
    assert (cfg["lr_scheduler"], cfg["warmup_ratio"], cfg["decay_ratio"]) == ("warmup_stable_decay", 0.1, 0.1)
    assert (cfg["global_batch_size"], cfg["max_length"], cfg["max_grad_norm"], cfg["num_epochs"]) == (
        64,
        1428,
        0.1,
        1.0,
    )
    assert cfg["train_mode"] == "mamba+connector" and cfg["gradient_checkpointing"] is True
    assert {k: DEFAULTS[k] for k in ("alpha", "learning_rate", "global_batch_size")} == {
        k: cfg[k] for k in ("alpha", "learning_rate", "global_batch_size")
    }
    # flags override the YAML
    cfg = parse_config(
        [
            "--config",
            str(root / "examples/configs/distill_paper.yaml"),
            *paths,
            "--learning-rate",
            "1e-3",
            "--gradient-checkpointing",
            "false",
            "--kl-positions",
            "answer",
            "--resume",
        ]
    )
    assert cfg["learning_rate"] == 1e-3 and cfg["gradient_checkpointing"] is False
    assert cfg["kl_positions"] == "answer" and cfg["resume"] is True
    assert DistillationRecipe(per_device_batch_size=1).gradient_accumulation(4) == 16
    assert DistillationRecipe(per_device_batch_size=2).gradient_accumulation(1) == 32
    with pytest.raises(ValueError, match="not a multiple"):
        DistillationRecipe(per_device_batch_size=3).gradient_accumulation(1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 1e-3\n")
    with pytest.raises(SystemExit, match="unknown key"):
        parse_config(["--config", str(bad), *paths])
    with pytest.raises(SystemExit, match="--teacher"):
        parse_config(["--student", "s", "--data", "d", "--output", "o"])
    ds = json.loads((root / "examples/configs/ds_zero2.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    offload = json.loads((root / "examples/configs/ds_zero2_offload.json").read_text())
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    # the Trainer's torch AdamW steps on the CPU: DeepSpeed would otherwise demand its JIT-built DeepSpeedCPUAdam
    assert offload["zero_force_ds_cpu_optimizer"] is False and "optimizer" not in offload
    assert {k: v for k, v in offload.items() if k not in ("zero_optimization", "zero_force_ds_cpu_optimizer")} == {
        k: v for k, v in ds.items() if k != "zero_optimization"
    }


def test_text_only_batch_readies_gradients_in_the_image_batch_order():
    """Under `vision_path_in_graph` a text-only batch gives the connector a gradient (exactly zero) at the point of
    the backward where an image batch gives it one: every trainable parameter's gradient becomes ready in the same
    order for both kinds of batch (what ZeRO-2's bucketed reduction across processes needs), and the loss and the
    other gradients are those of the plain text-only pass."""
    _, student = make_pair(mamba_layers=(1, 3))
    set_trainable(student, "mamba+connector")
    student.train()
    image, text = make_items(student.config)

    def backward_order(item, vision_path):
        order = []
        hooks = [
            p.register_post_accumulate_grad_hook(lambda p, name=name: order.append(name))
            for name, p in student.named_parameters()
            if p.requires_grad
        ]
        student.zero_grad(set_to_none=True)
        kwargs = {"pixel_values": item["pixel_values"]} if "pixel_values" in item else {}
        with vision_path_in_graph(student, enabled=vision_path):
            loss = student(input_ids=item["input_ids"][None], labels=item["labels"][None], **kwargs).loss
        loss.backward()
        for hook in hooks:
            hook.remove()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        return order, loss.detach(), grads

    image_order, _, _ = backward_order(image, False)
    text_order, text_loss, text_grads = backward_order(text, True)
    plain_order, plain_loss, plain_grads = backward_order(text, False)
    assert text_order == image_order and any(n.startswith("model.connector.") for n in text_order)
    assert not any(n.startswith("model.connector.") for n in plain_order)  # a plain text-only pass skips it
    assert torch.equal(text_loss, plain_loss)
    for name, grad in text_grads.items():
        expected = plain_grads.get(name, torch.zeros_like(grad))
        assert torch.equal(grad, expected), name


def test_peak_memory_and_step_time_reach_trainer_state(tmp_path, monkeypatch):
    """`peak_gib` and `step_s` land in trainer_state.json's log_history (Trainer.log appends a copy of the logs
    before the callbacks run: writing only into `logs` printed them and lost them, seen on the GPU in issue 18)."""
    from matvlm_hf.training import measure

    monkeypatch.setattr(measure, "peak_gib", lambda: 1.5)  # a CPU has no CUDA allocator to ask
    teacher, student = make_pair(mamba_layers=(1, 3))
    trainer = make_trainer(tmp_path, teacher, student, make_items(teacher.config), steps=2)
    timer = measure.StepSeconds()
    trainer.add_callback(measure.PeakMemory())
    trainer.add_callback(timer)
    trainer.train()
    steps = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["peak_gib"] for e in steps] == [1.5, 1.5]
    assert [e["step_s"] for e in steps] == [round(t, 4) for t in timer.times] and all(t > 0 for t in timer.times)


def test_first_step_fails_naming_a_conv_that_gets_no_gradient(tmp_path, monkeypatch):
    """The fault of issue 21 on CPU: a forward-only conv kernel (its output outside autograd) leaves every Mamba
    conv without gradient; the first training step stops and names exactly those parameters."""
    import matvlm_hf.mamba2_mixer as mixer

    real = mixer.causal_conv1d_blc

    def forward_only(*args, **kwargs):
        with torch.no_grad():
            return real(*args, **kwargs)

    monkeypatch.setattr(mixer, "causal_conv1d_blc", forward_only)
    teacher, student = make_pair(mamba_layers=(1, 3))
    items = make_items(teacher.config)
    trainer = make_trainer(
        tmp_path, teacher, student, items, steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=1
    )
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    with pytest.raises(GradientCheckError) as err:
        trainer.train()
    assert err.value.missing == sorted(
        f"model.language_model.layers.{i}.self_attn.conv1d.{w}" for i in (1, 3) for w in ("bias", "weight")
    )
    assert "layers.1.self_attn.conv1d.weight" in str(err.value)
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())  # no optimizer step was taken


def test_first_step_fails_naming_a_trainable_parameter_outside_the_loss(tmp_path):
    teacher, student = make_pair(mamba_layers=(1, 3))
    items = make_items(teacher.config)
    trainer = make_trainer(tmp_path, teacher, student, items)
    post_norm = "model.vision_tower.post_layernorm.weight"
    dict(student.named_parameters())[post_norm].requires_grad_(True)  # the vision head never reaches the LM
    with pytest.raises(GradientCheckError, match="post_layernorm.weight") as err:
        trainer.train()
    assert set(err.value.missing) == {post_norm}


def test_gradient_check_runs_once_and_passes_on_a_sound_run(tmp_path):
    teacher, student = make_pair(mamba_layers=(1, 3))
    items = make_items(teacher.config)
    trainer = make_trainer(
        tmp_path,
        teacher,
        student,
        items,
        steps=2,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=1,
        gradient_checkpointing=True,
    )
    assert not trainer._gradients_checked
    trainer.train()
    assert trainer._gradients_checked and trainer.state.global_step == 2
