"""Mixture-of-experts blocks held one matrix per expert and projection, whatever stores the weights.

transformers 5 keeps a layer's experts as fused 3-D parameters (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I];
gpt-oss transposed, interleaved and biased), which neither bitsandbytes, our GPTQ/AWQ nor peft's Linear LoRA can
hold. Every model we build for training, quantization or serving replaces the family's experts module by
`MoEExperts` (`experts`): the same routing arguments in, the same math out, each expert's gate, up and down
projection a frozen layer of the base's format (nn.Linear, a packed GPTQ/AWQ layer) or one row of a stacked
storage (NF4, quant.formats.bnb_experts). The router stays the family's own module, in full precision.

- `experts`  MoEExperts, ExpertSpec (what the math needs from the description), the per-expert torch path
- `layout`   fused 3-D tensors <-> one [out, in] matrix per expert and projection, and the defused names
- `convert`  replacing a model's experts modules (`defuse`), and the refusal of what a 4-bit output cannot hold
"""
