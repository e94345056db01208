#!/usr/bin/env bash
# One call on the lent GPU with the real Qwen2.5 Q4_K_M GGUF assembled in /tmp/hetinfer-models
# (carried in parts over earlier calls): the packed conformance cases, generate packed f16/bf16
# and dequantized f16, the packed-vs-dequantized slow test, `hetinfer serve --device cuda` with
# the openai client (tests/test_cuda_serve.py); PART=bench: tools/serve_bench.py at 16 and 64
# clients with the offline engine figure, and the torch anchor's batched decode of the same shape.
# MODEL=random: no GGUF here; random-weight checkpoints of the SHAPES (default qwen2.5-0.5b; f16, HF
# directories, random_checkpoint.py) serve the serve test (the first shape) and the benchmark
# (PART=bench: the benchmark only). Each benchmark also runs 16 clients at each MNBT step token budget.
# The GGUF's parts: each call before copies its .models/qwen.part.* to /tmp/hetinfer-models
# (mkdir -p /tmp/hetinfer-models && cp .models/qwen.* /tmp/hetinfer-models/); assembled here.
set -u
OUT=${OUT:-/tmp/hetinfer-out}
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1
STEPS=" " bash backends/cuda/scripts/device_check.sh > "$OUT/install.log" 2>&1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
Q=/tmp/hetinfer-models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
PART=${PART:-tests}
bench() {   # $1: the model; $2: a name for the output files
  timeout -s ABRT 330 python3 tools/serve_bench.py --device cuda --dtype f16 ${WEIGHTS:+--weights $WEIGHTS} --model "$1" \
    --max-context 1024 --kv-cache-memory 8G --concurrency 16,64 --num-requests ${NREQ:-256} --input-len 128 --output-len 128 \
    --offline 2> "$OUT/serve_bench_$2.err" | tee "$OUT/serve_bench_$2.jsonl"
  tail -3 "$OUT/serve_bench_$2.err"
  for t in ${MNBT:-512}; do         # 16 clients with a smaller step token budget: prompts prefill over several steps
    echo "--- 16 clients, --max-num-batched-tokens $t"
    timeout -s ABRT 120 python3 tools/serve_bench.py --device cuda --dtype f16 --model "$1" --max-context 1024 \
      --kv-cache-memory 8G --concurrency 16 --num-requests ${NREQ:-256} --input-len 128 --output-len 128 \
      --serve-arg=--max-num-batched-tokens --serve-arg=$t 2>> "$OUT/serve_bench_$2.err" | tee -a "$OUT/serve_bench_$2.jsonl"
  done
}
if [ "${MODEL:-}" = random ]; then
  export HETINFER_CUDA_SERVE_ARGS="--dtype f16"
  first=1
  for shape in ${SHAPES:-qwen2.5-0.5b}; do
    Q=/tmp/$shape-shape
    [ -d $Q ] || timeout 200 python3 backends/cuda/scripts/random_checkpoint.py $shape $Q 2>&1 | tail -2
    [ "$PART" = bench ] || [ $first = 0 ] || HETINFER_CUDA_SERVE_MODEL=$Q timeout -s ABRT 200 python3 -m pytest -q -s -rfs \
      -p no:cacheprovider tests/test_cuda_serve.py 2>&1 | tee "$OUT/test_cuda_serve.log" | grep -E "chat on cuda|passed|failed|Error" | cut -c1-300
    first=0
    echo "=== serve bench, random $shape"
    bench $Q $shape
  done
  [ -f .carry/torch_anchor.py ] && timeout -s ABRT 150 python3 .carry/torch_anchor.py --models $(echo ${SHAPES:-qwen2.5-0.5b} | tr " " ",") \
    --batch 1,16,64 --prompt 128 --new 128 2>&1 | tee "$OUT/anchor.log" | grep -E "^\{|Error" | cut -c1-400
  exit 0
fi
M=/tmp/hetinfer-models
if [ ! -e "$Q" ] && [ -f $M/qwen.sha256 ]; then           # the parts stashed by earlier calls
  cat $M/qwen.part.* > "$Q"
  [ "$(sha256sum "$Q" | cut -d' ' -f1)" = "$(cat $M/qwen.sha256)" ] && echo "Qwen GGUF assembled, sha256 ok" \
    || { echo "Qwen GGUF sha256 mismatch (parts: $(ls $M | tr '\n' ' '))"; rm -f "$Q"; }
fi
[ -e "$Q" ] || { echo "no $Q"; exit 1; }
if [ "$PART" = tests ]; then
  [ "${CONF:-1}" = 1 ] && timeout -s ABRT 200 python3 -m pytest -q -rf -p no:cacheprovider --hetinfer-device=cuda --hetinfer-examples=20 \
    -k "q8_0 or q4_0 or q4_1 or q5_0 or q5_1 or q4_k or q5_k or q6_k" core/hetinfer/testing/conformance.py 2>&1 \
    | tee "$OUT/conformance_packed.log" | tail -6
  P="Write a Python function that checks whether a number is prime."
  for a in "--dtype f16 --weights packed" "--dtype bf16 --weights packed" "--dtype f16 --weights dequantize"; do
    echo "--- generate $a ---"
    timeout -s ABRT 120 python3 -m hetinfer generate --device cuda $a --model "$Q" -n 96 "$P" 2>&1 | tr '\r' '\n' \
      | grep -vE "loading|checking|^\s*$" | tail -14 | tee -a "$OUT/qwen.log"
  done
  HETINFER_QWEN_GGUF=$Q HETINFER_PACKED_DEVICE=cuda timeout -s ABRT 150 python3 -m pytest -q -s -rf -p no:cacheprovider \
    -m slow -k qwen25_q4_k_m tests/test_packed.py 2>&1 | tee "$OUT/qwen_packed_test.log" | grep -E "Qwen2.5|passed|failed|Error" | cut -c1-400
  HETINFER_CUDA_SERVE_MODEL=$Q timeout -s ABRT 240 python3 -m pytest -q -s -rfs -p no:cacheprovider tests/test_cuda_serve.py 2>&1 \
    | tee "$OUT/test_cuda_serve.log" | grep -E "chat on cuda|passed|failed|Error" | cut -c1-600
else
  bench "$Q" qwen-gguf
  [ -f .carry/torch_anchor.py ] && timeout -s ABRT 150 python3 .carry/torch_anchor.py --models qwen2.5-0.5b --batch 1,16,64 \
    --prompt 128 --new 128 2>&1 | tee "$OUT/anchor.log" | grep -E "^\{|Error" | cut -c1-400
fi
