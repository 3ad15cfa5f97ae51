"""`finetune merge`: merge a LoRA adapter into its (quantized) base and write a deployable model, with the
fidelity the merge keeps measured.

    from finetune.merge import merge
    result = merge("runs/quickstart", "out/quickstart-nf4", "nf4")
    result.fidelity["retention"]

Modules, one job each: `adapter` (read the adapter and which base it was trained on), `source` (base weights
per layer, rebuilt exactly as trained), `stream` (the layer-by-layer walk, adapter/base checks, peak memory),
`writers` (safetensors shards and the bf16/fp16/NF4/FP4/int8 encodings), `requant` (GPTQ/RTN requantization
on the merged model's own activations), `report` (losses, KL, retention), `pipeline` (the `merge` function).
"""

from finetune.merge.pipeline import FORMATS, MergeResult, merge

__all__ = ["FORMATS", "MergeResult", "merge"]
