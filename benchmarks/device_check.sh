#!/usr/bin/env bash
# One prepared device check for a GPU machine (nothing is downloaded; <= 8 min on one GPU).
#   bash benchmarks/device_check.sh OUT_DIR            # on the GPU machine
#   bash benchmarks/device_check.sh OUT_DIR --dry-run  # the same steps on the CPU at tiny sizes
# Writes OUT_DIR/device_check.json and OUT_DIR/device_check.md; the logic is in benchmarks/device_check.py.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
if [ "$#" -lt 1 ]; then
    echo "usage: bash benchmarks/device_check.sh OUT_DIR [--dry-run] [more options of device_check.py]" >&2
    exit 2
fi
if [ -x "$repo/.venv/bin/python" ]; then
    py="$repo/.venv/bin/python"
else
    # A bare GPU machine (its python3 holds torch and triton, not nnU-Net): install the wheels carried in .whl/
    # (nnU-Net and the dependencies it lacks, downloaded on a machine with the registry) and this repository, offline.
    py="$(command -v python3)"
    if [ -d "$repo/.whl" ]; then
        site="${DEVICE_CHECK_SITE:-/tmp/devcheck_site}"
        "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" \
            "$repo"/.whl/*.whl "$repo"
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
exec "$py" "$here/device_check.py" "$@"
