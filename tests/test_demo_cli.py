"""The README's main job (`matvlm demo`) and the `matvlm` command dispatcher run end to end."""

import subprocess
import sys

from matvlm_hf.demo import main as demo_main


def test_demo_runs_on_the_embedded_default(tmp_path, capsys):
    results = demo_main(["--workdir", str(tmp_path), "--new-tokens", "4"])
    assert set(results) == {"teacher", "hybrid-0.25"}
    assert results["teacher"]["mamba_layers"] == [] and results["hybrid-0.25"]["mamba_layers"] == [0]
    assert all(r["tokens_per_s"] > 0 for r in results.values())
    assert (tmp_path / "hybrid-0.25" / "modeling_matvlm.py").exists()
    assert "Q:" in capsys.readouterr().out


def test_matvlm_command_lists_its_subcommands():
    out = subprocess.run([sys.executable, "-m", "matvlm_hf.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(c in out.stdout for c in ("demo", "convert", "data", "distill"))
    bad = subprocess.run([sys.executable, "-m", "matvlm_hf.cli", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2
