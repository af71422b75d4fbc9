"""lmms-eval integration: the `matvlm` model answers lmms-eval's requests, the synthetic task through the real
lmms-eval CLI scores like the quickstart, and tiny POPE / MME / TextVQA copies in their published layout run through
`matvlm eval`. Skipped only where lmms-eval is absent; CI (MATVLM_REQUIRE_LMMS_EVAL=1) must have it."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("MATVLM_REQUIRE_LMMS_EVAL") != "1":
    pytest.importorskip(
        "lmms_eval",
        reason='lmms-eval is not installed: pip install "matvlm-hf[eval]" && pip install --no-deps "lmms-eval==0.7.3"',
    )
from lmms_eval.api.instance import Instance  # noqa: E402
from PIL import Image  # noqa: E402

from matvlm_hf.chat_template import format_conversation  # noqa: E402
from matvlm_hf.commands import eval as eval_command  # noqa: E402
from matvlm_hf.conversion import convert_tinyllava_to_matvlm  # noqa: E402
from matvlm_hf.fabricate import write_tinyllava_checkpoint  # noqa: E402
from matvlm_hf.integrations.lmms_eval.model import MaTVLM, build_prompt  # noqa: E402
from matvlm_hf.integrations.lmms_eval.tasks import (  # noqa: E402
    PAPER_SUFFIXES,
    synthetic_to_parquet,
    upstream_yaml,
    write_task_dir,
)
from matvlm_hf.quickstart import evaluate  # noqa: E402
from matvlm_hf.synthetic_vqa import make_dataset  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny random TinyLLaVA converted twice (teacher, 50 % hybrid) and an 8-question synthetic test split."""
    root = tmp_path_factory.mktemp("lmms")
    write_tinyllava_checkpoint(root / "tinyllava", seed=0, image_aspect_ratio="pad")
    convert_tinyllava_to_matvlm(root / "tinyllava", root / "teacher", mamba_ratio=0.0, progress=False)
    convert_tinyllava_to_matvlm(root / "tinyllava", root / "hybrid", mamba_ratio=0.5, progress=False)
    make_dataset(root / "data", n_train=0, n_test=8, image_size=32, seed=0, question_types=["color", "count", "shape"])
    return root


@pytest.fixture(scope="module")
def hybrid(work):
    return MaTVLM(pretrained=str(work / "hybrid"), device="cpu", batch_size=1)


def _docs(work: Path) -> list[dict]:
    records = json.loads((work / "data" / "test.json").read_text())
    return [
        {
            "image": Image.open(work / "data" / "images" / r["image"]),
            "question": r["conversations"][0]["value"].replace("<image>", "").strip(),
        }
        for r in records
    ]


def _requests(docs: list[dict], kind: str, second: list) -> list[Instance]:
    def visual(doc):
        return [doc["image"]] if doc.get("image") is not None else []

    return [
        Instance(
            request_type=kind,
            arguments=(doc["question"], extra, visual, i, "t", "test"),
            idx=0,
            metadata={"task": "t", "doc_id": i, "repeats": 1},
        )
        for i, (doc, extra) in enumerate(zip(docs, second))
    ]


def test_entry_point_resolves_the_model_class():
    from lmms_eval.models import get_model

    assert get_model("matvlm") is MaTVLM, "reinstall matvlm-hf (pip install -e .) to register its lmms-eval entry point"


def test_matvlm_hf_imports_without_lmms_eval():
    code = "import sys, matvlm_hf, matvlm_hf.cli; sys.exit('lmms_eval' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_paper_suffixes_are_lmms_evals_prompts():
    from lmms_eval.utils import load_yaml_config

    for task, suffix in PAPER_SUFFIXES.items():
        config = load_yaml_config(str(upstream_yaml(task)), mode="simple")
        assert config["lmms_eval_specific_kwargs"]["default"]["post_prompt"] == suffix, task


def test_batched_generation_with_left_padding_equals_one_by_one(work, hybrid):
    docs = _docs(work)
    docs[3] = {"image": None, "question": "Say something much longer than the other questions, please."}
    gen = [{"max_new_tokens": 6, "temperature": 0, "until": ["ASSISTANT:"]}] * len(docs)
    hybrid.task_dict = {"t": {"test": docs}}
    hybrid.batch_size_per_gpu = 1
    single = hybrid.generate_until(_requests(docs, "generate_until", gen))
    hybrid.batch_size_per_gpu = 3
    batched = hybrid.generate_until(_requests(docs, "generate_until", gen))
    assert batched == single and len(single) == len(docs)
    hybrid.fast_decode = True  # the static-cache decode path (no CUDA graph on a CPU) answers the same
    try:
        assert hybrid.generate_until(_requests(docs, "generate_until", gen)) == single
    finally:
        hybrid.fast_decode = False
    # and one-by-one equals a plain generate() on the TinyLLaVA prompt
    processor, model = hybrid.processor, hybrid.model
    inputs = processor(images=[docs[0]["image"]], text=build_prompt(docs[0]["question"], True), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert (
        single[0]
        == processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        .split("ASSISTANT:")[0]
        .strip()
    )


def test_loglikelihood_equals_a_direct_computation(work, hybrid):
    docs = _docs(work)[:4]
    docs[2] = {"image": None, "question": "A question without an image?"}
    processor, model = hybrid.processor, hybrid.model
    # the model's own greedy 2-token answer to doc 0 is greedy; the others are not necessarily
    prompt0 = processor(images=[docs[0]["image"]], text=build_prompt(docs[0]["question"], True), return_tensors="pt")
    ids = prompt0["input_ids"]
    for _ in range(2):  # two greedy steps, teacher-forced
        with torch.no_grad():
            step = model(input_ids=ids, pixel_values=prompt0["pixel_values"]).logits[0, -1].argmax()
        ids = torch.cat([ids, step.view(1, 1)], dim=1)
    greedy = ids[0, -2:].tolist()
    continuations = [processor.tokenizer.decode(greedy), " red", " two squares", " no"]
    hybrid.task_dict = {"t": {"test": docs}}
    hybrid.batch_size_per_gpu = 3
    got = hybrid.loglikelihood(_requests(docs, "loglikelihood", continuations))
    for doc, continuation, (logprob, is_greedy) in zip(docs, continuations, got):
        has_image = doc["image"] is not None
        text = format_conversation(
            [{"from": "human", "value": ("<image>\n" if has_image else "") + doc["question"]}],
            add_generation_prompt=True,
        )
        context = processor(images=[doc["image"]] if has_image else None, text=text, return_tensors="pt")
        target = processor.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([context["input_ids"], target], dim=1)
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=context.get("pixel_values")).logits[0].double()
        steps = logits[context["input_ids"].shape[1] - 1 : -1].log_softmax(-1)
        expected = steps.gather(-1, target[0][:, None]).sum().item()
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert is_greedy == bool((steps.argmax(-1) == target[0]).all())
    assert got[0][1] is True


@pytest.mark.slow
def test_synthetic_task_through_the_lmms_eval_cli_scores_like_the_quickstart(work, hybrid, tmp_path):
    records = json.loads((work / "data" / "test.json").read_text())
    predictions, _ = evaluate(
        hybrid.model, hybrid.processor, records, work / "data" / "images", batch_size=4, max_new_tokens=16
    )
    # a random model is always wrong; make every other reference its own answer (capitalised, with a full stop:
    # the scorers must normalise) so that the accuracy being compared is 1/2, not 0
    for i, r in enumerate(records):
        if i % 2 == 0:
            r["conversations"][1]["value"] = predictions[r["id"]].capitalize() + "."
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for r in records:
        (data / "images" / r["image"]).write_bytes((work / "data" / "images" / r["image"]).read_bytes())
    (data / "test.json").write_text(json.dumps(records))
    _, expected = evaluate(hybrid.model, hybrid.processor, records, data / "images", batch_size=4, max_new_tokens=16)
    assert 0 < expected["accuracy"] < 1

    task_dir = write_task_dir(
        tmp_path / "tasks", ["matvlm_synthetic"], {"matvlm_synthetic": synthetic_to_parquet(data, tmp_path / "parquet")}
    )
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "matvlm",
        "--model_args",
        f"pretrained={work / 'hybrid'},batch_size=3,device=cpu",
        "--tasks",
        "matvlm_synthetic",
        "--include_path",
        str(task_dir),
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
    ]
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(Path(glob.glob(str(tmp_path / "out" / "*" / "*_results.json"))[0]).read_text())
    assert result["results"]["matvlm_synthetic"]["accuracy,none"] == pytest.approx(expected["accuracy"])
    samples = [json.loads(line) for line in open(glob.glob(str(tmp_path / "out" / "*" / "*_samples_*.jsonl"))[0])]
    responses = {records[s["doc_id"]]["id"]: s["filtered_resps"] for s in samples}
    responses = {k: v[0] if isinstance(v, list) else v for k, v in responses.items()}
    assert responses == predictions


# ------------------------------------------------------------------------------------------------------------------
# Tiny copies of POPE, MME and TextVQA in their published layout (HF datasets parquet, images embedded)


def _write_hub_layout(folder: Path, split: str, columns: dict, features) -> Path:
    import datasets

    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(
        str(folder / "data" / f"{split}-00000-of-00001.parquet")
    )
    return folder


def _image_column(work: Path, n: int) -> list[dict]:
    files = sorted((work / "data" / "images").glob("*.png"))
    return [{"bytes": files[i % len(files)].read_bytes(), "path": files[i % len(files)].name} for i in range(n)]


def _benchmarks(work: Path, root: Path) -> dict[str, Path]:
    import datasets
    from datasets import Features, Image as HFImage, Sequence, Value

    n, s = 4, Value("string")
    pope = _write_hub_layout(
        root / "POPE",
        "test",
        {
            "id": [str(i) for i in range(n)],
            "question_id": [str(i) for i in range(n)],
            "question": ["Is there a red square in the image?"] * n,
            "answer": ["yes", "no"] * (n // 2),
            "image_source": ["synthetic"] * n,
            "image": _image_column(work, n),
            "category": ["adversarial"] * n,
        },
        Features(id=s, question_id=s, question=s, answer=s, image_source=s, image=HFImage(), category=s),
    )
    mme = _write_hub_layout(
        root / "MME",
        "test",
        {
            # MME asks two questions (answers Yes and No) about each image; question_id is the image's name
            "question_id": ["count/0000.png", "count/0000.png", "color/0001.png", "color/0001.png"],
            "image": [_image_column(work, 2)[i // 2] for i in range(n)],
            "question": [
                "Is there one shape in this image? Please answer yes or no.",
                "Are there five shapes in this image? Please answer yes or no.",
            ]
            * (n // 2),
            "answer": ["Yes", "No"] * (n // 2),
            "category": ["count", "count", "color", "color"],
        },
        Features(question_id=s, image=HFImage(), question=s, answer=s, category=s),
    )
    textvqa = _write_hub_layout(
        root / "textvqa",
        "validation",
        {
            "image_id": [str(i) for i in range(n)],
            "question_id": list(range(n)),
            "question": ["what colour is the square?"] * n,
            "question_tokens": [["what", "colour"]] * n,
            "image": _image_column(work, n),
            "image_width": [32] * n,
            "image_height": [32] * n,
            "flickr_original_url": [""] * n,
            "flickr_300k_url": [""] * n,
            "answers": [["red"] * 10] * n,
            "image_classes": [["shape"]] * n,
            "set_name": ["val"] * n,
            "ocr_tokens": [[]] * n,
        },
        Features(
            image_id=s,
            question_id=Value("int32"),
            question=s,
            question_tokens=Sequence(s),
            image=HFImage(),
            image_width=Value("int32"),
            image_height=Value("int32"),
            flickr_original_url=s,
            flickr_300k_url=s,
            answers=Sequence(s),
            image_classes=Sequence(s),
            set_name=s,
            ocr_tokens=Sequence(s),
        ),
    )
    assert datasets.load_dataset(str(pope))["test"].num_rows == n  # the layout load_dataset reads offline
    return {"pope": pope, "mme": mme, "textvqa_val": textvqa}


@pytest.mark.slow
def test_matvlm_eval_runs_local_pope_mme_textvqa_teacher_vs_hybrid(work, tmp_path, monkeypatch):
    for key, value in {**OFFLINE, "HF_HOME": str(tmp_path / "hf")}.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # nothing may be written here (TextVQA writes a submission file)
    data = _benchmarks(work, tmp_path / "benchmarks")
    out = tmp_path / "eval"
    args = [
        "--model",
        str(work / "hybrid"),
        "--teacher",
        str(work / "teacher"),
        "--tasks",
        "pope,mme,textvqa_val",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    args += [f"--data={task}={folder}" for task, folder in data.items()]
    report = eval_command.main(args)
    for label in ("teacher", "hybrid"):
        run = report["models"][label]
        assert {t: run["n_samples"][t]["effective"] for t in data} == {"pope": 4, "mme": 4, "textvqa_val": 4}
        assert 0 <= run["results"]["pope"]["pope_accuracy,none"] <= 1
        assert "mme_perception_score,none" in run["results"]["mme"]
        assert 0 <= run["results"]["textvqa_val"]["exact_match,none"] <= 1
        prompts_ok = all(len(s["response"]) == 1 for rows in run["samples"].values() for s in rows)
        assert prompts_ok
    saved = json.loads((out / "results.json").read_text())
    assert saved["tasks"] == ["pope", "mme", "textvqa_val"]
    table = (out / "results.md").read_text()
    assert "hybrid - teacher" in table and all(f"| {t} |" in table for t in data)
    assert not list(tmp_path.glob(".eval.partial-*")) and not list((tmp_path / "cwd").iterdir())
    assert list((out / "lmms-eval" / "hybrid" / "submissions").glob("textvqa_submission_*.json"))
    with pytest.raises(SystemExit, match="not empty"):  # a second run must not replace it silently
        eval_command.main(args)


def test_output_folder_rules(work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check = eval_command.check_output
    with pytest.raises(SystemExit, match="working directory"):
        check(tmp_path, [], overwrite=True)
    with pytest.raises(SystemExit, match="input"):
        check(work / "hybrid" / "eval", [work / "hybrid"], overwrite=True)
    with pytest.raises(SystemExit, match="input"):
        check(work, [work / "hybrid"], overwrite=True)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "mine.txt").write_text("user data")
    with pytest.raises(SystemExit, match="--overwrite"):
        check(tmp_path / "old", [], overwrite=False)
    check(tmp_path / "old", [], overwrite=True)
    new = tmp_path / ".old.partial-x"
    new.mkdir()
    (new / "results.json").write_text("{}")
    eval_command._swap(new, tmp_path / "old")
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["results.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_bad_data_argument_names_the_task(work, tmp_path):
    with pytest.raises(ValueError, match="pope"):
        write_task_dir(tmp_path / "t", ["pope"], {"pope": tmp_path})
    with pytest.raises(ValueError, match="not requested"):
        write_task_dir(tmp_path / "t2", ["pope"], {"mme": work / "data"})
    with pytest.raises(ValueError, match="no task"):
        write_task_dir(tmp_path / "t3", ["no_such_task_xyz"])
