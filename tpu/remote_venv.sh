#!/usr/bin/env bash
# Runs on every TPU worker, inside the checkout (tpu/setup.sh calls it): makes .venv with a Python
# >= 3.11 that uv brings itself. TPU VM images may ship python3 3.10; the system python3 is at most
# used to fetch uv, never to make the venv. Usage: PYTHON_VERSION=3.11 bash tpu/remote_venv.sh
set -euo pipefail
: "${PYTHON_VERSION:=3.11}"
: "${PYTHON_PREFERENCE:=only-managed}"  # uv's own Python builds, whatever the image has
IFS=. read -r major minor _ <<<"${PYTHON_VERSION}"
if ! [[ "${major}" == 3 && "${minor:-0}" =~ ^[0-9]+$ && "${minor}" -ge 11 ]]; then
  echo "PYTHON_VERSION=${PYTHON_VERSION}: persyn_jax needs Python 3.11 or later" >&2
  exit 2
fi
export PATH="${HOME}/.local/bin:${HOME}/.cargo/bin:${PATH}"
if ! command -v uv >/dev/null 2>&1; then
  # uv from PyPI (a static binary in a wheel), else its standalone installer: neither needs 3.11
  python3 -m pip install --user -q uv 2>/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
fi
uv venv --python "${PYTHON_VERSION}" --python-preference "${PYTHON_PREFERENCE}" .venv
.venv/bin/python -c 'import sys; assert sys.version_info >= (3, 11), sys.version'
echo "$(.venv/bin/python --version) in $(pwd)/.venv"
