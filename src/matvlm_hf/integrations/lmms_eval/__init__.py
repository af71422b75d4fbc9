"""lmms-eval integration: the `matvlm` lmms-eval model (`model.MaTVLM`) and the benchmark tasks (`tasks`).

lmms-eval finds the model through the entry point that pyproject.toml declares,

    [project.entry-points."lmms_eval.models"]
    matvlm = "matvlm_hf.integrations.lmms_eval:manifest"

which lmms-eval's model registry loads (`ModelRegistryV2.load_entrypoint_manifests`) when it starts, so
`lmms-eval --model matvlm ...` resolves to `model.MaTVLM`. Nothing here is imported by `import matvlm_hf`, and this
module imports lmms-eval only inside `manifest()`: install it with `pip install "matvlm-hf[eval]"` (see README).
"""

from __future__ import annotations

MODEL_CLASS = "matvlm_hf.integrations.lmms_eval.model.MaTVLM"


def manifest():
    """The `lmms_eval.models` entry point payload: lmms-eval's ModelManifest for `--model matvlm`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="matvlm", simple_class_path=MODEL_CLASS)
