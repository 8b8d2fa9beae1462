#!/usr/bin/env bash
# Packs .gpu/ for a lent GPU machine (benchmarks/gpu_checks.sh runs there with it), from this
# checkout and its ../shared (or PAN_SHARED):
#   .gpu/site.tar.xz  the packages our jobs import that the machine's image lacks, built for its
#                     CPython 3.12 at the versions this checkout's .venv runs, installed into one
#                     folder; Ray without what a batch or training job never loads (Java, RLlib,
#                     Serve, LLM, source maps) and its binaries stripped: its wheel alone is over
#                     the 64 MiB a call may carry
#   .gpu/shared/      the weights, Set5, Set14 and the first 40 BSDS200 photos (what the GPU tests
#                     and benchmarks read)
# The image (/work/.library/device/KINDS.md) has torch, numpy, pillow, pyarrow, pandas, fsspec,
# pyyaml, rich, matplotlib, safetensors, huggingface_hub, aiohttp, grpcio, protobuf, msgpack,
# click, filelock, requests, attrs, pytest, pytest-xdist and pytest-timeout, and no network.
# .gpu/ is kept out of git (.git/info/exclude). Usage: bash benchmarks/gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
shared=${PAN_SHARED:-../shared}
limit=$((60 * 1024 * 1024))  # of the 64 MiB a call carries, the rest is the working tree

missing=(ray pydantic pydantic-core annotated-types typing-inspection typing-extensions jsonschema
    jsonschema-specifications referencing rpds-py tensorboardX imagecodecs fpng)
pins=$("$python" - "${missing[@]}" <<'EOF'
import sys
from importlib.metadata import version

print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
EOF
)

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qsxF '/.gpu/' "$exclude" || echo '/.gpu/' >>"$exclude"
rm -rf .gpu && mkdir -p .gpu/shared/train/BSDS200 .gpu/shared/benchmarks
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT

echo "packages for CPython 3.12: $pins"
# shellcheck disable=SC2086  # one argument per pin
"$python" -m pip install --quiet --no-deps --no-compile --only-binary=:all: --target "$site" \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 $pins
rm -rf "$site"/bin "$site"/ray/jars "$site"/ray/rllib "$site"/ray/serve "$site"/ray/llm
find "$site" -name '*.map' -delete
find "$site"/ray -type f \( -name '*.so' -o -name raylet -o -name gcs_server \) \
    -exec strip --strip-unneeded {} +
# imagecodecs: only the modules pipeline/imaging/codec.py calls (PNG, JPEG XL) and the libraries
# they link, found through their NEEDED entries: the rest is 66 of its 79 MB unpacked.
codecs="$site"/imagecodecs
keep=(_imcd _shared _shared_cython _png _jpegxl)
find "$codecs" -name '_*.so' | while read -r module; do
    name=$(basename "$module" .abi3.so)
    if [[ " ${keep[*]} " != *" $name "* ]]; then rm "$module"; fi
done
needed() { readelf -d "$@" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort -u; }
libs=$(needed "$codecs"/_*.so)
while :; do
    inside=$(for lib in $libs; do
        if [[ -e "$site/imagecodecs.libs/$lib" ]]; then echo "$site/imagecodecs.libs/$lib"; fi
    done)
    more=$( (echo "$libs"; [[ -z "$inside" ]] || needed $inside) | sort -u)
    [[ "$more" == "$libs" ]] && break
    libs=$more
done
for lib in "$site"/imagecodecs.libs/*; do
    if ! grep -qxF "$(basename "$lib")" <<<"$libs"; then rm "$lib"; fi
done
if ldd "$codecs"/_*.so | grep -q 'not found'; then
    echo "imagecodecs: a library its kept modules link was removed" >&2
    exit 1
fi
tar -cJf .gpu/site.tar.xz -C "$site" .

cp -r "$shared"/weights .gpu/shared/
cp -r "$shared"/benchmarks/Set5 "$shared"/benchmarks/Set14 .gpu/shared/benchmarks/
mapfile -t photos < <(find "$shared"/train/BSDS200 -maxdepth 1 -type f | sort)
cp "${photos[@]:0:40}" .gpu/shared/train/BSDS200/

tree=$(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f 1)
bundle=$(du -sb .gpu | cut -f 1)
echo "bundle $((bundle / 1024 / 1024)) MiB + working tree $((tree / 1024 / 1024)) MiB in .gpu/"
if ((bundle + tree > limit)); then
    echo "over the $((limit / 1024 / 1024)) MiB kept for a call: carry less" >&2
    exit 1
fi
