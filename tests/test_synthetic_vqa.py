"""Tests for the synthetic visual-QA world (fast: small n, CPU only)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from matvlm_hf import synthetic_vqa as sv

# --- an independent oracle: re-derive every answer from the scene description -------------

COLOR_WORDS = "red|orange|yellow|green|blue|purple"
SHAPE_WORDS = "circle|square|triangle|cross"
REF = re.compile(rf"\bthe (?:(small|large) )?(?:({COLOR_WORDS}) )?({SHAPE_WORDS}|object)\b")
PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}


def resolve(scene: sv.Scene, match: re.Match) -> sv.SceneObject:
    size, color, noun = match.groups()
    found = [
        o
        for o in scene.objects
        if (size is None or o.size == size)
        and (color is None or o.color == color)
        and (noun == "object" or o.shape == noun)
    ]
    assert len(found) == 1, f"ambiguous or dangling reference {match.group(0)!r} in {scene}"
    return found[0]


def oracle(sample: sv.Sample) -> str:
    """The answer recomputed from the question text and the scene, without the generator's code."""
    q, scene, t = sample.question, sample.scene, sample.question_type
    refs = list(REF.finditer(q))
    if t == "color":
        assert len(refs) == 1 and refs[0].group(2) is None  # never names the colour it asks for
        return resolve(scene, refs[0]).color
    if t == "shape":
        assert len(refs) == 1 and refs[0].group(3) == "object"
        return resolve(scene, refs[0]).shape
    if t == "size":
        assert len(refs) == 1 and refs[0].group(1) is None
        return resolve(scene, refs[0]).size
    if t == "position":
        assert len(refs) == 1
        o = resolve(scene, refs[0])
        return f"{'top' if o.row == 0 else 'bottom'} {'left' if o.col == 0 else 'right'}"
    if t == "relation":
        assert len(refs) == 2
        a, b = resolve(scene, refs[0]), resolve(scene, refs[1])
        assert a is not b
        if " left of " in q:
            assert a.col != b.col
            holds = a.col < b.col
        elif " right of " in q:
            assert a.col != b.col
            holds = a.col > b.col
        elif " above " in q:
            assert a.row != b.row
            holds = a.row < b.row
        elif " below " in q:
            assert a.row != b.row
            holds = a.row > b.row
        else:
            assert refs[0].group(1) is None and refs[1].group(1) is None  # size not given away
            assert a.size != b.size
            bigger = " larger than " in q or " bigger than " in q
            assert bigger or " smaller than " in q, q
            holds = (a.size == "large") == bigger
        return "yes" if holds else "no"
    if t == "count":
        m = re.match(rf"How many (?:({COLOR_WORDS}) )?(objects|shapes|{'|'.join(PLURALS)})\b", q)
        assert m, q
        color, noun = m.groups()
        if color:
            return str(sum(o.color == color for o in scene.objects))
        if noun in PLURALS:
            return str(sum(o.shape == PLURALS[noun] for o in scene.objects))
        return str(len(scene.objects))
    if t == "text":
        assert scene.text and re.fullmatch(rf"[{sv.TEXT_ALPHABET}]{{2,3}}", scene.text)
        return scene.text
    raise AssertionError(f"unknown type {t}")


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples() -> list[sv.Sample]:
    return sv.generate_samples(700, seed=123, render=False, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    return sv.make_dataset(tmp_path_factory.mktemp("a"), n_train=42, n_test=21, seed=5, progress=False)


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


# --- dataset files ----------------------------------------------------------------------------


def test_llava_format(dataset):
    assert set(dataset) == {"images", "train", "test"}
    train, test = load(dataset["train"]), load(dataset["test"])
    assert len(train) == 42 and len(test) == 21
    for rec in train + test:
        assert set(rec) == {"id", "image", "conversations", "question_type"}
        assert rec["image"] == f"{rec['id']}.png" and (dataset["images"] / rec["image"]).is_file()
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert human["value"].endswith("?") and gpt["from"] == "gpt" and gpt["value"]
        assert rec["question_type"] in sv.QUESTION_TYPES
    assert len({r["id"] for r in train + test}) == 63


def test_determinism_same_seed_same_bytes(dataset, tmp_path):
    again = sv.make_dataset(tmp_path, n_train=42, n_test=21, seed=5, progress=False)
    for split in ("train", "test"):
        assert again[split].read_bytes() == dataset[split].read_bytes()
    names = sorted(p.name for p in dataset["images"].iterdir())
    assert names == sorted(p.name for p in again["images"].iterdir()) and len(names) == 63
    for name in names:
        a = np.asarray(Image.open(dataset["images"] / name))
        b = np.asarray(Image.open(again["images"] / name))
        assert np.array_equal(a, b)
        assert (dataset["images"] / name).read_bytes() == (again["images"] / name).read_bytes()


def test_different_seeds_differ():
    a = sv.generate_samples(30, seed=1, progress=False)
    b = sv.generate_samples(30, seed=2, progress=False)
    assert [s.scene for s in a] != [s.scene for s in b]
    assert sum(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b)) < 3
    assert [s.question for s in a] != [s.question for s in b]


def test_splits_disjoint_and_match_in_memory(dataset):
    train = sv.generate_samples(42, seed=5, split="train", progress=False)
    test = sv.generate_samples(21, seed=5, split="test", exclude_scenes={s.scene.key for s in train}, progress=False)
    assert {s.scene.key for s in train}.isdisjoint({s.scene.key for s in test})
    # make_dataset writes exactly these samples and pixels
    assert load(dataset["train"]) == [s.to_llava() for s in train]
    assert load(dataset["test"]) == [s.to_llava() for s in test]
    for s in test[:5]:
        on_disk = np.asarray(Image.open(dataset["images"] / f"{s.image_id}.png").convert("RGB"))
        assert np.array_equal(on_disk, np.asarray(s.image))


def test_exclude_scenes_is_honoured():
    first = sv.generate_samples(50, seed=9, split="test", render=False, progress=False)
    banned = {s.scene.key for s in first[::2]}
    again = sv.generate_samples(50, seed=9, split="test", exclude_scenes=banned, render=False, progress=False)
    assert not banned & {s.scene.key for s in again}
    # untouched indices are unchanged (each image has its own RNG stream)
    assert [s.question for s in again[1::2]] == [s.question for s in first[1::2]]


def test_scene_key_ignores_jitter_only():
    obj = sv.SceneObject("circle", "red", "small", 0, 1, (0.1, -0.3))
    a = sv.Scene("black", (obj,))
    b = sv.Scene("black", (sv.SceneObject("circle", "red", "small", 0, 1, (0.9, 0.9)),))
    c = sv.Scene("black", (sv.SceneObject("circle", "red", "large", 0, 1, (0.1, -0.3)),))
    assert a.key == b.key != c.key


# --- answers and coverage ---------------------------------------------------------------------


def test_every_answer_matches_its_scene(samples):
    for s in samples:
        assert s.answer == oracle(s), (s.question, s.answer, s.scene)


def test_answers_in_closed_vocabulary(samples):
    vocab = (
        set(sv.COLORS)
        | set(sv.SHAPES)
        | set(sv.SIZES)
        | set(sv.POSITIONS.values())
        | {"yes", "no"}
        | {str(i) for i in range(sv.MAX_OBJECTS + 1)}
    )
    for s in samples:
        assert s.answer in vocab or (s.question_type == "text" and s.answer == s.scene.text)


def test_scene_constraints(samples):
    for s in samples:
        cells = [(o.row, o.col) for o in s.scene.objects]
        assert 1 <= len(cells) <= 4 and len(set(cells)) == len(cells)
        if s.scene.text:
            assert s.scene.text_cell not in cells


def test_question_type_coverage_and_balance(samples):
    types = Counter(s.question_type for s in samples)
    assert types == {t: 100 for t in sv.QUESTION_TYPES}
    answers = {t: Counter(s.answer for s in samples if s.question_type == t) for t in sv.QUESTION_TYPES}
    assert set(answers["color"]) == set(sv.COLORS)
    assert set(answers["shape"]) == set(sv.SHAPES)
    assert set(answers["position"]) == set(sv.POSITIONS.values())
    assert set(answers["count"]) == {"0", "1", "2", "3", "4"}
    assert max(answers["count"].values()) <= 35  # no dominant count
    for t, pair in (("relation", ("yes", "no")), ("size", ("small", "large"))):
        assert 30 <= answers[t][pair[0]] <= 70, answers[t]
    assert len(answers["text"]) > 80
    for t in sv.QUESTION_TYPES:  # several phrasings per type
        assert len({re.sub(REF, "REF", s.question) for s in samples if s.question_type == t}) >= 2


def test_question_subset_and_several_questions_per_image():
    out = sv.generate_samples(
        12, seed=0, question_types=["count", "text"], questions_per_image=3, render=False, progress=False
    )
    assert len(out) == 36
    assert {s.question_type for s in out} == {"count", "text"}
    assert [s.id for s in out[:3]] == ["train_000000_q0", "train_000000_q1", "train_000000_q2"]
    for i in range(0, 36, 3):
        group = out[i : i + 3]
        assert len({s.image_id for s in group}) == 1 and len({s.question for s in group}) == 3
        assert all(s.answer == oracle(s) for s in group)
    with pytest.raises(ValueError):
        sv.generate_samples(1, question_types=["colour"])


# --- images -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64, 384])
def test_images_decode_with_requested_size(size, tmp_path):
    paths = sv.make_dataset(tmp_path, n_train=3, n_test=2, image_size=size, seed=0, progress=False)
    files = sorted(paths["images"].iterdir())
    assert len(files) == 5
    for f in files:
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size == (size, size) and im.mode == "RGB"


def test_rendering_matches_scene():
    """Each object's colour dominates its own cell; empty cells hold only the background."""
    for s in sv.generate_samples(60, image_size=64, seed=4, progress=False):
        px = np.asarray(s.image).astype(int)
        for r in range(2):
            for c in range(2):
                cell = px[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32].reshape(-1, 3)
                obj = next((o for o in s.scene.objects if (o.row, o.col) == (r, c)), None)
                if obj is not None:
                    near = np.abs(cell - np.array(sv.COLORS[obj.color])).max(axis=1) < 40
                    need = 40 if obj.size == "small" else 150
                    assert near.sum() > need, (obj, near.sum())
                elif s.scene.text_cell != (r, c):
                    assert np.abs(cell - np.array(sv.BACKGROUNDS[s.scene.background])).max() <= 1


def test_text_is_drawn():
    s = next(s for s in sv.generate_samples(10, seed=0, question_types=["text"], progress=False))
    r, c = s.scene.text_cell
    cell = np.asarray(s.image).astype(int)[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32]
    ink = np.abs(cell - np.array(sv.TEXT_COLORS[s.scene.background])).max(axis=2) < 60
    assert ink.sum() > 30


def test_contact_sheet(tmp_path):
    out = sv.render_contact_sheet(sv.generate_samples(6, seed=0, progress=False), tmp_path / "sheet.png", columns=3)
    with Image.open(out) as im:
        assert im.width > 3 * 192 and im.height > 2 * 192


# --- scorer -----------------------------------------------------------------------------------


def test_normalize_answer():
    n = sv.normalize_answer
    assert n("2") == n("two") == n(" Two. ") == "2"
    assert n("Red!") == n("  red ") == "red"
    assert n("Top-Left") == n("top left") == "top left"
    assert n("the circle") == n("A circle") == "circle"
    assert n("Yes.") == "yes" and n("ABK") == "abk"
    assert n("three") != n("2")


def test_score_maths(dataset):
    records = load(dataset["test"])
    perfect = {r["id"]: r["conversations"][-1]["value"] for r in records}
    result = sv.score(perfect, records)
    assert result["accuracy"] == 1.0 and result["correct"] == result["total"] == 21
    assert result["missing"] == 0
    assert sum(v["total"] for v in result["per_type"].values()) == 21

    hand = [
        {
            "id": "a",
            "question_type": "count",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "2"}],
        },
        {
            "id": "b",
            "question_type": "count",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "3"}],
        },
        {
            "id": "c",
            "question_type": "color",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "red"}],
        },
        {
            "id": "d",
            "question_type": "color",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "blue"}],
        },
    ]
    result = sv.score({"a": "Two.", "b": "4", "c": "RED"}, hand)  # d missing
    assert result["total"] == 4 and result["correct"] == 2 and result["missing"] == 1
    assert result["accuracy"] == 0.5
    assert result["per_type"]["count"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert result["per_type"]["color"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert sv.score({}, hand)["accuracy"] == 0.0
    assert sv.score({}, [])["accuracy"] == 0.0


def test_score_accepts_samples(samples):
    preds = {s.id: s.answer for s in samples[:70]}
    result = sv.score(preds, samples[:70])
    assert result["accuracy"] == 1.0 and set(result["per_type"]) == set(sv.QUESTION_TYPES)


# --- CLI --------------------------------------------------------------------------------------


def test_cli(tmp_path, capsys):
    paths = sv.main(
        [
            "--out",
            str(tmp_path / "d"),
            "--n-train",
            "14",
            "--n-test",
            "7",
            "--image-size",
            "32",
            "--seed",
            "1",
            "--contact-sheet",
            str(tmp_path / "sheet.png"),
        ]
    )
    out = capsys.readouterr().out
    assert str(paths["train"]) in out and "train: 14 samples" in out and "test: 7 samples" in out
    assert "color=2" in out and (tmp_path / "sheet.png").is_file()


def test_caption_lists_every_cell_from_the_scene():
    samples = sv.generate_samples(40, image_size=32, seed=3, question_types=["caption"], render=False)
    for s in samples:
        cells = dict(part.split(": ", 1) for part in s.answer.rstrip(".").split("; "))
        for (row, col), name in sv.POSITIONS.items():
            obj = next((o for o in s.scene.objects if (o.row, o.col) == (row, col)), None)
            assert cells[name] == (f"{obj.size} {obj.color} {obj.shape}" if obj else "nothing")
        assert cells.get("text") == s.scene.text
        parsed = sv.parse_description(s.answer)
        assert parsed == {
            name: (o.size, o.color, o.shape)
            if (o := next((o for o in s.scene.objects if sv.POSITIONS[(o.row, o.col)] == name), None))
            else None
            for name in sv.POSITIONS.values()
        }
    assert sv.parse_description("3") is None and sv.parse_description("top left") is None


def test_conversations_merge_one_image_and_shuffle_turn_order():
    types = ["caption", "color", "count", "size"]
    samples = sv.generate_samples(60, image_size=32, seed=1, question_types=types, questions_per_image=4, render=False)
    records = [s.to_llava() for s in samples]
    merged = sv.as_conversations(records, seed=0)
    assert len(merged) == 60
    by_image = {}
    for r in records:
        by_image.setdefault(r["image"], []).append(r)
    first_types = Counter()
    for m in merged:
        originals = by_image[m["image"]]
        text = [t["value"] for t in m["conversations"]]
        assert text[0].startswith("<image>\n") and sum("<image>" in t for t in text) == 1
        pairs = {(q.replace("<image>\n", ""), a) for q, a in zip(text[::2], text[1::2])}
        assert pairs == {
            (r["conversations"][0]["value"].replace("<image>\n", ""), r["conversations"][1]["value"]) for r in originals
        }
        first_q = text[0].replace("<image>\n", "")
        first_types[
            next(r["question_type"] for r in originals if r["conversations"][0]["value"].endswith(first_q))
        ] += 1
    assert set(first_types) == set(types)  # without the shuffle every image would open with "caption"
    assert sv.as_conversations(records, seed=0) == merged  # seeded
