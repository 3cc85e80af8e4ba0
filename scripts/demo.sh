#!/usr/bin/env bash
# The main job: build the default model (cached after the first run), then compare Tanbr with
# the baselines on a drifting stream of real requests. Extra arguments go to `tanbr compare`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${TANBR_VENV:-$root/.venv}/bin/tanbr" compare --preset demo "$@"
