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


def test_step_timer_times_each_decode_step_after_the_prefill():
    """training/measure.StepTimer as a generate() stopping criterion (the generation benchmark's use): one time per
    generated token after the first, and generation is never stopped by it."""
    import torch
    from conftest import tiny_model
    from transformers import StoppingCriteriaList

    from matvlm_hf.training.measure import StepTimer

    model = tiny_model().eval()
    timer = StepTimer()
    ids = torch.randint(5, 100, (2, 6))
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            stopping_criteria=StoppingCriteriaList([timer]),
        )
    assert out.shape[1] == 6 + 5
    assert len(timer.times) == 4 and all(t > 0 for t in timer.times)


def test_the_recipe_builds_every_drivers_training_arguments():
    """The quickstart's recipe gives the TrainingArguments it always had (transformers' default optimizer, no
    accumulation, its own schedule), on the device its knobs name."""
    from transformers import TrainingArguments

    from matvlm_hf.synthetic.quickstart import FAST, KNOBS, distill_recipe

    knobs = {**KNOBS, **FAST, "device": "cpu"}
    args = distill_recipe(knobs, seed=3, weights=(0.0, 1.0, 0.0)).training_arguments("/tmp/unused", device="cpu")
    default = TrainingArguments(output_dir="/tmp/unused")
    assert args.optim == default.optim and args.use_cpu and not args.bf16
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (knobs["distill_batch_size"], 1)
    assert (args.max_steps, args.learning_rate, args.seed) == (knobs["distill_steps"], knobs["distill_lr"], 3)
    assert args.dataloader_num_workers == 0 and args.max_grad_norm == knobs["distill_max_grad_norm"]
    loss = distill_recipe(knobs, seed=3, weights=(0.0, 1.0, 0.0)).distillation_arguments()
    assert (loss.alpha, loss.beta, loss.gamma) == (0.0, 1.0, 0.0)
