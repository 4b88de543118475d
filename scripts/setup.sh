#!/usr/bin/env bash
# Set up hssl on a fresh Debian machine: gfortran and g++ when missing, a virtual environment
# in .venv, the pinned torch/torchvision pair and `pip install -e ".[dev]"`. Idempotent: a second
# run with unchanged pyproject.toml/constraints.txt returns in a second.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin="${HSSL_PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null || python_bin=python3

# gfortran: py3nj (needed by escnn) compiles Fortran; g++: torch.compile's CPU backend compiles C++.
missing=""
command -v gfortran >/dev/null || missing="$missing gfortran"
command -v g++ >/dev/null || missing="$missing g++"
if [ -n "$missing" ]; then
    echo "setup: installing$missing with apt"
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq $missing >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $("$python_bin" --version)"
    "$python_bin" -m venv .venv
fi

stamp=.venv/.hssl-installed
wanted=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    exit 0
fi

echo "setup: installing the pinned torch/torchvision pair and hssl (a few minutes the first time)"
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
quiet .venv/bin/python -m pip install -q -c constraints.txt torch torchvision
quiet .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
echo "$wanted" > "$stamp"
echo "setup: done ($(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'))"
