#!/usr/bin/env bash
# Sets up benchmarks/.peer-venv for benchmarks/peer.py: our package and the super-image library side by side.
#
#   bash benchmarks/peer_setup.sh            # PYTHON=python3.11 by default
#
# Re-running reuses the venv and only installs what is missing. Order matters:
#   1. torch==2.13.0 first: the pin takes the CPU build that lies on local disk; a bare `torch`
#      (as a dependency of anything below) would pull a multi-GB CUDA build instead.
#   2. -e . : our package (pipeline) with its dependencies.
#   3. super-image==0.2.0 with --no-deps, plus the modules it imports at import time other than
#      torchvision (opencv-python-headless, h5py, tqdm, huggingface_hub). torchvision is NOT installed:
#      this CPU torch has no matching torchvision, and super-image's model and ImageLoader do not use it
#      (only its dataset builder does); peer.py stubs it in sys.modules.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/benchmarks/.peer-venv"
python="${PYTHON:-python3.11}"

if [[ -x "$venv/bin/python" ]]; then
    echo "reusing $venv"
else
    echo "creating $venv with $python"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet)

"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e "$repo"
"${pip[@]}" --no-deps "super-image==0.2.0"
"${pip[@]}" opencv-python-headless h5py tqdm huggingface_hub

"$venv/bin/python" - <<'PY'
import sys, types

for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.transforms"):
    sys.modules[name] = types.ModuleType(name)
import torch, super_image, pipeline  # noqa: E401
print(f"ok: torch {torch.__version__}, super_image from {super_image.__file__}, pipeline from {pipeline.__file__}")
PY

cat <<MSG

Peer venv ready. Run the benchmark from the repo root:

    cd $repo
    benchmarks/.peer-venv/bin/python benchmarks/peer.py            # 3 interleaved rounds
    benchmarks/.peer-venv/bin/python benchmarks/peer.py --rounds 5
MSG
