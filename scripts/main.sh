#!/usr/bin/env bash
# The main job: end-to-end inference with the default model on 8 emulated CPU devices.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/python scripts/infer.py "$@"
