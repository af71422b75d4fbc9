"""The study pipeline at micro scale: teacher stage, two variants through the real converter and Trainer, report."""

import json

from matvlm_hf import study

MICRO = [
    "n_train=64",
    "n_test=20",
    "vision_pretrain_steps=5",
    "teacher_steps=6",
    "teacher_batch_size=8",
    "eval_every=3",
    "log_every=3",
    "distill_steps=3",
    "distill_batch_size=4",
    "eval_batch_size=20",
    "device='cpu'",
    "lm={'hidden_size':64,'intermediate_size':128,'num_hidden_layers':4,'num_attention_heads':4,'vocab_size':1280}",
]


def test_study_stages_and_report(tmp_path):
    work, docs = tmp_path / "work", tmp_path / "docs"
    study.main(["teacher", "--workdir", str(work), "--set", *MICRO])
    teacher = json.loads((work / "teacher.json").read_text())
    assert teacher["knobs"]["lm"]["num_hidden_layers"] == 4 and teacher["accuracy"]["total"] == 20
    assert (work / "teacher-tinyllava" / "model.safetensors").exists()
    study.main(["variants", "--workdir", str(work), "--only", "h50", "h25-random-init", "--jobs", "2"])
    h50 = json.loads((work / "variants" / "h50.json").read_text())
    rnd = json.loads((work / "variants" / "h25-random-init.json").read_text())
    assert h50["mamba_layers"] == [0, 2] and rnd["mamba_layers"] == [0] and rnd["init"] == "random"
    assert h50["distill_steps"] == 3 and len(h50["log"]) == 3  # the teacher's recorded knobs carry over
    assert all({"l_layer", "l_prob", "l_ce"} <= set(e) for e in h50["log"])
    study.main(
        [
            "variant",
            "--workdir",
            str(work),
            "--name",
            "h-layer1",
            "--layers",
            "1",
            "--set",
            "train_mode=mamba+mlp+connector",
        ]
    )
    given = json.loads((work / "variants" / "h-layer1.json").read_text())
    assert given["mamba_layers"] == [1] and given["ratio"] == 0.25 and given["placement"] == "given"
    assert given["train_mode"] == "mamba+mlp+connector"
    text = study.main(["report", "--workdir", str(work), "--docs", str(docs)]) or (docs / "README.md").read_text()
    assert text.index("| h50 | [0, 2]") < text.index(
        "| h25-random-init |"
    )  # in VARIANTS order and "| h25-random-init | [0]" in text
    assert "| init | random | random (" in text  # only the random-init variant ran: ours has one entry
    assert "| ratio | 50 % |" in text and (docs / "study.png").stat().st_size > 10_000
    extras = text.index("### Other distillation recipes")  # a variant outside VARIANTS gets its own table
    assert text.index("| h-layer1 | [1] (given, attention init) | layer+prob (mamba+mlp+connector trained) |") > extras
    summary = json.loads((docs / "study.json").read_text())
    assert set(summary["variants"]) == {"h50", "h25-random-init", "h-layer1"}
    assert "log" not in summary["variants"]["h50"]


def test_set_parses_literals_and_rejects_unknown_knobs():
    assert study.parse_sets(["teacher_steps=10", "device=cpu", "captions=False"]) == {
        "teacher_steps": 10,
        "device": "cpu",
        "captions": False,
    }
    try:
        study.parse_sets(["no_such_knob=1"])
    except SystemExit as e:
        assert "no_such_knob" in str(e)
    else:
        raise AssertionError("unknown knob accepted")
