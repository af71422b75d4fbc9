"""A small, deterministic synthetic visual-QA world.

Scenes are a plain background with 1-4 coloured shapes placed in a 2x2 grid
(one object per cell) and, optionally, a short capital-letter text in a free
cell.  Questions come in seven types (``color``, ``shape``, ``count``,
``position``, ``relation``, ``size``, ``text``), each with a short answer from
a closed vocabulary, and are only asked when they are unambiguous for their
scene.  Everything is a pure function of ``(seed, split, index)``, so datasets
are byte-for-byte reproducible.

Typical use::

    paths = make_dataset("data/svqa", n_train=20000, n_test=1000)
    samples = generate_samples(64, image_size=64, seed=0)   # in memory
    result = score({"test_000000": "red"}, json.load(open(paths["test"])))

or ``python -m matvlm_hf.synthetic_vqa --out data/svqa --n-train 20000 --n-test 1000``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from PIL import Image, ImageDraw, ImageFont

# ----------------------------------------------------------------------------
# The world's vocabulary
# ----------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 220, 0),
    "green": (30, 170, 50),
    "blue": (40, 90, 235),
    "purple": (150, 50, 200),
}
SIZES: tuple[str, ...] = ("small", "large")
# Object diameter as a fraction of the grid cell.
SIZE_FRACTION: dict[str, float] = {"small": 0.42, "large": 0.80}
# Neutral backgrounds (never confusable with an object colour) and the text colour on each.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "light gray": (195, 195, 195),
    "dark gray": (70, 70, 70),
    "black": (15, 15, 15),
}
TEXT_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (0, 0, 0),
    "light gray": (0, 0, 0),
    "dark gray": (255, 255, 255),
    "black": (255, 255, 255),
}
GRID = 2  # 2x2 grid of cells, row 0 = top, col 0 = left
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (0, 1): "top right",
    (1, 0): "bottom left",
    (1, 1): "bottom right",
}
TEXT_ALPHABET = "ABEHKMTX"
TEXT_PROBABILITY = 0.5  # chance a scene with a free cell carries text
MAX_OBJECTS = 4

QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "position", "relation", "size", "text")
# Also accepted where question types are chosen, but not a default: "caption" (a full scene description).
EXTRA_QUESTION_TYPES: tuple[str, ...] = ("caption",)


# ----------------------------------------------------------------------------
# Scene description
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    """One shape in one grid cell; ``offset`` is a jitter in [-1, 1]^2 (fraction of the free room)."""

    shape: str
    color: str
    size: str
    row: int
    col: int
    offset: tuple[float, float] = (0.0, 0.0)

    @property
    def position(self) -> str:
        return POSITIONS[(self.row, self.col)]


@dataclass(frozen=True)
class Scene:
    """A full scene description; the image is a pure function of it and the image size."""

    background: str
    objects: tuple[SceneObject, ...]
    text: str | None = None
    text_cell: tuple[int, int] | None = None
    text_offset: tuple[float, float] = (0.0, 0.0)

    @property
    def key(self) -> str:
        """Content hash of the *semantic* scene (jitter ignored), used to keep splits disjoint."""
        content = {
            "background": self.background,
            "objects": sorted((o.row, o.col, o.shape, o.color, o.size) for o in self.objects),
            "text": self.text,
            "text_cell": self.text_cell,
        }
        return hashlib.sha1(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _jitter(rng: random.Random) -> tuple[float, float]:
    return (round(rng.uniform(-1, 1), 2), round(rng.uniform(-1, 1), 2))


def sample_scene(rng: random.Random) -> Scene:
    """Draw a random scene: 1-4 objects in distinct cells, text in a free cell with prob 0.5."""
    cells = list(POSITIONS)
    rng.shuffle(cells)
    n_objects = rng.randint(1, MAX_OBJECTS)
    objects = tuple(
        SceneObject(
            shape=rng.choice(SHAPES),
            color=rng.choice(list(COLORS)),
            size=rng.choice(SIZES),
            row=r,
            col=c,
            offset=_jitter(rng),
        )
        for r, c in sorted(cells[:n_objects])
    )
    text = text_cell = None
    text_offset = (0.0, 0.0)
    if n_objects < len(cells) and rng.random() < TEXT_PROBABILITY:
        text = "".join(rng.choice(TEXT_ALPHABET) for _ in range(rng.randint(2, 3)))
        text_cell = cells[n_objects]
        text_offset = _jitter(rng)
    return Scene(rng.choice(list(BACKGROUNDS)), objects, text, text_cell, text_offset)


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's default font, scalable when FreeType is available (bitmap fallback otherwise)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font, scaled as a patch later
        return ImageFont.load_default()


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, d: float, fill: tuple[int, int, int]
) -> None:
    r = d / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.88  # visually balance the area against the circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        t = r / 3
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _draw_text(img: Image.Image, text: str, box: tuple[float, float, float, float], fill: tuple[int, int, int]) -> None:
    """Render ``text`` with the default font, scaled to fit ``box`` (x0, y0, x1, y1), centred."""
    x0, y0, x1, y1 = box
    font = _font(max(8, int(y1 - y0)))
    left, top, right, bottom = font.getbbox(text)
    patch = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(patch).text((-left, -top), text, fill=255, font=font)
    scale = min((x1 - x0) / patch.width, (y1 - y0) / patch.height)
    patch = patch.resize(
        (max(1, round(patch.width * scale)), max(1, round(patch.height * scale))), Image.Resampling.LANCZOS
    )
    x = round((x0 + x1 - patch.width) / 2)
    y = round((y0 + y1 - patch.height) / 2)
    img.paste(Image.new("RGB", patch.size, fill), (x, y), patch)


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw ``scene`` as a square RGB image (supersampled then box-downscaled for anti-aliasing)."""
    if image_size < 8:
        raise ValueError("image_size must be at least 8")
    ss = 4 if image_size <= 128 else 2
    canvas = image_size * ss
    cell = canvas / GRID
    img = Image.new("RGB", (canvas, canvas), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        d = cell * SIZE_FRACTION[obj.size]
        room = (cell * 0.94 - d) / 2
        cx = (obj.col + 0.5) * cell + obj.offset[0] * room
        cy = (obj.row + 0.5) * cell + obj.offset[1] * room
        _draw_shape(draw, obj.shape, cx, cy, d, COLORS[obj.color])
    if scene.text and scene.text_cell is not None:
        row, col = scene.text_cell
        w, h = cell * (0.80 if len(scene.text) == 3 else 0.60), cell * 0.42
        cx = (col + 0.5) * cell + scene.text_offset[0] * (cell * 0.92 - w) / 2
        cy = (row + 0.5) * cell + scene.text_offset[1] * (cell * 0.92 - h) / 2
        _draw_text(img, scene.text, (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), TEXT_COLORS[scene.background])
    if ss > 1:
        img = img.resize((image_size, image_size), Image.Resampling.BOX)
    return img


# ----------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------

_ATTRIBUTE_SETS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("color",),
    ("size",),
    ("color", "shape"),
    ("size", "shape"),
    ("size", "color"),
    ("size", "color", "shape"),
)


def _refs(scene: Scene, obj: SceneObject, allowed: set[str]) -> list[str]:
    """Referring expressions ("the red circle", "the small object", ...) that pick out only ``obj``."""
    refs = []
    for attrs in _ATTRIBUTE_SETS:
        if not set(attrs) <= allowed:
            continue
        matches = [o for o in scene.objects if all(getattr(o, a) == getattr(obj, a) for a in attrs)]
        if len(matches) == 1:
            words = [getattr(obj, a) for a in attrs if a != "shape"]
            words.append(obj.shape if "shape" in attrs else "object")
            refs.append("the " + " ".join(words))
    return refs


def _pick_ref(
    scene: Scene, rng: random.Random, allowed: set[str], candidates: Sequence[SceneObject] | None = None
) -> tuple[SceneObject, str] | None:
    options = [(o, r) for o in (candidates or scene.objects) for r in [_refs(scene, o, allowed)] if r]
    if not options:
        return None
    obj, refs = rng.choice(options)
    return obj, rng.choice(refs)


def _q_color(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    picked = _pick_ref(scene, rng, {"size", "shape"})
    if picked is None:
        return None
    obj, ref = picked
    template = rng.choice(["What color is {r}?", "What is the color of {r}?", "Which color does {r} have?"])
    return template.format(r=ref), obj.color


def _q_shape(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    picked = _pick_ref(scene, rng, {"size", "color"})
    if picked is None:
        return None
    obj, ref = picked
    template = rng.choice(["What shape is {r}?", "What is the shape of {r}?", "Which shape is {r}?"])
    return template.format(r=ref), obj.shape


def _q_size(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    picked = _pick_ref(scene, rng, {"color", "shape"})
    if picked is None:
        return None
    obj, ref = picked
    template = rng.choice(["Is {r} small or large?", "Is {r} large or small?", "What size is {r}?"])
    return template.format(r=ref), obj.size


def _q_position(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    picked = _pick_ref(scene, rng, {"size", "color", "shape"})
    if picked is None:
        return None
    obj, ref = picked
    template = rng.choice(["Where is {r}?", "In which part of the image is {r}?", "Where in the image is {r} located?"])
    return template.format(r=ref), obj.position


COUNT_WEIGHTS: tuple[int, ...] = (1, 2, 2, 2, 2)  # prior over count answers 0..4 (0 rarer)


def _q_count(scene: Scene, rng: random.Random, target: int | None = None) -> tuple[str, str] | None:
    """Count all objects, or those of one colour / shape (possibly 0).

    With ``target`` only questions whose answer is ``target`` are asked (None if the scene has
    none); :func:`iter_samples` draws it once per image from ``COUNT_WEIGHTS`` to balance answers.
    """
    if target is None:
        target = rng.choices(range(MAX_OBJECTS + 1), weights=COUNT_WEIGHTS)[0]
    options: list[tuple[str, str | None]] = []
    if len(scene.objects) == target:
        options.append(("total", None))
    for attr, vocab in (("color", list(COLORS)), ("shape", list(SHAPES))):
        options += [(attr, v) for v in vocab if sum(getattr(o, attr) == v for o in scene.objects) == target]
    if not options:
        return None
    kind = rng.choice(sorted({k for k, _ in options}))
    value = rng.choice([v for k, v in options if k == kind])
    if kind == "total":
        question = rng.choice(
            ["How many objects are there?", "How many shapes are there?", "How many objects are in the image?"]
        )
    elif kind == "color":
        question = rng.choice(
            [
                "How many {v} objects are there?",
                "How many {v} shapes are there?",
                "How many {v} objects are in the image?",
            ]
        ).format(v=value)
    else:
        question = rng.choice(["How many {v} are there?", "How many {v} are in the image?"]).format(
            v=SHAPE_PLURALS[value]
        )
    return question, str(target)


_RELATIONS: dict[str, list[str]] = {
    "left": ["Is {a} left of {b}?", "Is {a} to the left of {b}?"],
    "right": ["Is {a} right of {b}?", "Is {a} to the right of {b}?"],
    "above": ["Is {a} above {b}?"],
    "below": ["Is {a} below {b}?"],
    "larger": ["Is {a} larger than {b}?", "Is {a} bigger than {b}?"],
    "smaller": ["Is {a} smaller than {b}?"],
}


def _relation_holds(rel: str, a: SceneObject, b: SceneObject) -> bool:
    return {
        "left": a.col < b.col,
        "right": a.col > b.col,
        "above": a.row < b.row,
        "below": a.row > b.row,
        "larger": a.size == "large" and b.size == "small",
        "smaller": a.size == "small" and b.size == "large",
    }[rel]


def _q_relation(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    """Yes/no spatial or size comparison between two distinct, uniquely referable objects.

    Only asked for pairs where the compared attribute differs (different columns for
    left/right, rows for above/below, sizes for larger/smaller), so "no" always means
    "the opposite holds".  Size comparisons never mention size in the references.
    """
    options = []
    for a, b in combinations(scene.objects, 2):
        if a.col != b.col:
            options.append(("horizontal", a, b))
        if a.row != b.row:
            options.append(("vertical", a, b))
        if a.size != b.size:
            options.append(("size", a, b))
    rng.shuffle(options)
    for kind, a, b in options:
        allowed = {"color", "shape"} if kind == "size" else {"size", "color", "shape"}
        refs_a, refs_b = _refs(scene, a, allowed), _refs(scene, b, allowed)
        if not refs_a or not refs_b:
            continue
        if rng.random() < 0.5:
            a, b, refs_a, refs_b = b, a, refs_b, refs_a
        rel = rng.choice(
            {"horizontal": ["left", "right"], "vertical": ["above", "below"], "size": ["larger", "smaller"]}[kind]
        )
        question = rng.choice(_RELATIONS[rel]).format(a=rng.choice(refs_a), b=rng.choice(refs_b))
        return question, "yes" if _relation_holds(rel, a, b) else "no"
    return None


def _q_text(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    if not scene.text:
        return None
    question = rng.choice(
        [
            "What text is written in the image?",
            "What does the text say?",
            "Which letters are written in the image?",
            "What is written in the image?",
        ]
    )
    return question, scene.text


def describe_scene(scene: Scene) -> str:
    """The scene cell by cell: "top left: large red circle; top right: nothing; ...; text: AB." (row-major)."""
    cells = {(o.row, o.col): f"{o.size} {o.color} {o.shape}" for o in scene.objects}
    parts = [f"{name}: {cells.get(rc, 'nothing')}" for rc, name in POSITIONS.items()]
    if scene.text:
        parts.append(f"text: {scene.text}")
    return "; ".join(parts) + "."


def parse_description(text: str) -> dict[str, tuple[str, str, str] | None] | None:
    """Inverse of `describe_scene` for the objects: {position: (size, color, shape) or None}, or None when `text`
    is not a scene description."""
    parts = dict(part.split(": ", 1) for part in text.rstrip(".").split("; ") if ": " in part)
    if not set(POSITIONS.values()) <= set(parts):
        return None
    cells: dict[str, tuple[str, str, str] | None] = {}
    for name in POSITIONS.values():
        words = parts[name].split()
        cells[name] = None if parts[name] == "nothing" else (words[0], " ".join(words[1:-1]), words[-1])
    return cells


def _q_caption(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    """A dense description (LLaVA's captioning stage in miniature): every object, its place, the text."""
    return rng.choice(
        ["Describe the image.", "What is in the image?", "List the objects in the image."]
    ), describe_scene(scene)


_QUESTION_MAKERS = {
    "color": _q_color,
    "shape": _q_shape,
    "count": _q_count,
    "position": _q_position,
    "relation": _q_relation,
    "size": _q_size,
    "text": _q_text,
    "caption": _q_caption,
}


def make_question(
    scene: Scene, question_type: str, rng: random.Random, count_target: int | None = None
) -> tuple[str, str] | None:
    """A random unambiguous ``(question, answer)`` of ``question_type`` for ``scene``, or None.

    ``count_target`` fixes the answer of a ``count`` question (ignored by other types).
    """
    if question_type not in _QUESTION_MAKERS:
        raise ValueError(
            f"unknown question type {question_type!r}; choose from {QUESTION_TYPES + EXTRA_QUESTION_TYPES}"
        )
    if question_type == "count":
        return _q_count(scene, rng, count_target)
    return _QUESTION_MAKERS[question_type](scene, rng)


# ----------------------------------------------------------------------------
# Samples and datasets
# ----------------------------------------------------------------------------


@dataclass
class Sample:
    """One question about one image; several samples may share an image (``image_id``)."""

    id: str
    image_id: str
    image: Image.Image | None
    question: str
    answer: str
    question_type: str
    scene: Scene = field(repr=False)

    def to_llava(self) -> dict[str, Any]:
        """The LLaVA-format record (image path relative to ``images/``)."""
        return {
            "id": self.id,
            "image": f"{self.image_id}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{self.question}"},
                {"from": "gpt", "value": self.answer},
            ],
            "question_type": self.question_type,
        }


def _progress(iterable: Iterable[Any], total: int, desc: str, show: bool | None) -> Iterable[Any]:
    if show is None:
        show = total >= 2000
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img")


def iter_samples(
    n: int,
    *,
    image_size: int = 64,
    seed: int = 0,
    split: str = "train",
    question_types: Sequence[str] | None = None,
    questions_per_image: int = 1,
    exclude_scenes: set[str] | None = None,
    render: bool = True,
    max_tries: int = 10_000,
) -> Iterator[Sample]:
    """Yield ``n * questions_per_image`` samples over ``n`` images, deterministically.

    Image ``i`` of ``split`` uses its own RNG seeded from ``(seed, split, i)``; its question
    types rotate through ``question_types`` (balanced coverage), and its scene is redrawn
    until every requested type has an unambiguous question and the scene's ``key`` is not in
    ``exclude_scenes``; count answers follow ``COUNT_WEIGHTS``.  Ids are ``{split}_{i:06d}``
    (``{split}_{i:06d}_q{j}`` with several questions per image).
    """
    types = list(question_types or QUESTION_TYPES)
    for t in types:
        if t not in _QUESTION_MAKERS:
            raise ValueError(f"unknown question type {t!r}; choose from {QUESTION_TYPES + EXTRA_QUESTION_TYPES}")
    if questions_per_image < 1:
        raise ValueError("questions_per_image must be >= 1")
    k = questions_per_image
    exclude = exclude_scenes or set()
    for i in range(n):
        rng = random.Random(f"matvlm-synthetic-vqa/{seed}/{split}/{i}")
        wanted = [types[(i * k + j) % len(types)] for j in range(k)]
        # Drawn once, before any scene retries, so rejection cannot skew the count answers.
        count_targets: list[int | None] = [
            rng.choices(range(MAX_OBJECTS + 1), weights=COUNT_WEIGHTS)[0] for _ in wanted
        ]
        for attempt in range(max_tries):
            if attempt == 50:  # e.g. "count = 4" and "text" on one image cannot both hold
                count_targets = [None] * k
            scene = sample_scene(rng)
            if scene.key in exclude:
                continue
            qas: list[tuple[str, str]] = []
            for t, target in zip(wanted, count_targets):
                qa = None
                for _ in range(10):  # avoid repeating a question on the same image
                    candidate = make_question(scene, t, rng, target)
                    if candidate is None:
                        break
                    if candidate[0] not in {q for q, _ in qas}:
                        qa = candidate
                        break
                if qa is None:
                    break
                qas.append(qa)
            if len(qas) == k:
                break
        else:
            raise RuntimeError(
                f"could not draw a valid scene for {split} image {i} in {max_tries} tries "
                "(scene space exhausted by exclude_scenes?)"
            )
        image_id = f"{split}_{i:06d}"
        image = render_scene(scene, image_size) if render else None
        for j, (t, (question, answer)) in enumerate(zip(wanted, qas)):
            sample_id = image_id if k == 1 else f"{image_id}_q{j}"
            yield Sample(sample_id, image_id, image, question, answer, t, scene)


def generate_samples(
    n: int,
    *,
    image_size: int = 64,
    seed: int = 0,
    split: str = "train",
    question_types: Sequence[str] | None = None,
    questions_per_image: int = 1,
    exclude_scenes: set[str] | None = None,
    render: bool = True,
    progress: bool | None = None,
) -> list[Sample]:
    """In-memory samples for ``n`` images (see :func:`iter_samples`); trainers can skip the disk.

    To mirror :func:`make_dataset`'s test split, pass ``split="test"`` and
    ``exclude_scenes={s.scene.key for s in train_samples}``.
    """
    it = iter_samples(
        n,
        image_size=image_size,
        seed=seed,
        split=split,
        question_types=question_types,
        questions_per_image=questions_per_image,
        exclude_scenes=exclude_scenes,
        render=render,
    )
    return list(_progress(it, n * questions_per_image, f"{split} samples", progress))


def as_conversations(records: Sequence[dict[str, Any]], seed: int | None = 0) -> list[dict[str, Any]]:
    """Merge the LLaVA records of one image (consecutive, same ``image``) into one multi-turn record.

    With ``seed`` (not None) the turns of each image are shuffled (seeded by image), so that the first
    turn, the one a single-question prompt looks like, is not always the same question type.
    The first human turn keeps ``<image>``; a merged record's id is the image id and its
    ``question_type`` is "multi". Single records pass through unchanged.
    """
    groups: list[list[dict[str, Any]]] = []
    for rec in records:
        if groups and groups[-1][0]["image"] == rec["image"]:
            groups[-1].append(rec)
        else:
            groups.append([rec])
    merged = []
    for group in groups:
        if len(group) == 1:
            merged.append(group[0])
            continue
        if seed is not None:
            random.Random(f"{seed}/{group[0]['image']}").shuffle(group)
        turns = []
        for rec in group:
            for turn in rec["conversations"]:
                turns.append({**turn, "value": turn["value"].replace("<image>\n", "").replace("<image>", "")})
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
        merged.append(
            {
                "id": Path(group[0]["image"]).stem,
                "image": group[0]["image"],
                "conversations": turns,
                "question_type": "multi",
            }
        )
    return merged


def _write_json(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def make_dataset(
    out_dir: str | Path,
    *,
    n_train: int,
    n_test: int,
    image_size: int = 64,
    seed: int = 0,
    question_types: Sequence[str] | None = None,
    questions_per_image: int = 1,
    test_question_types: Sequence[str] | None = None,
    test_questions_per_image: int | None = None,
    progress: bool | None = None,
) -> dict[str, Path]:
    """Write ``images/<id>.png``, ``train.json`` and ``test.json`` (LLaVA format) under ``out_dir``.

    ``n_train``/``n_test`` count images (each carries ``questions_per_image`` questions; the test split
    may differ: ``test_question_types``, ``test_questions_per_image``).  No test scene shares its
    :attr:`Scene.key` with a train scene.  Same arguments -> identical files.
    Returns ``{"images": dir, "train": path, "test": path}``.
    """
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    train_keys: set[str] = set()
    paths: dict[str, Path] = {"images": images}
    test_k = questions_per_image if test_questions_per_image is None else test_questions_per_image
    splits = (
        ("train", n_train, question_types, questions_per_image),
        ("test", n_test, test_question_types or question_types, test_k),
    )
    for split, n, types, k in splits:
        records = []
        it = iter_samples(
            n,
            image_size=image_size,
            seed=seed,
            split=split,
            question_types=types,
            questions_per_image=k,
            exclude_scenes=train_keys if split == "test" else None,
        )
        last_image = None
        for sample in _progress(it, n * k, f"{split} ({out})", progress):
            if sample.image_id != last_image:
                sample.image.save(images / f"{sample.image_id}.png", format="PNG")
                last_image = sample.image_id
                if split == "train":
                    train_keys.add(sample.scene.key)
            records.append(sample.to_llava())
        paths[split] = out / f"{split}.json"
        _write_json(paths[split], records)
    return paths


# ----------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------

_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, articles and extra whitespace; number words -> digits ("two" == "2")."""
    words = _PUNCT.sub(" ", str(s).lower()).split()
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def _reference_answer(sample: dict[str, Any] | Sample) -> tuple[str, str, str]:
    if isinstance(sample, Sample):
        return sample.id, sample.answer, sample.question_type
    answer = sample.get("answer")
    if answer is None:
        answer = next(t["value"] for t in reversed(sample["conversations"]) if t["from"] == "gpt")
    return str(sample["id"]), answer, sample.get("question_type", "unknown")


def score(predictions: dict[str, str], samples: Iterable[dict[str, Any] | Sample]) -> dict[str, Any]:
    """Exact-match accuracy after :func:`normalize_answer`, overall and per question type.

    ``samples`` are LLaVA records (answer = last "gpt" turn) or :class:`Sample` objects;
    missing predictions count as wrong.  Returns ``{"accuracy", "correct", "total", "missing",
    "per_type": {type: {"accuracy", "correct", "total"}}}``.
    """
    per_type: dict[str, dict[str, Any]] = {}
    correct = total = missing = 0
    for sample in samples:
        sid, answer, qtype = _reference_answer(sample)
        stats = per_type.setdefault(qtype, {"accuracy": 0.0, "correct": 0, "total": 0})
        pred = predictions.get(sid)
        ok = pred is not None and normalize_answer(pred) == normalize_answer(answer)
        missing += pred is None
        correct += ok
        total += 1
        stats["correct"] += ok
        stats["total"] += 1
    for stats in per_type.values():
        stats["accuracy"] = stats["correct"] / stats["total"]
    return {
        "accuracy": correct / total if total else 0.0,
        "correct": correct,
        "total": total,
        "missing": missing,
        "per_type": dict(sorted(per_type.items())),
    }


# ----------------------------------------------------------------------------
# Contact sheet and CLI
# ----------------------------------------------------------------------------


def _wrap(text: str, font: Any, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def render_contact_sheet(
    samples: Sequence[Sample], path: str | Path, *, columns: int = 4, max_samples: int = 16, tile: int = 192
) -> Path:
    """Save a PNG grid of up to ``max_samples`` images (upscaled to ``tile`` px) with their Q/A."""
    samples = [s for s in samples if s.image is not None][:max_samples]
    if not samples:
        raise ValueError("no rendered samples to show")
    font = _font(13)
    line_h, pad = 16, 6
    captions = [
        _wrap(f"Q: {s.question}", font, tile - 2 * pad) + _wrap(f"A: {s.answer}", font, tile - 2 * pad) for s in samples
    ]
    cap_h = max(len(c) for c in captions) * line_h + 2 * pad
    rows = -(-len(samples) // columns)
    cols = min(columns, len(samples))
    sheet = Image.new("RGB", (cols * (tile + pad) + pad, rows * (tile + cap_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (sample, caption) in enumerate(zip(samples, captions)):
        x = pad + (k % columns) * (tile + pad)
        y = pad + (k // columns) * (tile + cap_h + pad)
        resample = Image.Resampling.NEAREST if sample.image.width <= tile else Image.Resampling.LANCZOS
        sheet.paste(sample.image.resize((tile, tile), resample), (x, y))
        for m, line in enumerate(caption):
            draw.text(
                (x + 2, y + tile + pad + m * line_h),
                line,
                fill=(0, 0, 0) if m < len(caption) - 1 or not line.startswith("A:") else (0, 110, 0),
                font=font,
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def write_dataset(
    out: str | Path,
    *,
    overwrite: bool = False,
    contact_sheet: str | Path | None = None,
    n_train: int = 10000,
    n_test: int = 1000,
    image_size: int = 64,
    seed: int = 0,
    question_types: Sequence[str] | None = None,
    questions_per_image: int = 1,
) -> dict[str, Path]:
    """`make_dataset` into `out` through a staging folder swapped in at the end (an existing `out` only with
    `overwrite`; UnsafeOutputError otherwise); prints the paths and per-type counts, and saves a PNG grid of the
    first 16 training images to `contact_sheet` when given. Returns the paths (train, test, images)."""
    from ..safe_output import staged_output

    out = Path(out)
    with staged_output(out, overwrite=overwrite, option="--out") as staging:
        built = make_dataset(
            staging,
            n_train=n_train,
            n_test=n_test,
            image_size=image_size,
            seed=seed,
            question_types=question_types,
            questions_per_image=questions_per_image,
        )
    paths = {name: out / p.relative_to(staging) for name, p in built.items()}
    for name, p in paths.items():
        print(f"{name}: {p}")
    for split in ("train", "test"):
        records = json.loads(paths[split].read_text(encoding="utf-8"))
        counts = Counter(r["question_type"] for r in records)
        print(f"{split}: {len(records)} samples  " + "  ".join(f"{t}={counts[t]}" for t in sorted(counts)))
    if contact_sheet:
        sheet_samples = generate_samples(
            16, image_size=image_size, seed=seed, split="train", question_types=question_types
        )  # = the first 16 train images
        print(f"contact sheet: {render_contact_sheet(sheet_samples, contact_sheet)}")
    return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """`matvlm data` (`commands/data.py`, imported when called), kept here for `python -m` and old callers."""
    from ..commands.data import main as command

    return command(argv)


if __name__ == "__main__":
    main()
