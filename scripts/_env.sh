# Shared by quickstart.sh and test.sh: create or reuse .venv and install synthgen into it.
# On machines without an NVIDIA GPU, torch is pinned to the 2.13.0 CPU wheel; without the pin
# pip resolves a CUDA build of several GB. GPU machines get pip's default (CUDA) torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SYNTHGEN_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

ensure_venv() {
    local extras="$1"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "creating virtual environment $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            echo "installing torch (CUDA build: an NVIDIA GPU was found)"
            "${pip[@]}" install torch
        else
            echo "installing torch==2.13.0 (CPU build: no NVIDIA GPU found)"
            "${pip[@]}" install "torch==2.13.0"
        fi
    fi
    # A constraint keeps pip from replacing the installed torch while resolving the rest.
    local constraint
    constraint="$(mktemp)"
    "$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$constraint"
    echo "installing synthgen[$extras]"
    "${pip[@]}" install -c "$constraint" -e "$ROOT[$extras]"
    rm -f "$constraint"
}
