#!/usr/bin/env bash
# Run the test suite (sets up .venv the first time). Extra arguments go to pytest, e.g. -m slow.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${TANBR_VENV:-$root/.venv}/bin/python" -m pytest "$@"
