#!/usr/bin/env bash
# Serves the built-in default model (or --checkpoint DIR) over an OpenAI-compatible HTTP API on
# 8 emulated CPU devices; the same flags as scripts/infer.py plus --host/--port.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/python scripts/serve.py "$@"
