#!/usr/bin/env bash
# Create (or update) the virtual environment .venv in the checkout and install
# everything fairseq-clustered needs, pinned in requirements.txt. Quick when
# nothing changed: a stamp file remembers what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.fairseq-clustered-installed"
WANT=$(cat requirements.txt setup.py | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    # A system torch (a CUDA build, say) is respected: the venv sees it.
    if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        echo "[setup] creating $VENV on top of the system torch ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        echo "[setup] creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
pin() { grep -E "^$1==" requirements.txt; }

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing $(pin torch) (CPU build where no CUDA torch is present)"
    "${PIP[@]}" "$(pin torch)"
fi
if ! "$VENV/bin/python" -c "import triton" >/dev/null 2>&1; then
    echo "[setup] installing $(pin triton) (its interpreter runs the Triton kernels in the CPU tests)"
    "${PIP[@]}" "$(pin triton)"
fi
echo "[setup] installing fairseq's build requirements"
"${PIP[@]}" "$(pin numpy)" "$(pin cython)" setuptools wheel
echo "[setup] installing fairseq-fixed (built from source once, about 3 minutes) and the other pins"
# --no-build-isolation: otherwise pip pulls a multi-GB CUDA torch into fairseq's build env.
grep -vE '^(#|torch==|triton==|$)' requirements.txt > "$VENV/requirements-rest.txt"
"${PIP[@]}" --no-build-isolation -r "$VENV/requirements-rest.txt"
echo "[setup] installing fairseq-clustered (editable; builds the CUDA kernels where CUDA torch and nvcc exist)"
"${PIP[@]}" --no-build-isolation --no-deps -e .
echo "$WANT" > "$STAMP"
"$VENV/bin/python" -m fairseq_clustered.info
