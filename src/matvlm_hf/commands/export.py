"""`matvlm export --format authors`: a matvlm-hf checkpoint -> the authors' layout (hustvl/MaTVLM).

matvlm export --format authors --input out/matvlm-paper-25 --output out/authors-25
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..convert.authors_checkpoint import export_authors_checkpoint
from ..errors import UserError


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="matvlm export",
        description="Write a matvlm-hf checkpoint in another layout: `authors` = hustvl/MaTVLM's "
        "(TinyLLaVA folder + mamba_config.json, loadable by their code).",
    )
    parser.add_argument(
        "--format", required=True, choices=["authors"], help="target layout: authors (hustvl/MaTVLM's); required"
    )
    parser.add_argument("--input", required=True, help="matvlm-hf checkpoint folder to export; required")
    parser.add_argument("--output", required=True, help="output folder; required")
    parser.add_argument(
        "--max-shard-size",
        type=int,
        default=2 * 1024**3,
        help="largest output shard, bytes (default: 2147483648 = 2 GiB)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output, built beside it first (default: off)"
    )
    args = parser.parse_args(argv)
    try:
        out = export_authors_checkpoint(
            args.input, args.output, overwrite=args.overwrite, max_shard_size=args.max_shard_size
        )
    except UserError as err:  # ConversionError, UnsafeOutputError, ...: a user mistake, said without traceback
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
