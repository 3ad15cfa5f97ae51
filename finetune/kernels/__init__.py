"""Fused kernels for QLoRA training: the fast path `finetune sft` installs into the model after LoRA is attached.

    lora.py        LoRA + frozen (NF4/GPTQ/dense) linear for a group of projections sharing one input
    mlp.py         the SwiGLU MLP with all three LoRA paths in one autograd function, optionally in token tiles
    pointwise.py   RMSNorm, rotary embedding, SwiGLU: Triton forward/backward (triton_kernels.py), torch twins
    attention.py   flash attention with packed rows as variable-length sequences
    offload.py     checkpointed layer inputs in pinned host memory (long context)
    install.py     which modules of a Llama-family model take which of these

`install_fast_path(model, train_cfg, ...)` is the one entry point; every piece has a recipe switch (train.*).
"""

from __future__ import annotations

from finetune.kernels.install import InstallReport, KernelOptions, install


def install_fast_path(model, train_cfg, distributed: bool = False, sharded: bool = False) -> InstallReport:
    """Install the fast path for a TrainConfig; nothing when parameters are sharded (ZeRO-3/FSDP gather them
    in module hooks that the fused functions would bypass)."""
    if sharded:
        report = InstallReport()
        report.skipped.append(("model", "parameters are sharded across processes"))
        return report
    return install(model, KernelOptions.from_train(train_cfg, distributed))


__all__ = ["InstallReport", "KernelOptions", "install", "install_fast_path"]
