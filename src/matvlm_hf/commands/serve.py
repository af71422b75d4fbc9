"""`matvlm serve`: a chat page for a MaTVLM checkpoint (Gradio; `pip install "matvlm-hf[demo]"`).

    matvlm serve --model out/matvlm-25                           # the hybrid alone, on http://127.0.0.1:7860
    matvlm serve --model out/matvlm-25 --teacher out/teacher     # teacher and hybrid side by side, with tokens/s
    matvlm serve                                                 # the quickstart's distilled hybrid

Upload an image, ask, read the answer as it streams; ask more (multi-turn, TinyLLaVA template); temperature 0 is
greedy. The page listens on 127.0.0.1 only unless --host says otherwise (anyone who reaches it can use the model).
On a GPU the answers come from the static-cache CUDA-graph decoder (`fast_decode`); --no-fast-decode uses generate().
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

QUICKSTART_DIR = Path("matvlm-quickstart")  # `matvlm quickstart`'s default --workdir, relative to where it ran
QUICKSTART_HYBRID, QUICKSTART_TEACHER = QUICKSTART_DIR / "hybrid-distilled", QUICKSTART_DIR / "teacher-matvlm"


def default_model() -> Path:
    """The quickstart's distilled hybrid in the current directory; SystemExit saying how to make one otherwise."""
    if (QUICKSTART_HYBRID / "config.json").is_file():
        return QUICKSTART_HYBRID
    raise SystemExit(
        f"matvlm serve: no --model given and no distilled hybrid at {QUICKSTART_HYBRID}/ here.\n"
        "  Make one with `matvlm quickstart` (about 7 minutes on a CPU) and run `matvlm serve` in the "
        "same folder,\n  or give a MaTVLM checkpoint: `matvlm serve --model PATH` (see `matvlm convert` "
        "and `matvlm distill`)."
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="matvlm serve",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--model", default=None, help=f"a MaTVLM checkpoint folder (default: {QUICKSTART_HYBRID} when it exists)"
    )
    parser.add_argument(
        "--teacher", default=None, help="a second checkpoint (the teacher) answering beside the model (default: none)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860, help="TCP port of the page (default: 7860)")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N (default: auto)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype; auto = as saved in the checkpoint (default: auto)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="the page's initial 'max new tokens', tokens (default: 128)"
    )
    parser.add_argument(
        "--no-fast-decode", action="store_true", help="on a GPU, use generate() instead of fast_decode (default: off)"
    )
    args = parser.parse_args(argv)
    gradio = importlib.util.find_spec("gradio")
    if gradio is None or gradio.origin is None:  # (a folder named gradio in the working directory is not Gradio)
        raise SystemExit('matvlm serve needs Gradio: pip install "matvlm-hf[demo]"')
    model = Path(args.model) if args.model else default_model()
    if args.model is None and args.teacher is None and (QUICKSTART_TEACHER / "config.json").is_file():
        print(f"serving {model}; add --teacher {QUICKSTART_TEACHER} to see the teacher answer beside it")

    from ..serving.chat import ChatModel
    from ..serving.gradio_app import launch

    kwargs = dict(device=args.device, dtype=args.dtype, fast_decode=not args.no_fast_decode)
    models = {}
    try:
        if args.teacher:
            models["teacher"] = ChatModel.load(args.teacher, "teacher", **kwargs)
        models["hybrid"] = ChatModel.load(model, "hybrid" if args.teacher else "model", **kwargs)
    except ValueError as e:
        raise SystemExit(f"matvlm serve: {e}") from e
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this address can use the model")
    launch(models, host=args.host, port=args.port, max_new_tokens=args.max_new_tokens)


if __name__ == "__main__":
    main()
