#!/usr/bin/env bash
# Build the ONNX -> int8 TFLite converter environment that `vbxfx export --tflite` runs.
#
#   bash tools/setup_tflite_env.sh DIR      (e.g. .venv-tflite)
#
# onnx2tf and TensorFlow live in a virtual environment of their own: the set that the
# public VectorBlox SDK (release v3.1, setup_vars.sh) pins needs numpy 1.23 and protobuf 3.20,
# which cannot sit beside vbxfx's numpy 2 / onnx 1.23. These are the versions whose int8
# output vbxfx's checks were compared against. Python 3.11 is required (onnx2tf 1.22 and
# tensorflow-cpu 2.15 have no wheels for newer Pythons); set PYTHON to choose the interpreter.
#
# Prints the path of the onnx2tf executable on the last line; give it to vbxfx as
# `--onnx2tf PATH` or `VBXFX_ONNX2TF=PATH` (vbxfx also finds DIR/bin/onnx2tf through
# VBXFX_TFLITE_ENV=DIR, or onnx2tf on PATH).
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: bash tools/setup_tflite_env.sh DIR" >&2
    exit 2
fi
DIR=$1
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 \
           && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            PYTHON=$candidate
            break
        fi
    done
fi
if [ -z "$PYTHON" ]; then
    echo "setup_tflite_env: no Python 3.11 found (onnx2tf 1.22.3 / tensorflow-cpu 2.15.1 need it); set PYTHON=/path/to/python3.11" >&2
    exit 2
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "setup_tflite_env: $PYTHON is Python $("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])'), 3.11 is required" >&2
    exit 2
fi

start=$(date +%s)
echo "setup_tflite_env: creating $DIR with $("$PYTHON" --version 2>&1)" >&2
"$PYTHON" -m venv "$DIR"
PIP=("$DIR/bin/python" -m pip --disable-pip-version-check --no-input)
"${PIP[@]}" install -q --upgrade "pip<25" wheel
# One resolver run over the whole pinned set (the versions of VectorBlox SDK v3.1).
"${PIP[@]}" install -q \
    onnx2tf==1.22.3 \
    tensorflow-cpu==2.15.1 \
    tf_keras==2.15.1 \
    numpy==1.23.5 \
    onnx==1.16.1 \
    onnxruntime==1.18.1 \
    protobuf==3.20.3 \
    ml_dtypes==0.3.1 \
    onnx-graphsurgeon==0.6.1 \
    sng4onnx==1.0.1 \
    sne4onnx==2.0.1 \
    onnxsim==0.4.36 \
    psutil==5.9.5
# Smoke test: the converter imports and its helpers are where vbxfx looks for them.
"$DIR/bin/python" -c "import onnx2tf, tensorflow, onnx, onnxsim; print('onnx2tf', onnx2tf.__version__, 'tensorflow', tensorflow.__version__, 'onnx', onnx.__version__)" >&2
for tool in onnx2tf onnxsim; do
    if [ ! -x "$DIR/bin/$tool" ]; then
        echo "setup_tflite_env: $DIR/bin/$tool is missing after the install" >&2
        exit 1
    fi
done
echo "setup_tflite_env: done in $(( $(date +%s) - start )) s" >&2
cd "$DIR" && echo "$(pwd -P)/bin/onnx2tf"
