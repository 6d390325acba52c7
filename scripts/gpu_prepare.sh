#!/usr/bin/env bash
# Prepares, on this (CPU) machine, what scripts/gpu_check.sh needs on the GPU machine, which has
# no internet and whose image already holds jax 0.11 (CUDA 13), flax, optax, orbax, torch,
# absl, numpy, pillow, scikit-learn, tqdm, matplotlib and safetensors:
#   .whl/                   Python 3.12 wheels of the rest (ml-collections, tensorboardX, grain and its
#                           array-record and portpicker, pyautoattack without its 44 MB example
#                           model), installed there with --no-deps --target; tensorflow-datasets
#                           is left out (only the streamed ImageNet path reads it)
#   data/cifar-10-subset/   the real CIFAR-10 subset, copied from ../shared (which does not travel)
# Both folders are ignored by git; name them in the device call's carry: [".whl", "data"].
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SHARED=${SHARED:-../shared}
rm -rf .whl && mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do platforms+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 \
    portpicker==1.6.0 pyautoattack==0.2.0 tensorboardX==2.6.5
# pyautoattack ships a 44 MB example checkpoint; the wheel is rewritten without its examples.
"$PY" - <<'PYEOF'
import glob, os, zipfile
src = glob.glob('.whl/pyautoattack-*.whl')[0]
dst = src + '.slim'
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w', zipfile.ZIP_DEFLATED) as zout:
  for item in zin.infolist():
    if '/examples/' in item.filename:
      continue
    data = zin.read(item.filename)
    if item.filename.endswith('.dist-info/RECORD'):
      data = b'\n'.join(l for l in data.split(b'\n') if b'/examples/' not in l)
    zout.writestr(item, data)
os.replace(dst, src)
PYEOF
mkdir -p data/cifar-10-subset
cp -r "$SHARED/data/cifar-10-subset/cifar-10-batches-py" data/cifar-10-subset/
chmod -R u+w data/cifar-10-subset
du -sh .whl data/cifar-10-subset
