"""`finetune merge`: merge a LoRA adapter into its (quantized) base and write a deployable model, with the
fidelity the merge keeps measured.

    from finetune.merge import MergeConfig, merge
    result = merge(MergeConfig(adapter="runs/quickstart", out="out/quickstart-nf4", format="nf4"))
    result.fidelity["retention"]

Modules, one job each: `config` (the typed merge config and its validation), `adapter` (read the adapter and
the base record it was trained on), `source` (the base checkpoint's skeleton and per-layer units), `stream` (the
layer-by-layer walk, adapter/base checks, peak memory), `writers` (config.json, tokenizer), `calibration`
(calibration windows through the training data pipeline), `report` (losses, KL, retention), `pipeline` (the
`merge` function). Rebuilding the base as trained and encoding the output belong to the formats
(quant.formats.registry).
"""

from finetune.merge.config import MergeConfig
from finetune.merge.pipeline import MergeResult, merge

__all__ = ["MergeConfig", "MergeResult", "merge"]
