#!/usr/bin/env bash
# Runs the test suite on CPU with 8 emulated devices (tests/conftest.py sets XLA_FLAGS), in
# MOE_RELAYFREE_TEST_WORKERS pytest-xdist processes (default 2: most of the time goes to XLA
# compiles, one core each; every worker holds its own 8 emulated devices).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
bash "$root/scripts/setup_tpu.sh"  # tests/test_aot.py compiles for TPU topologies in it
cd "$root"
exec .venv/bin/python -m pytest -q -n "${MOE_RELAYFREE_TEST_WORKERS:-2}" --dist worksteal "$@"
