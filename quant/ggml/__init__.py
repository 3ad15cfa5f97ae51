"""GGUF export: ggml's block quantization written by us, llama.cpp's per-tensor mixes, and the file writer.

- `search`   the scale searches of ggml's reference quantizers, vectorised over blocks (torch)
- `legacy`   Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32)
- `kquants`  Q4_K, Q5_K, Q6_K (super-blocks of 256)
- `types`    one table of the tensor types: block geometry, quantizer, decoder; F32/F16/BF16 passthrough
- `mix`      file types (bf16, q8_0, q4_k_m, ...): which type each tensor gets, as llama.cpp's quantizer decides
- `arch`     a config -> llama.cpp's architecture metadata and needed tensors, per family (quant.arch); refusals
- `tensors`  HF tensors -> GGUF tensors: names, expert splits, Q/K row permutation, Gemma's norm offset
- `vocab`    tokenizer -> GGUF tokenizer metadata
- `imatrix`  per-column activation energy from calibration data (the importance the K-quant search weights by)
- `writer`   `write_gguf`: a stream of (HF name, float tensor) -> one .gguf file, written atomically

The `quant gguf` driver, which reads any source through the format registry, is `quant.export`.
"""
