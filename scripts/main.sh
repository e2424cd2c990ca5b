#!/usr/bin/env bash
# The main job: relay-free MoE on 8 emulated CPU devices (real devices where present).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/python scripts/demo.py "$@"
