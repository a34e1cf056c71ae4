#!/usr/bin/env bash
# Wheels for what a GPU machine of the device tool lacks (its image has torch, transformers,
# tiktoken, safetensors, numpy, Pillow; not fire, gguf, Meta's llama-models or fairscale), into
# .whl/, which git ignores and scripts/gpu_check.sh installs from. Run it here, where PyPI is reachable;
# the GPU machine has Python 3.12 on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    fire==0.7.1 termcolor==3.3.0 gguf==0.19.0 llama-models==0.3.0 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl fairscale==0.4.13  # an sdist only; pure Python
du -sh .whl
