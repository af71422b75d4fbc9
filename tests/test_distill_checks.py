"""The GPU distillation checks' bookkeeping (examples/distill_ddp_check.py, used by deepspeed_check.sh and
multi_gpu_check.sh), on fabricated run folders: what they report must be what the runs logged."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_check():
    spec = importlib.util.spec_from_file_location("distill_ddp_check", ROOT / "examples" / "distill_ddp_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(folder: Path, entries: list[dict], global_batch: int = 8, max_length: int = 1428) -> Path:
    (folder / "checkpoint-3").mkdir(parents=True)
    state = {"global_step": len([e for e in entries if "loss" in e]), "log_history": entries}
    (folder / "checkpoint-3" / "trainer_state.json").write_text(json.dumps(state))
    (folder / "distill_config.json").write_text(
        json.dumps({"global_batch_size": global_batch, "max_length": max_length})
    )
    return folder


def test_summary_skips_the_first_step_and_reports_tokens_memory_and_failures(tmp_path, capsys):
    check = load_check()
    gpu = write_run(
        tmp_path / "zero2",
        [
            {"loss": 3.0, "step": 1, "step_s": 155.4, "peak_gib": 20.5},  # compiles and autotunes
            {"loss": 2.5, "step": 2, "step_s": 1.40, "peak_gib": 24.3},
            {"loss": 2.0, "step": 3, "step_s": 1.30, "peak_gib": 24.3},
            {"loss": 1.5, "step": 4, "step_s": 1.36, "peak_gib": 24.3},
            {"train_runtime": 160.0, "step": 4},
        ],
    )
    cpu = write_run(
        tmp_path / "plain", [{"loss": 3.0, "step": 1, "step_s": 2.0}, {"loss": 2.0, "step": 2, "step_s": 4.0}]
    )
    (tmp_path / "failed").mkdir()
    out = check.summary([gpu, cpu, tmp_path / "failed"])
    assert out["zero2"] == {
        "steps": 4,
        "seconds_per_step": 1.36,  # the median of 1.40, 1.30, 1.36: not the 155 s first step
        "tokens_per_s": round(8 * 1428 / 1.36),
        "peak_gib": 24.3,
        "losses": [3.0, 2.5, 2.0, 1.5],
    }
    assert out["plain"]["seconds_per_step"] == 4.0 and out["plain"]["peak_gib"] is None  # no GPU: no peak logged
    assert out["failed"].startswith("no trainer_state.json")
    assert check.main(["summary", str(gpu)]) == 0
    assert json.loads(capsys.readouterr().out)["zero2"]["seconds_per_step"] == 1.36


def test_compare_passes_within_tolerance_and_fails_beyond(tmp_path, capsys):
    check = load_check()

    def entries(scale):
        return [{"loss": 10.0 * scale, "l_layer": 8.0, "l_prob": 2.0, "grad_norm": 5.0, "step": s} for s in (1, 2, 3)]

    one = write_run(tmp_path / "one", entries(1.0))
    close = write_run(tmp_path / "close", entries(1.01))
    far = write_run(tmp_path / "far", entries(1.05))
    assert check.compare(one, close, rtol=2e-2) == 0
    assert check.compare(one, far, rtol=2e-2) == 1
    assert "largest relative difference 5.00e-02" in capsys.readouterr().out
