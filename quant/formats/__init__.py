"""Weight formats, one module each (`float`, `bnb`: NF4/FP4/int8, `gptq`), listed once in `registry`.

`base` holds the interface every format implements and the typed records it is asked with (BaseSpec,
ShardingSetup, EncodeRequest). Importing this package imports no format module: `quant.nn` and the kernels use
`gptq_pack` without pulling in the registry.
"""
