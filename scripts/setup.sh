#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for edgetrain: system packages (Mosquitto, Fashion-MNIST),
# a virtual environment in .venv, and edgetrain with the host extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_passwd >/dev/null 2>&1 || need+=(mosquitto-clients)
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: anything looser pulls the multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check 'torch==2.13.0'
# export,ort,executorch: the runtime parity tests need all three (~40 s and ~670 MB more, measured).
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${EXTRAS:-torch,server,bench,test,export,ort,executorch}]"
echo "setup: done ($(.venv/bin/python -c 'import torch, numpy; print("torch", torch.__version__, "numpy", numpy.__version__)'))"
