"""Document functions of the `matvlm_synthetic` lmms-eval task (loaded by lmms-eval from this file's path).

Scoring is `synthetic_vqa.normalize_answer` exact match, the quickstart's own scorer (`synthetic_vqa.score`).
"""

from __future__ import annotations

from typing import Any

from matvlm_hf.synthetic_vqa import normalize_answer


def doc_to_visual(doc: dict[str, Any]) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, str] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"accuracy": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
