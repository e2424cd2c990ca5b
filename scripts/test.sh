#!/usr/bin/env bash
# Runs the test suite on CPU with 8 emulated devices (tests/conftest.py sets XLA_FLAGS), in
# MOE_RELAYFREE_TEST_WORKERS pytest-xdist processes (default 2: most of the time goes to XLA
# compiles, one core each; every worker holds its own 8 emulated devices).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Both environments at once on a fresh machine (mostly downloads); each script is a no-op
# once its environment is installed. .venv-tpu: tests/test_aot.py compiles for TPU topologies.
bash "$root/scripts/setup.sh" & main=$!
bash "$root/scripts/setup_tpu.sh" & tpu=$!
# Both waited for (set -e does not stop at a failed command left of &&), then a failure exits.
status=0
wait "$main" || status=$?
wait "$tpu" || status=$?
[ "$status" -eq 0 ] || exit "$status"
cd "$root"
exec .venv/bin/python -m pytest -q -n "${MOE_RELAYFREE_TEST_WORKERS:-2}" --dist worksteal "$@"
