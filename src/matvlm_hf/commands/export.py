"""`matvlm export --format authors`: a matvlm-hf checkpoint -> the authors' layout (hustvl/MaTVLM).

    matvlm export --format authors --input out/matvlm-paper-25 --output out/authors-25
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..authors_checkpoint import export_authors_checkpoint
from ..conversion import ConversionError


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="matvlm export", description="Write a matvlm-hf checkpoint in another layout: `authors` = hustvl/MaTVLM's "
        "(TinyLLaVA folder + mamba_config.json, loadable by their code).")
    parser.add_argument("--format", required=True, choices=["authors"])
    parser.add_argument("--input", required=True, help="matvlm-hf checkpoint folder")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--max-shard-size", type=int, default=2 * 1024**3, help="bytes per output shard")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output (built beside it first)")
    args = parser.parse_args(argv)
    try:
        out = export_authors_checkpoint(args.input, args.output, overwrite=args.overwrite,
                                        max_shard_size=args.max_shard_size)
    except ConversionError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
