"""Model cards (README.md with YAML front matter) for the folders `matvlm convert` and `matvlm distill` write."""

from __future__ import annotations

import json
import re
from typing import Any

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
TAGS = ("matvlm", "mamba2", "hybrid", "tinyllava", "distillation")


def front_matter(base_model: str | None) -> str:
    """The card's YAML header; every value is a JSON string (valid YAML whatever it holds). `base_model` is written
    only when it has the form of a Hub repo id (a local path there would be invalid Hub metadata)."""
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        f"tags: [{', '.join(json.dumps(t) for t in TAGS)}]",
    ]
    if base_model and _HUB_ID.match(base_model):
        lines.append(f"base_model: {json.dumps(base_model)}")
    return "\n".join(lines) + "\n---\n"


def _code(text: Any) -> str:
    """`text` as Markdown inline code (backticks inside cannot end it)."""
    return "`` " + str(text).replace("`", "'") + " ``"


def distilled_card(mamba_layers: list[int], num_layers: int, knobs: dict[str, Any], steps: int) -> str:
    """README.md of a distilled student: where it came from, the loss and the recipe (knobs from `train_cli`)."""
    base = str(knobs.get("teacher") or "")
    rows = [
        ("student (converted)", _code(knobs.get("student"))),
        ("teacher", _code(base)),
        ("Mamba layers", f"{mamba_layers} of {num_layers}"),
        (
            "loss",
            f"{knobs.get('alpha')} L_layer ({knobs.get('layer_loss')}) + {knobs.get('beta')} L_prob (KL, T = "
            f"{knobs.get('temperature')}, {knobs.get('kl_positions')} positions) + {knobs.get('gamma')} L_ce",
        ),
        (
            "trained",
            f"{knobs.get('train_mode')}, {steps} optimizer steps, lr {knobs.get('learning_rate')}, "
            f"effective batch {knobs.get('global_batch_size')}",
        ),
        ("data", _code(knobs.get("data"))),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        front_matter(base)
        + f"""# MaTVLM hybrid, distilled

A [MaTVLM](https://arxiv.org/abs/2503.13440) hybrid distilled from its attention teacher with `matvlm distill`
(matvlm-hf): {len(mamba_layers)} of {num_layers} decoder layers use a Mamba-2 mixer instead of attention.

| | |
|---|---|
{table}

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
model = AutoModelForImageTextToText.from_pretrained("PATH", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("PATH", trust_remote_code=True)
```
"""
    )


__all__ = ["distilled_card", "front_matter"]
