"""Weight formats as plug-ins, one module each (`float`, `bnb`: NF4/FP4/int8, `gptq`, `awq`, `gguf`), listed once in
`registry`. This layer sits above the method packages (quant.gptq, quant.awq, quant.ggml), which never import it.

`base` holds the interface every format implements and the typed records it is asked with (BaseSpec,
ShardingSetup, EncodeRequest); `layerwise` the streaming encoder the GPTQ and AWQ merge outputs share.
"""
