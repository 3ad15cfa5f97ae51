"""Adapters trained for the quantized format they will be merged into, so that the merge is exact (issue #28).

`lora.merge_target: gptq | awq` on a GPTQ base with an asymmetric grid (sym: false) or an AWQ base trains a
QA-LoRA-style adapter whose update is constant within each quantization group and moves the group's integer zero
point by whole grid steps. The merge then writes the base's qweight and scales byte for byte with new zero points
(docs/exact-merge.md), and the merged model computes what the adapter model computed, up to float rounding order.

Modules, one job each: `grid` (a packed layer's zero-point grid, the whole-step zero shift with its
straight-through gradient, group sums of the input), `lora` (the peft LoRA layer that trains it), `target` (the
recipe option: which base/target pairs are exact, refused in one line otherwise; reading it back from a run),
`factors` (a saved adapter as the dense delta and the new zero points the merge writes).
"""
