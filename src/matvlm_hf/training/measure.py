"""Measuring steps: a step timer for training and for generation, peak memory and step time in the training log,
and the largest-batch search.

    timer = StepTimer(echo=True)
    trainer.add_callback(timer); trainer.train()                 # timer.times: seconds per optimizer step
    trainer.add_callback(StepSeconds())                          # `step_s` in every log entry
    timer = StepTimer()
    model.generate(..., stopping_criteria=StoppingCriteriaList([timer]))  # seconds per decode step
    largest, first_too_big = largest_fitting(lambda n: try_batch(n), start=1)

Used by the trainer factory (every distillation run logs `peak_gib` and `step_s`), the distillation benchmark
(`synthetic/distill_benchmark.py`) and the generation benchmark (`synthetic/benchmark.py`).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from transformers import StoppingCriteria, TrainerCallback


class StepTimer(TrainerCallback, StoppingCriteria):
    """Wall time of every step, seconds, in `times`; the GPU (when there is one) is synchronised at each stamp.

    As a Trainer callback: one entry per optimizer step, from `on_step_begin` to `on_step_end`; `echo` prints each
    ("step N/M: t s"). As a `generate()` stopping criterion (it never stops generation): one entry per generated
    token after the first, the time since the previous token (the first token's step is the prefill, not timed).
    """

    def __init__(self, echo: bool = False) -> None:
        self.times: list[float] = []
        self.echo = echo
        self._start: float | None = None

    @staticmethod
    def _stamp() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = self._stamp()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(self._stamp() - self._start)
        if self.echo:
            print(f"    step {state.global_step}/{state.max_steps}: {self.times[-1]:.3f} s", flush=True)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        now = self._stamp()
        if self._start is not None:
            self.times.append(now - self._start)
        self._start = now
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _add_to_log(state, logs: dict, key: str, value: float) -> None:
    """Put `key` in the printed `logs` and in the entry `Trainer.log` has just appended to `state.log_history` (a copy
    of `logs` taken before the callbacks run, transformers 5.x `Trainer.log`), so trainer_state.json holds it too."""
    logs[key] = value
    if state.log_history:
        state.log_history[-1][key] = value


class PeakMemory(TrainerCallback):
    """Adds `peak_gib` (torch.cuda.max_memory_allocated of this process since it started, GiB) to every log entry of a
    run on CUDA, printed and in trainer_state.json's log_history beside the losses; nothing on a CPU."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        peak = peak_gib()
        if logs is not None and peak is not None:
            _add_to_log(state, logs, "peak_gib", peak)


def peak_gib() -> float | None:
    """torch.cuda.max_memory_allocated() of this process in GiB (3 decimals); None without an initialised GPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return None


class StepSeconds(StepTimer):
    """Adds `step_s` (mean wall seconds of the optimizer steps since the previous log entry, the GPU synchronised at
    each step's start and end) to every log entry, printed and in trainer_state.json: a run's step time without its
    first step's compilation and Triton autotuning (read the entries after the first)."""

    def __init__(self) -> None:
        super().__init__()
        self._logged = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        new = self.times[self._logged :]
        if logs is not None and new:
            _add_to_log(state, logs, "step_s", round(sum(new) / len(new), 4))
            self._logged = len(self.times)


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int = 512) -> tuple[int, int | None]:
    """(largest n <= `limit` with fits(n), smallest n found not to fit or None when every try up to `limit` fit):
    doubling from `start` (which must fit; it is not tried), then bisection. Assumes fits is monotone (a batch
    that fits, every smaller one fits); about 2 log2(answer) calls of `fits`."""
    good, bad = start, None
    n = start * 2
    while n <= limit:
        if not fits(n):
            bad = n
            break
        good, n = n, n * 2
    if bad is None:
        return good, None
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good, bad
