#!/usr/bin/env bash
# One call on the lent GPU: install (device_check.sh's packages step), the CUDA tests of the
# engine, graphs, backend and batch-invariant GEMM, the conformance suite on cuda, then
# tools/bench.py cases chosen by BENCH (empty: none). Logs under $OUT.
#   STEPS_T="tests conf" BENCH="--batch 1,16,64 --skip-single" bash backends/cuda/scripts/engine_check.sh
# PRE_STEPS: device_check.sh steps run first (default: install only; e.g. "stash");
# TESTS: the pytest files of the tests step.
set -u
OUT=${OUT:-/tmp/hetinfer-out}
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1
STEPS="${PRE_STEPS:- }" bash backends/cuda/scripts/device_check.sh > "$OUT/install.log" 2>&1
tail -3 "$OUT/install.log"
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}      # the carried .whl packages
T=${STEPS_T:-"tests conf"}
EX=${EXAMPLES:-30}
case " $T " in *" tests "*)
  TESTS=${TESTS:-"tests/test_cuda_engine.py tests/test_cuda_graphs.py tests/test_cuda_backend.py tests/test_cuda_batch_invariant.py"}
  timeout -s ABRT ${TESTS_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -rfs $TESTS 2>&1 | tee "$OUT/tests.log" | tail -25 ;;
esac
case " $T " in *" conf "*)
  timeout -s ABRT ${CONF_TIMEOUT:-240} python3 -m pytest -q -rf -p no:cacheprovider --hetinfer-device=cuda --hetinfer-examples="$EX" \
    core/hetinfer/testing/conformance.py 2>&1 | tee "$OUT/conformance.log" | tail -8 ;;
esac
if [ -n "${BENCH:-}" ]; then
  timeout -s ABRT ${BENCH_TIMEOUT:-400} python3 tools/bench.py --device cuda $BENCH 2>&1 | tee "$OUT/bench.log" | grep -v '"breakdown"' | cut -c1-600
fi
