"""The architecture matrix (issue #24): a tiny random model of every dense family through every command, as a user
would run them, on CPU:

    finetune sft on NF4 and on a GPTQ base (the loss falls), quant gptq, quant awq (every projection of the
    4-bit output stored 4-bit: read from the files), finetune merge of the NF4 adapter to bf16, GPTQ and GGUF
    (the merged model's logits match the adapter model's within the format's tolerance; llama.cpp runs the GGUF).

For the mixture-of-experts families, the GGUF column: an attention adapter merged into a .gguf that llama.cpp runs
(their experts' own rows are the MoE work's). Each family's run takes a few seconds; the file's time is in
docs/architectures.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from arch_models import DENSE, MOE, save_multimodal, save_tiny
from safetensors import safe_open

from finetune.model import load_adapter, load_base
from finetune.recipe import recipe_from_dict
from finetune.train.loop import train
from quant.arch import describe
from quant.cli import main as quant_cli
from quant.formats import registry as formats
from quant.formats.base import BaseSpec
from support import chat_rows, llama_cpp_logits, quiet_merge, single_thread, tiny_recipe, write_jsonl

llama_cpp = pytest.importorskip("llama_cpp")
CPU = torch.device("cpu")
IDS = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(0))
# |merged logits - adapter model's| / max |adapter model logit|, and as a fraction of what the adapter changes
# (so that a merge that lost the delta fails too). bf16: the weights' rounding (measured <= 0.005); GPTQ 4-bit g32
# on top of the NF4 base the adapter was trained on (RTN measured <= 0.17, <= 0.3 of the effect); GGUF Q8_0 through
# llama.cpp, which also quantizes activations to 8 bits and keeps its KV cache in f16 (<= 0.022).
TOLERANCE = {"bf16": 0.02, "gptq": 0.3, "gguf": 0.06}
OF_EFFECT = {"bf16": 1 / 20, "gptq": 1 / 2, "gguf": 1 / 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("arch-data")
    prose = d / "prose.txt"
    prose.write_text(" ".join(" ".join(r["messages"][1]["content"] for _ in range(3)) for r in chat_rows(200)))
    return write_jsonl(d / "train.jsonl", chat_rows(64, seed=1)), prose


def sft(base: Path, quantization: str, out: Path, train_file: Path) -> list[float]:
    recipe = tiny_recipe(base, train_file, None, out, base={"quantization": quantization},
                         train={"max_steps": 3, "log_every": 1})
    train(recipe_from_dict(recipe), echo=lambda *a: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def quant(method: str, src: Path, out: Path, prose: Path) -> Path:
    args = [method, str(src), "--out", str(out), "--no-progress"]
    if method in ("gptq", "awq"):
        args += ["--group-size", "32", "--calib", str(prose), "--calib-samples", "4", "--calib-seqlen", "64"]
    assert quant_cli(["--log-level", "WARNING", *args]) == 0
    return out


def stored_4bit(out: Path, family_config: dict) -> None:
    """Every projection of every decoder block is packed 4-bit in the written files, none left in 16 bits."""
    arch = describe(family_config)
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            tensors.update({k: h.get_slice(k).get_dtype() for k in h.keys()})
    for i in range(arch.n_layer):
        att, mlp = arch.family.attention, arch.family.mlp
        paths = [f"{att.path}.{n}" for n in att.projections] + [f"{mlp.path}.{n}" for n in mlp.projections]
        for p in paths:
            key = arch.to_disk(f"{arch.block(i)}.{p}")
            assert tensors.get(f"{key}.qweight") == "I32", f"{key} is not stored packed 4-bit"
            assert f"{key}.weight" not in tensors, f"{key} also stored in 16 bits"


def adapter_model(run: Path):
    spec = BaseSpec.read(run / "adapter")
    return load_adapter(load_base(spec, CPU).model, run / "adapter").eval()


def relative(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


def check_merges(run: Path, out: Path, calib: Path, formats_to_check=("bf16", "gptq", "gguf")) -> dict[str, float]:
    """Each format's merge of the run's adapter: its logits' error against the adapter model, checked."""
    model = adapter_model(run)
    with torch.no_grad():
        ref = model(IDS).logits[0]
        with model.disable_adapter():
            effect = relative(model(IDS).logits[0], ref)
    assert effect > 0.1, "the adapter hardly changes the model: the merges would prove nothing"
    errors = {}
    for fmt in formats_to_check:
        # GPTQ calibrated: each merged layer quantized on its own inputs (sliding and full layers' own arguments)
        extra = dict(options={"group_size": 32}, calib=str(calib), calib_samples=4, calib_seqlen=64) \
            if fmt == "gptq" else dict(options={"gguf_type": "q8_0"}) if fmt == "gguf" else {}
        result = quiet_merge(run, out / fmt, fmt, report=False, **extra)
        if fmt == "gguf":
            got = llama_cpp_logits(result.out_dir / "model.gguf", IDS[0].tolist())
        else:
            merged = formats.output_format(fmt).load_merged(result.out_dir, CPU, torch.float32)
            with torch.no_grad():
                got = merged(IDS).logits[0].float()
        errors[fmt] = relative(got, ref)
    for fmt, err in errors.items():
        assert err <= TOLERANCE[fmt] and err <= OF_EFFECT[fmt] * effect, (fmt, err, effect)
    return errors


@pytest.mark.parametrize("family", DENSE)
def test_dense_family_through_every_command(family, data, tmp_path):
    train_file, prose = data
    with single_thread():
        src = save_tiny(family, tmp_path / "src")
        config = json.loads((src / "config.json").read_text())
        nf4 = sft(src, "nf4", tmp_path / "nf4-run", train_file)
        assert len(nf4) == 3 and nf4[-1] < nf4[0], nf4
        gptq = quant("gptq", src, tmp_path / "gptq", prose)
        stored_4bit(gptq, config)
        on_gptq = sft(gptq, "gptq", tmp_path / "gptq-run", train_file)
        assert on_gptq[-1] < on_gptq[0], on_gptq
        stored_4bit(quant("awq", src, tmp_path / "awq", prose), config)
        check_merges(tmp_path / "nf4-run", tmp_path / "merged", prose)
        stored_4bit(tmp_path / "merged" / "gptq", config)


@pytest.mark.parametrize("family", MOE)
def test_moe_family_attention_adapter_merges_to_gguf_that_llama_cpp_runs(family, data, tmp_path):
    train_file, prose = data
    with single_thread():
        src = save_tiny(family, tmp_path / "src")
        losses = sft(src, "nf4", tmp_path / "run", train_file)
        assert losses[-1] < losses[0], losses
        check_merges(tmp_path / "run", tmp_path / "merged", prose, ("gguf",))


def test_multimodal_gemma3_trains_and_merges_its_text_part(data, tmp_path):
    """Gemma3ForConditionalGeneration (Gemma 3 4B/12B/27B's class): LoRA on the language model's blocks only (its
    vision tower has projections of the same names), merged under transformers' own checkpoint names."""
    train_file, prose = data
    save_multimodal("gemma3", tmp_path / "src")
    with single_thread():
        losses = sft(tmp_path / "src", "nf4", tmp_path / "run", train_file)
        assert losses[-1] < losses[0], losses
        adapted = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["target_modules"]
        assert "language_model" in adapted
        check_merges(tmp_path / "run", tmp_path / "merged", prose)
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    stored_4bit(tmp_path / "merged" / "gptq", config)
