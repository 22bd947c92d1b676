#!/usr/bin/env bash
# What a session with a GPU runs, in as few device calls as possible (each phase fits well
# inside one 10-minute call on an H100):
#
#   bash benchmarks/gpu_session.sh build test     # CUDA build in place, GPU tests
#   bash benchmarks/gpu_session.sh build bench    # CUDA build in place, decode + losses benchmarks
#
# Phases, in the order given:
#   build  build fastsafe._C in place against the machine's torch, CUDA kernels included
#          (FASTSAFE_STRICT_BUILD=1: a failed build stops here), then `python -m fastsafe backends`
#   test   the kernel and training tests on the GPU: CUDA backend against the reference, Triton
#          kernels on hardware (no interpreter), fused token_logps / losses on cuda tensors
#   bench  python -m benchmarks.decode and python -m benchmarks.losses (full grids); the JSON
#          files land in benchmarks/results/ named after the device
#   quick  the same benchmarks on their --quick grids (a first look)
#   generation  the compiled decoding loop (issue 13) at B=1 and B=64: SmolLM2 (fp32) and a
#          Llama-1B-shaped model with random weights (bf16), 100k entities; its own call
#          (compiles under reduce-overhead: about a minute per configuration and batch)
#
# The log and the result files are copied to $OUT when it is set (the device tool's folder that
# comes back), so the results can be committed from the machine that has the repository.
# Needs on the GPU machine: torch with CUDA, triton, transformers, pytest, hypothesis, nvcc.
set -u
set -o pipefail
PY=${PYTHON:-python3}
DEST=${OUT:-}
LOG=${DEST:-/tmp}/gpu_session.log
export PYTHONUNBUFFERED=1
[ $# -gt 0 ] || set -- build test
STAMP=$(mktemp)
unset TRITON_INTERPRET
cd "$(dirname "$0")/.."

run() {
    echo "+ $*" | tee -a "$LOG"
    "$@" 2>&1 | tee -a "$LOG"
}

status=0
for phase in "$@"; do
    case "$phase" in
        build)
            run nvidia-smi -L
            run "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
            TORCH_CUDA_ARCH_LIST=9.0 FASTSAFE_STRICT_BUILD=1 run "$PY" setup.py build_ext --inplace -q || exit 1
            run "$PY" -m fastsafe backends || status=1
            ;;
        test)
            run "$PY" -m pytest -q -p no:cacheprovider tests/test_native_build.py tests/test_safe_topk_triton.py \
                tests/test_safe_topk_backends.py tests/test_training_triton.py tests/test_training_token_logps.py \
                tests/test_training_losses.py || status=1
            ;;
        bench)
            run "$PY" -m benchmarks.decode || status=1
            run "$PY" -m benchmarks.losses || status=1
            ;;
        generation)
            run "$PY" -m benchmarks.generation --compiled --batches 1,64 --entities 100000 --repeat 5 || status=1
            run "$PY" -m benchmarks.generation --compiled --batches 1,64 --entities 100000 --repeat 5 \
                --random-model 1b --dtype bfloat16 --only fastsafe_compiled,fastsafe_compiled_filter || status=1
            ;;
        quick)
            run "$PY" -m benchmarks.decode --quick || status=1
            run "$PY" -m benchmarks.losses --quick || status=1
            ;;
        *)
            echo "unknown phase $phase (expected build, test, bench, quick, generation)" | tee -a "$LOG"
            exit 2
            ;;
    esac
done

if [ -n "$DEST" ]; then
    for f in benchmarks/results/*.json; do
        [ "$f" -nt "$STAMP" ] && cp "$f" "$DEST/"   # the files this run wrote
    done
fi
exit $status
