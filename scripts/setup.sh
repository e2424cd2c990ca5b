#!/usr/bin/env bash
# Creates .venv and installs the project (editable, with test extras) if not done yet.
# Re-installs when pyproject.toml changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.installed-$(sha1sum "$root/pyproject.toml" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing moe-relayfree into $venv (first run only)..." >&2
  log="$(mktemp)"
  if ! { python3 -m venv "$venv" &&
         "$venv/bin/python" -m pip install --upgrade pip &&
         "$venv/bin/python" -m pip install -e "$root[test]"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: install failed (log above)" >&2
    exit 1
  fi
  rm -f "$log"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
