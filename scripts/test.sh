#!/usr/bin/env bash
# Runs the test suite on CPU with 8 emulated devices (tests/conftest.py sets XLA_FLAGS).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/python -m pytest -q "$@"
