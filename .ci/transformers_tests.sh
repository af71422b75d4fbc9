#!/usr/bin/env bash
# Print the path of the `tests/` folder of the source distribution of the transformers release that PYTHON
# (default python3) has installed, downloading that sdist once from the package registry and extracting only its
# tests/ folder into a cache ($MATVLM_TRANSFORMERS_TESTS_CACHE, default ~/.cache/matvlm-hf/transformers-tests/<version>).
# tests/test_transformers_common.py runs transformers' common model tests from it (MATVLM_TRANSFORMERS_TESTS=<path>).
set -euo pipefail
python="${PYTHON:-python3}"
version="$("$python" -c 'import transformers; print(transformers.__version__)')"
cache="${MATVLM_TRANSFORMERS_TESTS_CACHE:-$HOME/.cache/matvlm-hf/transformers-tests}/$version"
if [ ! -f "$cache/tests/test_modeling_common.py" ] || [ ! -f "$cache/tests/__init__.py" ]; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT   # only this run's own download folder
    "$python" -m pip download -q --no-deps --no-binary :all: "transformers==$version" -d "$work" >&2
    tar -xzf "$work/transformers-$version.tar.gz" -C "$work" "transformers-$version/tests"
    mkdir -p "$(dirname "$cache")"
    rm -rf "$cache.partial"
    mkdir "$cache.partial" && mv "$work/transformers-$version/tests" "$cache.partial/tests"
    # the git tree's tests/ is a package (an empty __init__.py) and test_configuration_common.py reads that file;
    # the sdist leaves it out
    touch "$cache.partial/tests/__init__.py"
    rm -rf "$cache" && mv "$cache.partial" "$cache"   # only ever this script's own cache
fi
echo "$cache/tests"
