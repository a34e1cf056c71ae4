#!/usr/bin/env bash
# The GPU lane in one command: the CUDA tests (tests/test_cuda.py and tests/test_devices.py's CUDA
# cases), then bench.py's GPU rows (8B-shape bf16 decode against the measured roof, prefill; the cost
# of verifying 5 tokens and a 1B-shape draft's step, for speculative decoding; 1B-shape finetune
# tokens/s and MFU), into one markdown report.
#
#   bash scripts/gpu_wheels.sh             # first, here: wheels of what the GPU image lacks, in .whl/
#   bash scripts/gpu_check.sh              # on a CUDA machine (meant to fit 8 minutes on one H100/H200)
#   bash scripts/gpu_check.sh --dry-run    # anywhere: the same steps on the CPU with a tiny shape
#
# The report is $OUT/gpu_check.md (OUT defaults to gpu_check/), the test log $OUT/tests.log. With the
# device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check}"
mkdir -p "$out"
report="$out/gpu_check.md"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if [ "${1:-}" = "--dry-run" ]; then
    device=cpu; decode_shape=tiny; train_shape=tiny
    timing=(--repeats 1 --train_repeats 1 --prompt_len 8 --new_tokens 4 --prefill_len 16 --B 1 --T 16 --nocompile)
    train=()
else
    device=cuda; decode_shape=8b; train_shape=1b
    timing=(--repeats 3 --train_repeats 3)
    train=(--B 2 --T 2048)
fi
if [ "$device" = cuda ] && compgen -G ".whl/*.whl" > /dev/null; then  # the dry run uses this environment
    "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
        || { echo "error: .whl holds wheels for Python 3.12 (scripts/gpu_wheels.sh); $py is another" >&2; exit 2; }
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
    echo "# GPU check, $(date -u +%Y-%m-%d)"
    echo
    "$py" -c 'import torch; print(f"torch {torch.__version__}, " + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device (dry run)"))'
    echo
    echo "## Tests: tests/test_cuda.py, and tests/test_devices.py on CUDA"
    echo
} > "$report"
failed=0
# -k cuda: every test of test_cuda.py (its name holds it) and test_devices.py's [cuda-...] cases
"$py" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_devices.py -k cuda 2>&1 \
    | tee "$out/tests.log" || failed=1
{ echo '```'; grep -E "^(SKIPPED|FAILED|ERROR)|passed|failed|skipped|error" "$out/tests.log" | tail -20; echo '```'; } >> "$report"

echo >> "$report"
echo "## bench.py" >> "$report"
"$py" bench.py --device "$device" --shape "$decode_shape" --dtypes bf16 --sections roof,decode,prefill \
    "${timing[@]}" --markdown "$report" || failed=1
"$py" bench.py --device "$device" --shape "$decode_shape" --dtypes bf16 --sections speculative \
    "${timing[@]}" --markdown "$report" || failed=1
"$py" bench.py --device "$device" --shape "$train_shape" --dtypes bf16 --sections finetune \
    "${timing[@]}" "${train[@]}" --markdown "$report" || failed=1
cat "$report"
exit $failed
