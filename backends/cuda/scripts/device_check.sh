#!/usr/bin/env bash
# One call on the lent GPU machine: environment facts, install hetinfer + backends,
# the CUDA smoke check (twice: the second run must compile nothing), the backend's
# tests and the conformance suite on cuda. Logs go to $OUT; a summary is printed last.
#
#   bash backends/cuda/scripts/device_check.sh            (from the repository root)
#   STEPS="smoke tests conf" EXAMPLES=30 bash ...         (choose steps)
#
# Steps: env smoke tests conf graphs stash model generate qwen bench
#   stash     copy carried .models/smol.part.* into /tmp/hetinfer-models (kept while the
#             machine is warm: the 98 MB GGUF comes in two calls of < 64 MiB)
#   model     assemble the GGUF from the parts (sha256 checked), tests/test_cuda_model.py
#   generate  hetinfer generate --device cuda (f16 and bf16) on it
#   qwen      assemble .models/qwen.part.* (stashed over several calls), generate f16/bf16/int8
#   bench     tools/bench.py --device cuda, with the torch anchor if .carry/torch_anchor.py
set -u
OUT=${OUT:-/tmp/hetinfer-out}
mkdir -p "$OUT"
cd "$(dirname "$0")/../../.."
ROOT=$(pwd)
PY=${PY:-python3}
STEPS=${STEPS:-"env smoke tests conf"}
EXAMPLES=${EXAMPLES:-30}
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 HETINFER_CACHE=${HETINFER_CACHE:-/tmp/hetinfer-cache}
has() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }

# ---- environment -------------------------------------------------------------------
if has env; then
  { nvidia-smi; echo; $PY -V; which $PY
    $PY -m pip list 2>/dev/null | grep -iE "^(cuda|cupy|nvidia-cuda-nvrtc|nvidia-cublas|pluggy|hypothesis|ml.dtypes|numpy|gguf|pytest|setuptools|jinja2|tqdm|safetensors|tokenizers|sentencepiece) "
  } > "$OUT/env.txt" 2>&1
  grep -E "Driver Version|H100|H200|Python|cuda|cupy|nvrtc|pluggy|hypothesis|ml.dtypes|numpy|gguf|pytest|setuptools" "$OUT/env.txt" | head -30
fi

# ---- packages ------------------------------------------------------------------------
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
SHIM=/tmp/hetinfer-shim
shim() {  # dist name, import dir, entry-point lines: an importlib.metadata dist-info on sys.path
  local name=$1 dir=$2; shift 2
  mkdir -p "$SHIM/${name//-/_}-0.1.0.dist-info"
  printf 'Metadata-Version: 2.1\nName: %s\nVersion: 0.1.0\n' "$name" > "$SHIM/${name//-/_}-0.1.0.dist-info/METADATA"
  printf '%s\n' "$@" > "$SHIM/${name//-/_}-0.1.0.dist-info/entry_points.txt"
  export PYTHONPATH=$ROOT/$dir:$SHIM${PYTHONPATH:+:$PYTHONPATH}
  echo "install: $name via PYTHONPATH shim"
}
for spec in "hetinfer|.|core|[pytest11]|hetinfer = hetinfer.testing.plugin" \
            "hetinfer-cpu|backends/cpu|backends/cpu|[hetinfer]|cpu = hetinfer_cpu" \
            "hetinfer-cuda|backends/cuda|backends/cuda|[hetinfer]|cuda = hetinfer_cuda" \
            "hetinfer-models|models|models|[hetinfer]|models = hetinfer_models" \
            "hetinfer-serve|serve|serve|[hetinfer]|serve = hetinfer_serve"; do
  IFS='|' read -r name path dir sect ep <<< "$spec"
  if $PY -m pip install -q --no-deps --no-build-isolation -e "$path" > "$OUT/pip-$name.log" 2>&1; then
    echo "install: $name editable ok"
  else
    tail -3 "$OUT/pip-$name.log"; shim "$name" "$dir" "$sect" "$ep"
  fi
done
$PY -m hetinfer devices 2>&1 || $PY -c "import hetinfer; [print('device:', d.name, d.available, d.reason or d.description) for d in hetinfer.devices()]" 2>&1
$PY -m hetinfer kernels 2>&1 | head -16

# ---- smoke (twice) -------------------------------------------------------------------
if has smoke; then
  timeout -s ABRT 150 $PY backends/cuda/scripts/cuda_smoke.py 2>&1 | tee "$OUT/smoke.log"
  echo "--- second start (disk cache) ---" | tee -a "$OUT/smoke.log"
  timeout -s ABRT 60 $PY backends/cuda/scripts/cuda_smoke.py --no-timing 2>&1 | grep -E "compile stats|first op" | tee -a "$OUT/smoke.log"
fi

# ---- tests ---------------------------------------------------------------------------
if has tests; then
  timeout -s ABRT 150 $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda_backend.py 2>&1 | tee "$OUT/test_cuda_backend.log" | tail -40
  echo "--- matmul without CuPy (built-in tiled GEMM) ---"
  HETINFER_CUDA_CUPY=0 timeout -s ABRT 100 $PY -m pytest -q -p no:cacheprovider -k "matmul or cupy" \
    tests/test_cuda_backend.py 2>&1 | tail -2
fi
if has conf; then
  if [ -f core/hetinfer/testing/conformance.py ]; then
    timeout -s ABRT 200 $PY -m pytest -v -p no:cacheprovider --hetinfer-device=cuda --hetinfer-examples="$EXAMPLES" \
      core/hetinfer/testing/conformance.py > "$OUT/conformance.log" 2>&1
    grep -E "FAILED|Error|error" "$OUT/conformance.log" | head -60
    echo "=== conformance per dtype ==="
    for dt in f32 f16 bf16; do
      p=$(grep -cE "test_kernel_conforms\[[a-z_]+-$dt\] PASSED" "$OUT/conformance.log")
      f=$(grep -cE "test_kernel_conforms\[[a-z_]+-$dt\] FAILED" "$OUT/conformance.log")
      echo "$dt: $p passed, $f failed"
    done
    tail -3 "$OUT/conformance.log"
  else
    echo "conformance suite not present (core/hetinfer/testing/conformance.py)"
  fi
fi
if has graphs; then
  timeout -s ABRT 200 $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda_graphs.py 2>&1 \
    | tee "$OUT/test_cuda_graphs.log" | tail -15
fi
MODELS=/tmp/hetinfer-models
GGUF=$MODELS/SmolLM2-135M-Instruct.Q4_1.gguf
if has stash; then
  mkdir -p $MODELS
  cp -v .models/smol.part.* .models/smol.sha256 $MODELS/ 2>/dev/null
  ls -la $MODELS
fi
if has model || has generate; then
  if [ ! -f "$GGUF" ]; then
    mkdir -p $MODELS; cp .models/smol.part.* .models/smol.sha256 $MODELS/ 2>/dev/null
    if [ -f $MODELS/smol.part.aa ] && [ -f $MODELS/smol.part.ab ]; then
      cat $MODELS/smol.part.aa $MODELS/smol.part.ab > "$GGUF"
      if [ "$(sha256sum "$GGUF" | cut -d' ' -f1)" != "$(cat $MODELS/smol.sha256)" ]; then
        echo "GGUF sha256 mismatch"; rm -f "$GGUF"
      else echo "GGUF assembled, sha256 ok"; fi
    else echo "GGUF parts missing: $(ls $MODELS 2>&1)"; fi
  fi
fi
if has model && [ -f "$GGUF" ]; then
  HETINFER_SMOLLM2_GGUF=$GGUF timeout -s ABRT 300 $PY -m pytest -q -rs -s -p no:cacheprovider \
    tests/test_cuda_model.py 2>&1 | tee "$OUT/test_cuda_model.log" | grep -vE "^\s*$" | tail -25
fi
if has generate && [ -f "$GGUF" ]; then
  for dt in f16 bf16 f32; do
    echo "--- generate --dtype $dt ---"
    timeout -s ABRT 120 $PY -m hetinfer generate --device cuda --dtype $dt --model "$GGUF" -n 64 \
      "Once upon a time" 2>&1 | tr '\r' '\n' | grep -vE "loading|checking|^\s*$" | tail -4 | tee -a "$OUT/generate.log"
  done
  echo "--- generate --eager f16 ---"
  timeout -s ABRT 120 $PY -m hetinfer generate --device cuda --dtype f16 --eager --model "$GGUF" -n 64 \
    "Once upon a time" 2>&1 | tr '\r' '\n' | grep -vE "loading|checking|^\s*$" | tail -3 | tee -a "$OUT/generate.log"
fi
# qwen: the Qwen2.5 GGUF comes in parts (.models/qwen.part.a..h, one per call while the
# machine stays warm), each copied to $MODELS by the `stash` step; assembled and run here
QWEN=$MODELS/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
if has stash; then cp -v .models/qwen.part.* .models/qwen.sha256 $MODELS/ 2>/dev/null; fi
if has qwen; then
  if [ ! -f "$QWEN" ]; then
    cat $MODELS/qwen.part.* > "$QWEN"
    if [ "$(sha256sum "$QWEN" | cut -d' ' -f1)" != "$(cat $MODELS/qwen.sha256)" ]; then
      echo "Qwen GGUF sha256 mismatch (parts: $(ls $MODELS | tr '\n' ' '))"; rm -f "$QWEN"
    else echo "Qwen GGUF assembled, sha256 ok"; fi
  fi
  if [ -f "$QWEN" ]; then
    for dt in f16 bf16; do
      echo "--- qwen generate --dtype $dt ---"
      timeout -s ABRT 150 $PY -m hetinfer generate --device cuda --dtype $dt --model "$QWEN" -n 96 \
        "Write a Python function that checks whether a number is prime." 2>&1 | tr '\r' '\n' \
        | grep -vE "loading|checking|^\s*$" | tail -14 | tee -a "$OUT/qwen.log"
    done
    echo "--- qwen generate --quantize int8 --dtype f16 ---"
    timeout -s ABRT 150 $PY -m hetinfer generate --device cuda --dtype f16 --quantize int8 --model "$QWEN" -n 64 \
      "Write a Python function that reverses a string." 2>&1 | tr '\r' '\n' \
      | grep -vE "loading|checking|^\s*$" | tail -10 | tee -a "$OUT/qwen.log"
  fi
fi
if has bench; then
  A=""; [ -f .carry/torch_anchor.py ] && A="--anchor .carry/torch_anchor.py"
  timeout -s ABRT ${BENCH_TIMEOUT:-540} $PY tools/bench.py --device cuda ${BENCH_ARGS:-} $A 2>&1 \
    | tee "$OUT/bench.log" | grep -E "^\{|Error|error" | tail -30
fi
echo "=== summary ==="
grep -E "compile stats" "$OUT/smoke.log" 2>/dev/null
tail -1 "$OUT/test_cuda_backend.log" 2>/dev/null
tail -1 "$OUT/conformance.log" 2>/dev/null
tail -1 "$OUT/test_cuda_graphs.log" 2>/dev/null
tail -1 "$OUT/test_cuda_model.log" 2>/dev/null
