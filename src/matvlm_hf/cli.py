"""The `matvlm` command: `matvlm quickstart | demo | convert | data | distill | study ...` (each has its own --help)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "quickstart": (
        "matvlm_hf.commands.quickstart",
        "from nothing on a CPU: data, teacher, 25 % hybrid, distillation, report",
    ),
    "demo": ("matvlm_hf.commands.demo", "fabricate a tiny TinyLLaVA, convert it, compare teacher and hybrid"),
    "convert": ("matvlm_hf.commands.convert", "convert a TinyLLaVA checkpoint to a MaTVLM hybrid"),
    "data": ("matvlm_hf.commands.data", "write the synthetic visual-QA data set"),
    "bench": (
        "matvlm_hf.commands.bench",
        "decode/prefill speed and memory, teacher vs hybrids (GPU; --size tiny on CPU)",
    ),
    "distill": (
        "matvlm_hf.commands.distill",
        "distil a hybrid from its teacher (Trainer; accelerate launch for many GPUs)",
    ),
    "bench-distill": (
        "matvlm_hf.commands.bench_distill",
        "distillation step time, memory, largest micro-batch (GPU)",
    ),
    "study": (
        "matvlm_hf.commands.study",
        "the synthetic-world study: ratios and loss/placement/init ablations, report",
    ),
    "import": (
        "matvlm_hf.commands.import_",
        "import an authors'-layout MaTVLM checkpoint (hustvl/MaTVLM) as matvlm-hf",
    ),
    "export": ("matvlm_hf.commands.export", "write a matvlm-hf checkpoint in the authors' layout (--format authors)"),
    "eval": ("matvlm_hf.commands.eval", "the paper's benchmarks (or the synthetic world) through lmms-eval"),
    "serve": ("matvlm_hf.commands.serve", "a chat page (Gradio): image upload, streamed answers, teacher beside"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:<13} {help_}" for name, (_, help_) in COMMANDS.items())
        print(f"usage: matvlm COMMAND [options]\n\ncommands:\n{lines}")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module = importlib.import_module(COMMANDS[argv[0]][0])
    from .errors import UserError

    try:
        module.main(argv[1:])
    except UserError as err:  # a user's mistake: its message, no traceback
        print(f"matvlm {argv[0]}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
