"""The distillation benchmark: its largest-batch search, and a CPU run of the real training path at tiny size."""

import json

from matvlm_hf import distill_benchmark as db


def test_largest_fitting_finds_the_boundary_with_few_tries():
    for limit in (1, 2, 3, 7, 8, 13, 27, 64):
        tried = []

        def fits(n, limit=limit):
            tried.append(n)
            return n <= limit

        largest, first_bad = db.largest_fitting(fits, 1, limit=512)
        assert largest == limit and first_bad == limit + 1
        assert len(tried) <= 2 * limit.bit_length() + 1
    assert db.largest_fitting(lambda n: True, 1, limit=16) == (16, None)


def test_tiny_benchmark_runs_the_training_path_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    result = db.main(
        [
            "--size",
            "tiny",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
            "--max-length",
            "48",
            "--steps",
            "3",
            "--batch-size",
            "2",
        ]
    )
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    run = saved["timed_run"]
    assert run["oom"] is False and run["steps"] == 3 and run["tokens_per_step"] == 2 * 48
    assert run["tokens_per_s"] > 0 and len(run["step_times_s"]) == 3
    assert saved["student_mamba_layers"] and 0 < saved["trainable_parameters"] < saved["student_parameters"]
    data = json.loads((tmp_path / "work" / "data-48.json").read_text())
    assert not list((tmp_path / "work" / "run").glob("checkpoint-*"))  # --save-steps 0: no checkpoint writes
    assert len(data) == 64 and all(r["conversations"][0]["value"].startswith("<image>\n") for r in data)
