#!/usr/bin/env bash
# This clone's own venv: only its editable featcache, with the shared third-party venv's packages
# seen through a .pth file. setup.sh runs it after the shared venv is ready; tests/test_install.py
# runs it in two fresh clones to check that the second never changes what the first one imports.
# The venv is keyed by the clone's real path, so every clone gets its own and a rerun reuses it.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE_ROOT="${FEATCACHE_HOME:-$HOME/.cache/featcache}"
BASE="${FEATCACHE_BASE_VENV:-$CACHE_ROOT/venv-py311}"
CLONE_ID="$(pwd -P | sha256sum | cut -c1-12)"
VENV="${FEATCACHE_VENV:-$CACHE_ROOT/clones/$CLONE_ID}"
PY="${PYTHON:-python3}"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$CACHE_ROOT/pip}"

if [ ! -x "$BASE/bin/python" ]; then
  echo "no shared venv at $BASE: run bash .ci/setup.sh" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$SITE/_featcache_shared.pth"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .
ln -sfn "$VENV" .venv
