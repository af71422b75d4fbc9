"""README's "Use" snippet runs as written (on a tiny converted hybrid standing in for the quickstart's output) and
prints only the answer, not the prompt."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from matvlm_hf.conversion import convert_tinyllava_to_matvlm
from matvlm_hf.fabricate import write_tinyllava_checkpoint
from matvlm_hf.synthetic_vqa import render_scene, sample_scene

ROOT = Path(__file__).resolve().parents[1]


def test_use_snippet_runs_and_prints_the_answer_only(tmp_path):
    import random

    code = re.search(r"## Use\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    work = tmp_path / "matvlm-quickstart"
    convert_tinyllava_to_matvlm(
        write_tinyllava_checkpoint(tmp_path / "tl"), work / "hybrid-distilled", mamba_ratio=0.5, progress=False
    )
    render_scene(sample_scene(random.Random(0)), 32).save(work / "example.png")
    (tmp_path / "snippet.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() and "ASSISTANT" not in proc.stdout and "USER" not in proc.stdout
