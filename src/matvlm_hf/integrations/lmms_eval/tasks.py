"""The paper's benchmarks as lmms-eval tasks, local data for them, and the synthetic world as a task.

`write_task_dir` writes one small yaml per requested task into a folder that lmms-eval then reads as its only task
source (`TaskManager(include_path=folder, include_defaults=False)`, or `lmms-eval --include_path folder`): each yaml
includes lmms-eval's own task yaml by absolute path (its prompts, `!function`s and metrics unchanged) and, when the
user has the benchmark locally, replaces `dataset_path` by that folder. A local folder holds the benchmark in its
published Hugging Face layout (what `huggingface-cli download lmms-lab/POPE --repo-type dataset --local-dir DIR`
gives: `data/<split>-00000-of-0000N.parquet`, images embedded), which `datasets.load_dataset(DIR)` reads offline.
Without a local folder the task loads its Hub id as lmms-eval does (from the HF cache when offline).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

SYNTHETIC_TASK = "matvlm_synthetic"
TEMPLATES = Path(__file__).parent / "task_templates"

# The paper's nine benchmarks (MaTVLM Table 1; TinyLLaVA's / LLaVA-1.5's evaluation): name -> lmms-eval task.
# Their lmms-eval prompts carry LLaVA-1.5's suffixes ("\nAnswer the question using a single word or phrase." for
# POPE, MME, GQA, VQAv2, TextVQA; "\nAnswer with the option's letter from the given choices directly." for
# ScienceQA-IMG and MMBench); lmms-eval's MMMU and MM-Vet prompts differ from LLaVA's (see PROMPT_NOTES).
PAPER_TASKS: dict[str, str] = {
    "MME": "mme",
    "MMMU": "mmmu_val",
    "POPE": "pope",
    "MM-Vet": "mmvet",
    "TextVQA": "textvqa_val",
    "MMBench": "mmbench_en_dev",
    "SQA-IMG": "scienceqa_img",
    "GQA": "gqa",
    "VQAv2": "vqav2_val",
}
PAPER_SUFFIXES: dict[str, str] = {
    "pope": "\nAnswer the question using a single word or phrase.",
    "mme": "\nAnswer the question using a single word or phrase.",
    "gqa": "\nAnswer the question using a single word or phrase.",
    "vqav2_val": "\nAnswer the question using a single word or phrase.",
    "textvqa_val": "\nAnswer the question using a single word or phrase.",
    "scienceqa_img": "\nAnswer with the option's letter from the given choices directly.",
    "mmbench_en_dev": "\nAnswer with the option's letter from the given choices directly.",
}
PROMPT_NOTES = {
    "mmmu_val": "lmms-eval's prompt ('Question: ... Answer with the option letter only.'), not LLaVA's",
    "mmvet": "lmms-eval asks for step-by-step reasoning and scores with a GPT judge (needs an OpenAI key)",
    "vqav2_val": "the paper reports VQAv2 test-dev (server-scored); vqav2_val is the locally scored split",
}
# Headline metric of each task in the results table (lmms-eval metric name; the first one found otherwise).
HEADLINE = {
    "pope": "pope_f1_score",
    "mme": "mme_perception_score",
    SYNTHETIC_TASK: "accuracy",
    "textvqa_val": "exact_match",
    "vqav2_val": "exact_match",
    "gqa": "exact_match",
    "scienceqa_img": "exact_match",
    "mmbench_en_dev": "gpt_eval_score",
    "mmmu_val": "mmmu_acc",
    "mmvet": "gpt_eval_score",
}


# Where the paper's tasks live inside lmms-eval's tasks folder (saves indexing its ~300 task folders).
_KNOWN_YAML = {
    "mme": "mme/mme.yaml",
    "mmmu_val": "mmmu/mmmu_val.yaml",
    "pope": "pope/pope.yaml",
    "mmvet": "mmvet/mmvet.yaml",
    "textvqa_val": "textvqa/textvqa_val.yaml",
    "mmbench_en_dev": "mmbench/mmbench_en_dev.yaml",
    "scienceqa_img": "scienceqa/scienceqa_img.yaml",
    "gqa": "gqa/gqa.yaml",
    "vqav2_val": "vqav2/vqav2_val.yaml",
}


def upstream_yaml(task: str) -> Path:
    """lmms-eval's yaml of a (leaf) task; ValueError naming the task when lmms-eval has no such task or it is a
    group (run groups with lmms-eval itself)."""
    import lmms_eval.tasks

    known = Path(lmms_eval.tasks.__file__).parent / _KNOWN_YAML.get(task, "-")
    if known.is_file() and _raw_config(known).get("task") == task:
        return known
    entry = lmms_eval.tasks.TaskManager(verbosity="ERROR").task_index.get(task)
    if entry is None:
        raise ValueError(f"lmms-eval has no task {task!r} (list them with `lmms-eval tasks list`)")
    if entry.get("type") != "task" or not isinstance(entry.get("yaml_path"), str):
        raise ValueError(
            f"{task!r} is an lmms-eval {entry.get('type')}, not a single task: run it with lmms-eval "
            "itself, or name its tasks"
        )
    return Path(entry["yaml_path"])


def _raw_config(path: Path) -> dict[str, Any]:
    from lmms_eval import utils

    return utils.load_yaml_config(str(path), mode="simple")


def write_task_dir(out: str | Path, tasks: list[str], data: dict[str, str | Path] | None = None) -> Path:
    """Write one wrapper yaml per task into `out` (created; must not hold yamls already) and return it.

    tasks: lmms-eval task names and/or "matvlm_synthetic"; data: task -> local folder in the published layout (for
    "matvlm_synthetic": a folder holding test.parquet, see `synthetic_to_parquet`; it is required for that task).
    Raises ValueError for an unknown task, a missing or empty data folder, or data for a task not requested.
    """
    out = Path(out)
    data = {k: Path(v) for k, v in (data or {}).items()}
    unknown = set(data) - set(tasks)
    if unknown:
        raise ValueError(f"--data names task(s) not requested: {sorted(unknown)} (tasks: {tasks})")
    for task, folder in data.items():
        if not folder.is_dir() or not any(folder.rglob("*.parquet")) and not any(folder.rglob("*.arrow")):
            raise ValueError(f"--data {task}={folder}: not a folder holding the data set's parquet or arrow files")
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        if task == SYNTHETIC_TASK:
            if task not in data:
                raise ValueError(f"{SYNTHETIC_TASK} needs its data folder (synthetic_to_parquet)")
            source = TEMPLATES / "matvlm_synthetic.yaml"
        else:
            source = upstream_yaml(task)
        config = _raw_config(source)
        wrapper: dict[str, Any] = {
            "include": str(source.resolve()),
            "task": task,
            "output_type": config.get("output_type", "generate_until"),
        }
        if task in data:
            wrapper["dataset_path"] = str(data[task].resolve())
            kwargs = {k: v for k, v in (config.get("dataset_kwargs") or {}).items() if k != "token"}
            wrapper["dataset_kwargs"] = kwargs
        target = out / f"{task}.yaml"
        if target.exists():
            raise ValueError(f"{target} exists already: give write_task_dir an empty folder")
        target.write_text(yaml.safe_dump(wrapper, sort_keys=False), encoding="utf-8")
    return out


def synthetic_to_parquet(llava_dir: str | Path, out: str | Path, split: str = "test") -> Path:
    """`matvlm data` / quickstart data (LLaVA-format `<split>.json` + `images/`) -> `out/<split>.parquet` with
    columns id, question, answer, question_type, image (an HF Image, PNG bytes embedded). Returns `out`.
    Raises FileNotFoundError naming the missing json or image, ValueError for a record that is not one question."""
    import datasets

    llava_dir, out = Path(llava_dir), Path(out)
    source = llava_dir / f"{split}.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: give the folder written by `matvlm data` (or the quickstart)")
    columns: dict[str, list] = {"id": [], "question": [], "answer": [], "question_type": [], "image": []}
    for record in json.loads(source.read_text(encoding="utf-8")):
        turns = record["conversations"]
        if len(turns) != 2 or turns[0]["from"] != "human" or turns[1]["from"] != "gpt":
            raise ValueError(f"{source}: record {record.get('id')} is not one question and its answer")
        image = llava_dir / "images" / record["image"]
        if not image.is_file():
            raise FileNotFoundError(f"{source}: record {record['id']} names {image}, which does not exist")
        columns["id"].append(str(record["id"]))
        columns["question"].append(turns[0]["value"].replace("<image>", "").strip())
        columns["answer"].append(turns[1]["value"])
        columns["question_type"].append(record.get("question_type", "unknown"))
        columns["image"].append({"bytes": image.read_bytes(), "path": record["image"]})
    features = datasets.Features(
        {name: datasets.Value("string") for name in columns if name != "image"} | {"image": datasets.Image()}
    )
    out.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(out / f"{split}.parquet"))
    return out
