#!/usr/bin/env bash
# Builds {{name}}.wasm: `bash build.sh`. The first run installs componentize-py, at the version
# requirements.txt pins, into .venv/ with the first Python >= 3.10 found (or $PYTHON); so does a
# run after the pin changed, so the build never uses a version other than the pinned one.
set -euo pipefail
cd "$(dirname "$0")"
version="$(sed -n 's/^componentize-py==\([^ ;#]*\).*/\1/p' requirements.txt)"
if [[ -z "$version" ]]; then
  echo "build.sh: requirements.txt must pin the toolchain: add a line componentize-py==VERSION" >&2
  exit 1
fi
if ! .venv/bin/componentize-py --version 2>/dev/null | grep -qxF "componentize-py $version"; then
  for python in ${PYTHON:-} python3.13 python3.12 python3.11 python3.10 python3; do
    "$python" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null && break
    python=""
  done
  [[ -n "$python" ]] || { echo "build.sh: needs Python >= 3.10 with venv (apt install python3-venv)" >&2; exit 3; }
  rm -rf .venv
  "$python" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
fi
# --stub-wasi: the host refuses the clock, file and socket imports CPython has; stubs trap instead.
env -u VIRTUAL_ENV .venv/bin/componentize-py -d wit -w step componentize --stub-wasi app -o {{name}}.wasm
echo "built {{name}}.wasm ($(wc -c < {{name}}.wasm) bytes)"
