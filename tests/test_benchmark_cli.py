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
