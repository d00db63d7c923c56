#!/usr/bin/env bash
# Set up .venv on a fresh Linux machine: CPU torch 2.13.0, this package with every extra, and
# clang-19 (Debian) for the Metal-on-CPU test harness. Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v clang++-19 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-19 >/dev/null
  else
    echo "note: clang++-19 not found and cannot be installed here (needs root + apt-get);" \
         "the metal-emulated backend and its tests will be skipped" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[all]"
echo "setup done: $(.venv/bin/python -c 'import torch, quantattn_hf; print("torch", torch.__version__, "quantattn-hf", quantattn_hf.__version__)')"
