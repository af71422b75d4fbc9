"""The benchmark CLI's CPU mode runs end to end, so the GPU benchmark cannot silently rot."""

import json

import pytest

import torch

from matvlm_hf.benchmark import build_model, main, roofline_ms


def test_tiny_benchmark_writes_json_and_plots(tmp_path):
    main(["--size", "tiny", "--out", str(tmp_path), "--models", "teacher,hybrid-50"])
    results = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(results["models"]) == {"teacher", "hybrid-50"}
    hybrid = results["models"]["hybrid-50"]
    assert hybrid["mamba_layers"] == [0, 2]
    assert all(v["tokens_per_s"] > 0 for v in hybrid["decode"].values())
    for name in ("teacher", "hybrid-50"):  # transformers' own paths: eager and static cache
        for path in ("eager", "static"):
            assert results["models"][name][path] and all(
                v["tokens_per_s"] > 0 for v in results["models"][name][path].values()
            )
    assert hybrid["largest_batch"]["batch"] >= 1
    assert (tmp_path / "decode_throughput.png").stat().st_size > 10_000
    assert (tmp_path / "memory_prefill.png").stat().st_size > 10_000
    main(["--out", str(tmp_path), "--plot-only"])


def test_roofline_counts_weights_kv_and_states():
    teacher, hybrid = build_model(0.0, "tiny", "cpu", torch.float32), build_model(0.5, "tiny", "cpu", torch.float32)
    # tiny: 4 layers, hidden 64, fp32: KV = layers x 2 x 64 x 4 bytes per token
    t = roofline_ms(teacher, 1, 1000, 1e9) - roofline_ms(teacher, 1, 0, 1e9)
    assert abs(t - 4 * 2 * 64 * 4 * 1000 / 1e9 * 1e3) < 1e-9
    h = roofline_ms(hybrid, 1, 1000, 1e9) - roofline_ms(hybrid, 1, 0, 1e9)
    assert abs(h - t / 2) < 1e-9


def test_decode_step_profile_counts_the_steps_ops(tmp_path):
    """examples/profile_decode_step.py on a CPU (tiny sizes): per-step op counts and times, the matmuls among them."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "profile_decode_step.py"
    spec = importlib.util.spec_from_file_location("profile_decode_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--size", "tiny", "--steps", "2", "--context", "32", "--modes", "eager", "--out", str(tmp_path)])
    for name in ("teacher/eager", "hybrid-50/eager"):
        stats = out[name]
        assert stats["kernels_per_step"] > 4 * 4  # at least a few ops per layer of the 4-layer LM
        assert 0 < stats["gemm_us_per_step"] < stats["us_per_step"]
        split = stats["us_per_step_by_category"]
        assert abs(sum(split.values()) - stats["us_per_step"]) < 1e-6 * stats["us_per_step"]
        assert split["matmul"] == stats["gemm_us_per_step"] and split["attention"] > 0
        assert split["Mamba mixer"] == 0  # on a CPU the mixer is plain aten ops ("other"); GPU names below
    assert json.loads((tmp_path / "profile_decode_step.json").read_text())["context"] == 32
    # GPU kernel names seen on the H200 (docs/benchmarks/h200/profile_decode_step.json)
    assert [
        module.category(k)
        for k in (
            "nvjet_sm90_tst_64x8_64x16_4x1_v_bz_bias_TNT",
            "void cublasLt::splitKreduce_kernel<32, 16, int, float>",
            "cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_35",
            "void cudnn::fusion::lean_reduction_kernel<false, false, false>",
            "_selective_scan_update_kernel",
            "triton_poi_fused_add_mul_pow_tanh_view_6",
        )
    ] == ["matmul", "matmul", "attention", "attention", "Mamba mixer", "other"]
    pytest.importorskip("matplotlib")
    assert module.main(["--plot", str(tmp_path / "profile_decode_step.json")]) == out
    assert (tmp_path / "profile_decode_step.png").stat().st_size > 0


def test_a_step_faster_than_the_roofline_is_measured_again_then_marked_invalid(monkeypatch):
    """A decode point whose step beats the bandwidth roofline (a noisy difference of two generate calls) is measured
    once more; still impossible, it is kept with an "invalid" reason and left out of the plots' points."""
    from matvlm_hf.synthetic import benchmark

    model = build_model(0.5, "tiny", "cpu", torch.float32)
    roofline = roofline_ms(model, 1, 64, 1e9)
    knobs = {"steps": 8}
    for timings, expect_invalid in (([0.5, 2.0], False), ([0.5, 0.4], True), ([3.0], False)):
        calls = iter(timings)

        def fake_time_decode(*args, **kwargs):
            ms = next(calls) * roofline
            return {"ms_per_step": ms, "tokens_per_s": 1e3 / ms}

        monkeypatch.setattr(benchmark, "time_decode", fake_time_decode)
        point = benchmark.measure_point(model, "decode", 1, 64, knobs, "cpu", 1e9)
        assert next(calls, None) is None  # every timing used: re-measured exactly when the first was impossible
        assert point["ms_per_step"] == pytest.approx(timings[-1] * roofline)
        assert ("invalid" in point) == expect_invalid
        plotted = benchmark._decode_points({"1x64": point}, 1)
        assert plotted == ([] if expect_invalid else [(64, point["tokens_per_s"])])


def test_a_generate_call_that_stops_early_fails_the_timing():
    """The step time is a difference of generate calls of known lengths: a call returning fewer tokens raises."""
    from matvlm_hf.synthetic import benchmark

    model = build_model(0.0, "tiny", "cpu", torch.float32)
    ids = torch.randint(0, 100, (1, 16))
    assert benchmark._generate_seconds(model, ids, 3, "cpu", False) > 0

    def short(input_ids, max_new_tokens, **kwargs):
        return torch.cat([input_ids, input_ids[:, : max_new_tokens - 1]], -1)

    model.generate = short
    with pytest.raises(RuntimeError, match="returned 2 new tokens where 3 were asked for"):
        benchmark._generate_seconds(model, ids, 3, "cpu", False)
