#!/usr/bin/env bash
# The GPU suite (benchmarks/gpu_suite.py; issue 24) from a checkout, without installing vqtok: on a
# machine whose python3 has torch, triton, pyarrow, pillow, numpy, safetensors, tokenizers, fsspec,
# pyyaml and pytest but not vqtok's other pure-Python needs (and no Ray, no network). Installs the
# wheels carried in benchmarks/gpu_wheels/ into a temporary folder, puts a `vqtok` link to this
# checkout beside them, puts that folder first on PYTHONPATH, and runs the suite with the arguments
# given. PYTHON names another interpreter (default python3).
#
#     bash benchmarks/gpu_suite.sh --out DIR [--only PART,...] [--limit PART=S] [--cpu-smoke]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
site="$(mktemp -d "${TMPDIR:-/tmp}/vqtok-gpu-site.XXXXXX")"
trap 'rm -rf "$site"' EXIT
if ! "$py" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$site" \
        "$repo"/benchmarks/gpu_wheels/*.whl; then
    echo "gpu_suite.sh: could not install the wheels in $repo/benchmarks/gpu_wheels with $py -m pip;" \
         "set PYTHON to an interpreter that has pip (and torch)" >&2
    exit 2
fi
ln -s "$repo" "$site/vqtok"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
"$py" "$repo/benchmarks/gpu_suite.py" "$@"
