#!/usr/bin/env bash
# Issue 13's GPU measurements in one go, phase by phase, each log under $OUT (default ./bench-out):
#   bash scripts/bench/bench_gpu.sh tests main profile attention long shapes
# Phases:
#   tests      the `gpu`-marked kernel tests (fast path against transformers + peft, forward and gradients)
#   main       8B shape, 4 x 2048, 30 steps: hf-lean, ours with every lever off, ours, ours packed, hf-lean packed,
#              liger, unsloth, ours on a GPTQ base
#   profile    8B step time in buckets: ours with the levers off, and ours
#   attention  our flash varlen call against SDPA's backends
#   long       8B at batch 1: 32k .. 256k tokens, ours; unsloth up to 128k
#   shapes     Llama-3.2-1B (8 x 2048) and Qwen2.5-7B (4 x 2048): hf-lean, liger, ours
#   small      Llama-3.2-1B bare steps at 8 x 2048 and 1 x 512 (launch-bound): hf-lean, unsloth, ours, ours packed
#   e2e        `finetune sft` itself against unsloth's trainer path, Llama-3.2-1B at 1 x 512 and 8 x 2048
#              ($E2E regimes, $E2E_STEPS steps, $E2E_ARGS more options: scripts/bench/bench_e2e.py)
#   decode     one token at a time: GPTQ / AWQ layers and the 8B model against bf16 ($DECODE_ARGS:
#              scripts/bench/bench_decode.py)
# Wheels the image lacks (bitsandbytes, liger-kernel, unsloth and what it imports) are installed from $WHEELS
# (default ../wheels, or /work/shared/gpu-wheels) into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
WHEELS=${WHEELS:-../wheels}
[ -d "$WHEELS" ] || WHEELS=/work/shared/gpu-wheels
if [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl && touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
W8=/dev/shm/bench-8b
B="python3 -m scripts.bench.bench_train"
OFF='ours[train.fused_lora=false,train.triton_kernels=false,train.fused_attention=false]'

phase() {  # phase NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log" | grep -v -E "Loading|Writing|it/s\]|^\s*$" | tail -n 60
}

for p in "$@"; do
  case $p in
    tests) phase tests 150 python3 -m pytest -q -p no:cacheprovider -x tests/test_kernels_pointwise.py \
             tests/test_kernels_lora.py tests/test_kernels_attention.py tests/test_kernels_offload.py \
             tests/test_kernels_model.py -m gpu ;;
    main) phase main "${MAIN_LIMIT:-420}" $B --workdir $W8 --steps 30 --json "$OUT/main.json" \
            --stacks "${MAIN_STACKS:-hf-lean,$OFF,ours,ours@packed,liger}" ;;
    profile) phase profile 150 $B --workdir $W8 --steps 8 --profile --stacks "$OFF,ours" ;;
    attention) phase attention 60 python3 -m scripts.bench.bench_attention ;;
    long) phase long "${LONG_LIMIT:-500}" $B --workdir $W8 --long "${LONG:-32768,65536,131072,262144}" \
            --long-steps 2 --json "$OUT/long.json" --stacks "${LONG_STACKS:-ours}" ;;
    shapes) phase shapes 400 bash -c "$B --shape llama-3.2-1b --batch 8 --workdir /dev/shm/bench-1b --steps 30 \
              --stacks hf-lean,liger,ours && $B --shape qwen2.5-7b --batch 4 --workdir /dev/shm/bench-7b --steps 30 \
              --stacks hf-lean,liger,ours" ;;
    small) phase small 300 bash -c "$B --shape llama-3.2-1b --batch 8 --workdir /dev/shm/bench-1b --steps 30 \
              --stacks hf-lean,unsloth,ours,ours@packed && $B --shape llama-3.2-1b --batch 1 --seq 512 \
              --workdir /dev/shm/bench-1b --steps 30 --stacks hf-lean,unsloth,ours,ours@packed" ;;
    e2e) phase e2e "${E2E_LIMIT:-420}" $B --e2e "${E2E:-1x512,8x2048}" --shape llama-3.2-1b \
           --workdir /dev/shm/bench-1b --steps "${E2E_STEPS:-30}" --json "$OUT/e2e.json" ${E2E_ARGS:-} ;;
    decode) phase decode "${DECODE_LIMIT:-300}" python3 -m scripts.bench.bench_decode ${DECODE_ARGS:-} ;;
    *) echo "unknown phase $p"; exit 2 ;;
  esac
done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
