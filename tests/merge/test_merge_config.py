"""The typed merge config (one line naming the flag for every bad value, before any work) and the base record an
adapter carries: base.json from `finetune sft`, and the positional base_model.txt of older adapters."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from finetune.cli import main
from finetune.merge import MergeConfig
from finetune.merge.adapter import read_adapter
from quant.errors import UserError
from quant.formats.base import BaseSpec
from support import quiet_merge


@pytest.mark.parametrize("fields,message", [
    ({"format": "onnx"}, "--format must be one of bf16, fp16, nf4, fp4, int8, gptq, awq, gguf (got 'onnx')"),
    ({"merge_into": "both"}, "--merge-into must be one of auto, dequantized, original (got 'both')"),
    ({"dtype": "float64", "format": "nf4"}, "--dtype must be one of bfloat16, float16, float32 (got 'float64')"),
    ({"dtype": "float16"}, "--dtype applies to quantized formats; --format bf16 already fixes the dtype"),
    ({"calib_samples": 0}, "--calib-samples must be an integer >= 1 (got 0)"),
    ({"calib_seqlen": 1}, "--calib-seqlen must be an integer >= 2 (got 1)"),
    ({"eval_max_batches": 0}, "--eval-max-batches must be an integer >= 1 (got 0)"),
    ({"device": "abacus"}, "--device must be cpu, cuda or cuda:N (got 'abacus')"),
    ({"calib": ["x.txt"]}, "--calib applies to --format gptq, awq, gguf only"),
    ({"options": {"bits": 4}}, "--bits applies to --format gptq, awq only"),
    ({"options": {"bits": 4, "desc_act": True}, "format": "nf4"}, "--bits/--desc-act apply to --format gptq, awq only"),
    ({"options": {"colour": 1}}, "options: unknown ['colour']; format options are bits, desc_act, gguf_type, group_size, method"),
    ({"format": "gptq", "options": {"bits": 5, "method": "rtn"}}, "--bits must be one of 2, 3, 4, 8 (got 5)"),
    ({"format": "gptq", "options": {"group_size": "64", "method": "rtn"}},
     "--group-size = '64' is not valid (expected int)"),
    ({"format": "gptq", "options": {"method": "awq"}}, "--method must be one of gptq, rtn (got 'awq')"),
    ({"format": "gptq"}, "--format gptq needs calibration data: pass --calib DATA (text/jsonl/parquet file, "
                         "directory or pkg:...), e.g. the training data, or use --method rtn"),
    ({"format": "awq", "options": {"method": "gptq"}}, "--method must be one of awq, rtn (got 'gptq')"),
    ({"format": "awq"}, "--format awq needs calibration data: pass --calib DATA (text/jsonl/parquet file, "
                        "directory or pkg:...), e.g. the training data, or use --method rtn"),
])
def test_every_bad_value_is_one_line_naming_its_flag(fields, message):
    cfg = MergeConfig(**{"adapter": "run", "out": "out", "format": "bf16", **fields})
    with pytest.raises(UserError) as e:
        cfg.validate()
    assert str(e.value) == message


def test_a_valid_config_is_normalised():
    cfg = MergeConfig(adapter="run", out="out", format="gptq", calib="data.txt",
                      options={"method": "gptq", "group_size": 64, "bits": None}).validate()
    assert cfg.calib == ["data.txt"] and cfg.out_dtype == torch.float16
    assert (cfg.options.method, cfg.options.group_size, cfg.options.bits) == ("gptq", 64, None)
    assert MergeConfig(adapter="run", out="out", format="nf4", dtype="float32").validate().out_dtype == torch.float32


@pytest.mark.parametrize("fmt,options", [("gguf", {"gguf_type": "Q8_0"}), ("gguf", {"gguf_type": "bf16"}),
                                         ("gptq", {"method": "rtn"}), ("awq", {"method": "rtn"})])
def test_calibration_data_a_format_would_not_use_is_dropped_with_a_warning(fmt, options, caplog):
    cfg = MergeConfig(adapter="run", out="out", format=fmt, calib="data.txt", options=options)
    with caplog.at_level("WARNING", logger="finetune.merge"):
        assert cfg.validate().calib is None
    assert [r.getMessage() for r in caplog.records] == [
        f"--calib has no effect on --format {fmt} with these settings (nothing is searched); ignoring it"]


def test_cli_builds_the_config_and_prints_one_line(nf4_run, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["merge", str(nf4_run), "--out", str(out), "--format", "int8", "--group-size", "64", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --group-size applies to --format gptq, awq only"
    assert main(["merge", str(nf4_run), "--out", str(out), "--format", "gptq", "--method", "rtn", "--bits", "3",
                 "--group-size", "32", "--no-desc-act", "--no-report", "-q"]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert (report["gptq"]["method"], report["gptq"]["bits"], report["gptq"]["group_size"]) == ("rtn", 3, 32)
    assert report["gptq"]["desc_act"] is False and report["base_settings"]["double_quant"] is True


def _tensors(out):
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def test_the_adapter_carries_its_base_record_and_old_adapters_still_merge(nf4_run, tmp_path):
    """`finetune sft` writes adapter/base.json; an adapter written before it (base_model.txt: spec, trained
    directory, quantization; the rest from the run's recipe.yaml) resolves to the same record and merge."""
    spec = BaseSpec.read(nf4_run / "adapter")
    assert (spec.format, spec.compute_dtype, spec.settings) == ("nf4", "float32",
                                                                {"double_quant": True, "quant_storage": "uint8"})
    assert read_adapter(nf4_run).base == spec

    old = tmp_path / "old-run"
    shutil.copytree(nf4_run, old)
    (old / "adapter" / "base.json").unlink()
    (old / "adapter" / "base_model.txt").write_text(f"{spec.model}\n{spec.model_dir}\nnf4\n")
    legacy = read_adapter(old).base
    assert (legacy.format, legacy.model_dir, legacy.compute_dtype, legacy.settings) == \
        (spec.format, spec.model_dir, spec.compute_dtype, spec.settings)
    new_out = quiet_merge(nf4_run, tmp_path / "new", "bf16", report=False).out_dir
    old_out = quiet_merge(old, tmp_path / "old", "bf16", report=False).out_dir
    new, legacy_tensors = _tensors(new_out), _tensors(old_out)
    assert new.keys() == legacy_tensors.keys()
    assert all(torch.equal(new[k], legacy_tensors[k]) for k in new)


def test_a_record_naming_an_unknown_format_is_refused(nf4_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(nf4_run, run)
    record = run / "adapter" / "base.json"
    record.write_text(record.read_text().replace('"format": "nf4"', '"format": "nf5"'))
    with pytest.raises(UserError, match=r"base\.json: format must be one of nf4, fp4, int8, gptq, awq, none \(got 'nf5'\)"):
        read_adapter(run)
