"""`matvlm import`: an authors'-layout MaTVLM checkpoint (hustvl/MaTVLM) -> a matvlm-hf checkpoint.

matvlm import --input hustvl/MaTVLM_0_25_Mamba2 --output out/matvlm-paper-25
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..convert.authors_checkpoint import import_authors_checkpoint
from ..convert.conversion import DTYPES
from ..errors import UserError


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="matvlm import",
        description="Import an authors'-layout MaTVLM checkpoint (hustvl/MaTVLM, e.g. "
        "hustvl/MaTVLM_0_25_Mamba2) as a matvlm-hf checkpoint: same tensors, transformers remote code, processor.",
    )
    parser.add_argument(
        "--input",
        required=True,
        help="the authors' checkpoint folder (or Hub repo id, e.g. hustvl/MaTVLM_0_25_Mamba2); required",
    )
    parser.add_argument("--output", required=True, help="output folder for the matvlm-hf checkpoint; required")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="weights dtype of the output (default: keep the source's)"
    )
    parser.add_argument(
        "--max-shard-size",
        type=int,
        default=2 * 1024**3,
        help="largest output shard, bytes (default: 2147483648 = 2 GiB)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output, built beside it first (default: off)"
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        default=None,
        help="also upload the result to this Hub repo (default: no upload)",
    )
    args = parser.parse_args(argv)
    try:
        out = import_authors_checkpoint(
            args.input,
            args.output,
            dtype=args.dtype,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
            push_to_hub=args.push_to_hub,
        )
    except UserError as err:  # ConversionError, UnsafeOutputError, ...: a user mistake, said without traceback
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
