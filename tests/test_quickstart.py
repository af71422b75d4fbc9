"""`matvlm quickstart --fast` end to end (the CI-sized run of the README's main job), and its data layout."""

import json
from collections import Counter

import pytest

from matvlm_hf import quickstart as qs


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("quickstart")
    return work, qs.run(work, fast=True)


def test_fast_quickstart_writes_every_artifact(fast_run):
    work, results = fast_run
    summary = json.loads((work / "summary.json").read_text())
    assert summary["accuracy"] == json.loads(json.dumps(results["accuracy"]))
    assert (work / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tinyllava = json.loads((work / "teacher-tinyllava" / "config.json").read_text())
    assert tinyllava["model_type"] == "tinyllava" and tinyllava["vision_feature_select_strategy"] == "cls_patch"
    n_test = qs.FAST["n_test"]
    for key in ("baseline", "teacher", "hybrid_undistilled", "hybrid_distilled"):
        assert summary["accuracy"][key]["total"] == n_test
        assert set(summary["accuracy"][key]["per_type"]) == set(qs.KNOBS["question_types"])
    assert summary["mamba_layers"] == [0]
    assert summary["distill_log"][-1]["l_total"] < summary["distill_log"][0]["l_total"]
    assert set(summary["example"]) >= {"question", "answer", "teacher", "hybrid_undistilled", "hybrid_distilled"}


def test_teacher_forced_accuracy_matches_greedy_decoding_after_conversion(fast_run):
    """The last teacher-forced score (taken on the trained model in memory) against greedy generation by the
    TinyLLaVA-saved, converted teacher: the save + conversion round trip and `generate` must agree with it."""
    work, results = fast_run
    last = [e for e in results["teacher_log"] if "tf_accuracy" in e][-1]
    assert last["step"] == qs.FAST["teacher_steps"]
    assert abs(last["tf_accuracy"] - results["accuracy"]["teacher"]["accuracy"]) <= 1 / qs.FAST["n_test"]


def test_quickstart_from_a_given_teacher_skips_training(fast_run, tmp_path):
    work, first = fast_run
    results = qs.run(tmp_path, teacher=work / "teacher-tinyllava", fast=True)
    assert results["teacher_given"] and results["teacher_log"] == []
    assert results["accuracy"]["teacher"] == first["accuracy"]["teacher"]  # same teacher, data and seed


def test_training_records_are_conversations_and_test_records_single_questions(fast_run):
    work, _ = fast_run
    train = json.loads((work / "data" / "train.json").read_text())
    test = json.loads((work / "data" / "test.json").read_text())
    k = qs.KNOBS["questions_per_image"] + 1  # + the caption
    assert len(train) == qs.FAST["n_train"] * k and len(test) == qs.FAST["n_test"]
    assert sum(r["question_type"] == "caption" for r in train) == qs.FAST["n_train"]
    assert not any(r["question_type"] == "caption" for r in test)
    data = qs.make_data(work / "data-again", {**qs.KNOBS, **qs.FAST}, 32, 0)
    assert len(data["train"]) == qs.FAST["n_train"]
    assert all(len(r["conversations"]) == 2 * k for r in data["train"])


def test_vision_pretraining_learns_cell_attributes_then_the_frozen_tower_stays_put(fast_run):
    import torch

    from matvlm_hf.data import LLaVADataset
    from matvlm_hf.synthetic_vqa import as_conversations

    work, _ = fast_run
    knobs = {**qs.KNOBS, **qs.FAST, "vision_pretrain_steps": 100, "device": "cpu"}
    records = as_conversations(json.loads((work / "data" / "train.json").read_text()))
    model, tokenizer, processor = qs.build_teacher(knobs, 32, 0)
    items = qs.materialize(LLaVADataset(records, work / "data" / "images", processor))
    log = qs.pretrain_vision(model, records, items, knobs, 0)
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    captions = [t["value"] for r in records for t in r["conversations"] if t["value"].startswith("top left:")]
    assert len(captions) == len(records)
    colours = Counter(
        part.split(": ")[1].split()[1] if part.split(": ")[1] != "nothing" else "nothing"
        for c in captions
        for part in c.rstrip(".").split("; ")[:4]
    )
    majority = colours.most_common(1)[0][1] / sum(colours.values())
    assert log[-1]["accuracy"]["color"] > majority + 0.2  # beats "always the most common colour (or nothing)"
    with pytest.raises(ValueError, match="captions"):
        qs.pretrain_vision(model, [{"conversations": []}] * len(items), items, knobs, 0)

    tower = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
    lm = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    qs.train_teacher(model, items, tokenizer.pad_token_id, {**knobs, "teacher_steps": 2, "log_every": 1}, 0)
    assert all(torch.equal(v, model.vision_tower.state_dict()[k]) for k, v in tower.items())
    assert not all(torch.equal(v, model.language_model.state_dict()[k]) for k, v in lm.items())
