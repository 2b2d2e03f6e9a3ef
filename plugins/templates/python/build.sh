#!/usr/bin/env bash
# Builds {{name}}.wasm: `bash build.sh`. The first run installs componentize-py (requirements.txt)
# into .venv/ with the first Python >= 3.10 found (or $PYTHON).
set -euo pipefail
cd "$(dirname "$0")"
if ! [[ -x .venv/bin/componentize-py ]]; then
  for python in ${PYTHON:-} python3.13 python3.12 python3.11 python3.10 python3; do
    "$python" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null && break
    python=""
  done
  [[ -n "$python" ]] || { echo "build.sh: needs Python >= 3.10 with venv (apt install python3-venv)" >&2; exit 3; }
  "$python" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
fi
# --stub-wasi: the host refuses the clock, file and socket imports CPython has; stubs trap instead.
env -u VIRTUAL_ENV .venv/bin/componentize-py -d wit -w step componentize --stub-wasi app -o {{name}}.wasm
echo "built {{name}}.wasm ($(wc -c < {{name}}.wasm) bytes)"
