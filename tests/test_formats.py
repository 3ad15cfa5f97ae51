"""The format registry: every output format round-trips through the merge and its own loader, each format's
sharding answers are the README's table, and the base record (adapter/base.json) reads back as written."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from finetune.merge.source import skeleton
from quant.errors import UserError
from quant.tensorfiles import Checkpoint
from quant.formats.base import REQUIRED, BaseSpec, ShardingSetup
from quant.formats.registry import (FORMATS, base_format, base_names, output_format, output_names, resolve_base,
                                    sharding_problem)
from quant.blocks import find_blocks
from support import make_tiny_model, quiet_merge

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# How far each output's weights may be from the float weights it encodes (relative Frobenius error, random
# weights of the tiny model; for a format that folds scales, of its logits). A new output format needs its line here.
TOLERANCE = {"bf16": 1e-2, "fp16": 2e-3, "nf4": 0.15, "fp4": 0.2, "int8": 0.02, "gptq": 0.3, "awq": 0.15,
             "gguf": 0.06}  # Q4_K_M, whose K-quants fall back to Q5_0/Q8_0 on the tiny model's 64-wide rows
# Output-only formats that quantize every matrix, embeddings and head included (no training base to rebuild them
# exactly): held to their tolerance here, and bit-exactly to their file's own reader in their own tests.
APPROXIMATE = {"gguf": "tests/quant/test_gguf_merge.py"}


@pytest.fixture(scope="module")
def bf16_exact_base(tmp_path_factory, tokenizer) -> Path:
    """A tiny float base whose weights are bf16 values (stored in fp32), so that every quantizer sees the same
    numbers whichever float dtype it casts through first."""
    path = tmp_path_factory.mktemp("bf16-exact")
    model = make_tiny_model(len(tokenizer), seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def zero_adapter(bf16_exact_base, tmp_path_factory) -> Path:
    """A LoRA adapter on every Linear whose delta is zero, trained-on an unquantized base: its merge is the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(bf16_exact_base), dtype=torch.float32)
    adapter = tmp_path_factory.mktemp("zero-adapter") / "adapter"
    get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(adapter)  # B = 0
    resolve_base(str(bf16_exact_base), str(bf16_exact_base), "none").save(adapter)
    return adapter


def _weight(module: nn.Module) -> torch.Tensor:
    """The float weight a loaded Linear-like layer computes with (bitsandbytes, our GPTQ layer, nn.Linear)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from quant.awq.nn import AWQLinear
    from quant.gptq.nn import QuantLinear

    if isinstance(module, bnb.nn.Linear4bit):
        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        return bnbf.int8_vectorwise_dequant(module.weight.data, module.weight.SCB).float()
    if isinstance(module, (QuantLinear, AWQLinear)):
        return module.dequantize(torch.float32)
    return module.weight.detach().float()


@pytest.mark.parametrize("name", output_names())
def test_every_output_format_round_trips(name, bf16_exact_base, zero_adapter, tmp_path):
    """encode -> write -> the format's own loader: the weights it loads are the float weights (within the format's
    precision), exactly what a base of that format trains on for them, and every other tensor unchanged. A format
    that folds per-channel scales between a decoder layer's tensors (AWQ) keeps the layer's function instead of
    each tensor: its logits are held to the tolerance, and only the tensors outside the layers to equality."""
    fmt = output_format(name)
    options = {f.name: 32 for f in dataclasses.fields(fmt.options) if f.name == "group_size"} if fmt.options else {}
    calib = [torch.randint(0, 250, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)] \
        if fmt.calibration(fmt.options(**options) if fmt.options else None) == REQUIRED else None
    result = quiet_merge(zero_adapter, tmp_path / name, name, report=False, options=options, calib=calib)
    out = result.out_dir
    loaded = fmt.load_merged(out, CPU, torch.float32)
    source = Checkpoint(bf16_exact_base)
    out_dtype = getattr(torch, result.report["dtype"])

    rebuilt = {}
    if fmt.base:  # the same object is a training base: what training would see for these weights
        spec_dir = out if fmt.stored_quantized else bf16_exact_base
        spec = resolve_base(str(spec_dir), str(spec_dir), name, double_quant=True, compute_dtype=out_dtype)
        ckpt = Checkpoint(spec_dir)
        rebuilt = fmt.rebuilder(spec, ckpt, skeleton(ckpt.config), CPU).load(ckpt.keys())
    linears = [n for n, m in skeleton(source.config).named_modules() if type(m) is nn.Linear and n != "lm_head"]
    assert len(linears) == 14
    exact = name not in APPROXIMATE  # a training format loads what training sees, a float format the cast weights
    for module in linears:
        W, got = source.get(f"{module}.weight"), _weight(loaded.get_submodule(module))
        assert fmt.folds_scales or ((got - W).norm() / W.norm()).item() < TOLERANCE[name], module
        expected = rebuilt[f"{module}.weight"] if fmt.base else W.to(out_dtype)
        assert torch.equal(got, expected.float()) or not exact, module
    layers = find_blocks(loaded)[0] + "."
    for key, t in loaded.state_dict().items():
        folded = fmt.folds_scales and key.startswith(layers)
        if key.rpartition(".")[0] not in linears and key in source.file_of and t.is_floating_point() and not folded:
            W = source.get(key).to(out_dtype).float()
            assert torch.equal(t, W) if exact else ((t - W).norm() / W.norm()).item() < TOLERANCE[name], key
    if fmt.folds_scales:
        from transformers import AutoModelForCausalLM

        ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(9))
        want = AutoModelForCausalLM.from_pretrained(str(bf16_exact_base), dtype=torch.float32)(ids).logits
        with torch.no_grad():
            got = loaded(ids).logits.float()
        assert ((got - want).norm() / want.norm()).item() < TOLERANCE[name]


def _readme_table() -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(accelerate config files, [(base cell, answers)]) of the README's Multi-GPU support table."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Multi-GPU"):]
    section = section[:section.index("\n## ", 1)]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ")]
    header, body = rows[0], [r for r in rows[1:] if not set(r[0]) <= {"-"}]
    configs = [re.search(r"`(\w+\.yaml)`", cell).group(1) for cell in header[1:]]
    return configs, [(r[0], r[1:]) for r in body]


def _setup(config_file: str) -> ShardingSetup:
    cfg = yaml.safe_load((REPO / "recipes" / "accelerate" / config_file).read_text())
    return ShardingSetup(cfg["distributed_type"], int((cfg.get("deepspeed_config") or {}).get("zero_stage", 0)),
                         int((cfg.get("fsdp_config") or {}).get("fsdp_version", 0)), cfg.get("mixed_precision", "no"))


def test_sharding_answers_are_the_readme_table():
    configs, rows = _readme_table()
    assert configs == ["ddp.yaml", "zero2.yaml", "zero3.yaml", "fsdp.yaml"]
    covered = set()
    for cell, answers in rows:
        names = [n for n in re.findall(r"`([^`]+)`", cell) if n in base_names()]
        storage = re.search(r"quant_storage: (\w+)", cell)
        assert names, cell
        for name in names:
            fmt = base_format(name)
            covered.add(name)
            settings = {} if fmt.stored_quantized else \
                fmt.settings("", True, storage.group(1) if storage else "uint8", torch.bfloat16)
            spec = BaseSpec(model="m", model_dir="m", format=name, compute_dtype="bfloat16", settings=settings)
            for config, answer in zip(configs, answers):
                problem = sharding_problem(spec, _setup(config))
                assert answer.startswith(("yes", "refused")), answer
                assert (problem is None) == answer.startswith("yes"), (cell, config, problem)
                if problem:
                    assert problem.startswith(f"accelerate distributed_type {_setup(config).distributed_type}")
    assert covered == set(base_names()), "every training format has a row in the README's Multi-GPU table"


def test_registry_names_are_unique_and_every_role_is_served():
    names = [f.name for f in FORMATS]
    assert len(names) == len(set(names))
    assert set(base_names()) | set(output_names()) == set(names)
    listed = "bf16, fp16, nf4, fp4, int8, gptq, awq, gguf"
    with pytest.raises(UserError, match=rf"^--format must be one of {listed} \(got 'x'\)$"):
        output_format("x")


def test_base_record_is_written_and_read_back(tiny_model_dir, tmp_path):
    spec = resolve_base("pkg:somewhere/model", str(tiny_model_dir), "auto", double_quant=False,
                        quant_storage="auto", compute_dtype=torch.bfloat16)
    assert (spec.format, spec.asked_format, spec.compute_dtype) == ("nf4", "auto", "bfloat16")
    assert spec.settings == {"double_quant": False, "quant_storage": "bfloat16"}  # 'auto' storage = compute dtype
    path = spec.save(tmp_path)
    assert path.name == "base.json" and json.loads(path.read_text())["version"] == 1
    assert BaseSpec.read(tmp_path) == spec
    assert BaseSpec.read(tmp_path / "nowhere") is None


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(version=7), "version 7; this finetune reads version 1"),
    (lambda d: d.update(colour="red"), "unknown keys ['colour']"),
    (lambda d: d.pop("model_dir"), "missing keys ['model_dir']"),
    (lambda d: d.update(compute_dtype="float8"), "compute_dtype 'float8' is not one of bfloat16, float16, float32"),
])
def test_a_bad_base_record_is_one_line_naming_the_file(tiny_model_dir, tmp_path, edit, message):
    data = resolve_base(str(tiny_model_dir), str(tiny_model_dir)).to_dict()
    edit(data)
    (tmp_path / "base.json").write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        BaseSpec.read(tmp_path)
    assert str(e.value) == f"{tmp_path / 'base.json'}: {message}"
    (tmp_path / "base.json").write_text("{not json")
    with pytest.raises(UserError, match=r"base\.json: not valid JSON"):
        BaseSpec.read(tmp_path)


def test_resolution_refuses_a_format_the_checkpoint_is_not(tiny_model_dir, tmp_path):
    gptq_dir = tmp_path / "gptq"
    gptq_dir.mkdir()
    (gptq_dir / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    assert resolve_base(str(gptq_dir), str(gptq_dir)).format == "gptq"  # auto: as stored
    assert resolve_base(str(tiny_model_dir), str(tiny_model_dir), "auto").format == "nf4"  # else the QLoRA default
    with pytest.raises(UserError, match=r"^base\.quantization = 'int8' but .* is a GPTQ checkpoint; use 'gptq' or "):
        resolve_base(str(gptq_dir), str(gptq_dir), "int8")
    with pytest.raises(UserError, match=r"^--quantization must be one of auto, nf4, fp4, int8, gptq, awq, none"):
        resolve_base(str(tiny_model_dir), str(tiny_model_dir), "nf5", what="--quantization")
