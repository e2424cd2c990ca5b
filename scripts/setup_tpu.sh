#!/usr/bin/env bash
# Creates .venv-tpu (the project with libtpu, for deviceless XLA:TPU compiles: scripts/aot.py,
# tests/test_aot.py) if not done yet. A venv of its own: with libtpu installed, JAX on a machine
# without a TPU logs TPU start-up errors at every start, which the main job should not show.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-tpu"
stamp="$venv/.installed-$(sha1sum "$root/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing moe-relayfree[tpu] into $venv (first run only, ~700 MB)..." >&2
  log="$(mktemp)"
  if ! { python3 -m venv "$venv" &&
         "$venv/bin/python" -m pip install --upgrade pip &&
         "$venv/bin/python" -m pip install -e "$root[tpu]"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: install failed (log above)" >&2
    exit 1
  fi
  rm -f "$log"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
