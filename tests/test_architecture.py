"""The layering of ARCHITECTURE.md, read from the source with `ast`: the model core (saved as remote code) imports
only itself and torch / transformers / PIL; the library (convert/, training/, the utilities) never imports the
synthetic world, the commands, the serving app or the integrations."""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "matvlm_hf"
CORE = {
    "configuration_matvlm",
    "modeling_matvlm",
    "mamba2_mixer",
    "mamba2_ops",
    "processing_matvlm",
    "chat_template",
    "fast_generation",
    "fused_decode_step",
    "decode_kernels",
    "decode_matmul",
}
CORE_THIRD_PARTY = {"torch", "transformers", "PIL", "mamba_ssm", "causal_conv1d", "triton"}  # kernels: detected only
LIBRARY = [
    *sorted((PACKAGE / "convert").glob("*.py")),
    *sorted((PACKAGE / "training").glob("*.py")),
    *(PACKAGE / f"{name}.py" for name in ("errors", "safe_output", "input_checks")),
]
ABOVE_LIBRARY = (
    "matvlm_hf.synthetic",
    "matvlm_hf.commands",
    "matvlm_hf.cli",
    "matvlm_hf.serving",
    "matvlm_hf.integrations",
    # the old flat paths of modules that moved above the library (aliases)
    *(
        f"matvlm_hf.{old}"
        for old in (
            "synthetic_vqa",
            "quickstart",
            "study",
            "bad_inputs",
            "demo",
            "benchmark",
            "distill_benchmark",
            "train_cli",
        )
    ),
)


def imported_modules(source: str, module: str) -> list[str]:
    """Absolute names of what `source` (the text of module `module`, e.g. "matvlm_hf.convert.fabricate") imports;
    `from . import x` yields "pkg.x" (x may be a module)."""
    package = module.rsplit(".", 1)[0].split(".")
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] if node.level else [])
            target = ".".join(p for p in (base, node.module or "") if p)
            names += [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
    return names


def module_name(path: Path) -> str:
    return ".".join(("matvlm_hf", *path.relative_to(PACKAGE).with_suffix("").parts))


def core_violations(source: str, module: str) -> list[str]:
    bad = []
    for name in imported_modules(source, module):
        top = name.split(".")[0]
        if top == "matvlm_hf":
            if name.split(".")[1] not in CORE or name.count(".") != 1:
                bad.append(name)
        elif top not in CORE_THIRD_PARTY and top not in sys.stdlib_module_names:
            bad.append(name)
    return bad


def library_violations(source: str, module: str) -> list[str]:
    return [
        name
        for name in imported_modules(source, module)
        if any(name == above or name.startswith(above + ".") for above in ABOVE_LIBRARY)
    ]


def test_the_model_core_imports_only_itself_and_torch_transformers_pil():
    found = {name: core_violations((PACKAGE / f"{name}.py").read_text(), f"matvlm_hf.{name}") for name in sorted(CORE)}
    assert {name: bad for name, bad in found.items() if bad} == {}


def test_the_library_never_imports_the_synthetic_world_or_the_commands():
    assert len(LIBRARY) >= 12, LIBRARY  # the layers exist where ARCHITECTURE.md says
    found = {
        str(path.relative_to(PACKAGE)): library_violations(path.read_text(), module_name(path)) for path in LIBRARY
    }
    assert {name: bad for name, bad in found.items() if bad} == {}


def test_the_checks_see_a_forbidden_import():
    """The rules above can fail: the core importing the library or numpy; the library importing synthetic/."""
    core = "import numpy\nfrom .convert import conversion\nfrom .mamba2_ops import ssd_scan\nimport torch\n"
    assert core_violations(core, "matvlm_hf.mamba2_mixer") == ["numpy", "matvlm_hf.convert"]
    library = "from ..synthetic.quickstart import KNOBS\nfrom .. import study\nfrom .data import LLaVADataset\n"
    assert library_violations(library, "matvlm_hf.training.x") == ["matvlm_hf.synthetic.quickstart", "matvlm_hf.study"]
