"""Adapters and their records are data: finite factors, a valid adapter_config.json and base.json, every module in
the base with its shape; and merged weights are finite before they are written. At the branch point a NaN
adapter merged into a NaN model with exit 0, `generate` ran on it, and a damaged adapter_config.json, a
truncated or partial adapter were tracebacks or silent partial loads."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import error_line

from finetune.cli import main

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def run(nf4_run, tmp_path):
    """A copy of a trained run to damage."""
    return shutil.copytree(nf4_run, tmp_path / "run", ignore=shutil.ignore_patterns("merges", "report"))


def _edit_factors(run, edit) -> None:
    path = run / "adapter" / WEIGHTS
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _edit_json(run, name, edit) -> None:
    path = run / "adapter" / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _refused(argv, capsys, out=None) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    if out is not None:
        assert not out.exists(), "nothing is written"
    return error_line(err)


def _merge(run, out, *flags):
    return ["merge", str(run), "--out", str(out), "--format", "bf16", "--no-report", "-q", *flags]


def _generate(run):
    return ["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2", "-q"]


A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_adapter_is_refused_by_merge_and_generate(run, tmp_path, capsys, value):
    _edit_factors(run, lambda t: t[B_KEY].view(-1).__setitem__(3, value))
    expected = (f"error: {run / 'adapter' / WEIGHTS}: model.layers.1.mlp.down_proj.lora_B holds 1 NaN or infinite "
                f"values of {load_file(str(run / 'adapter' / WEIGHTS))[B_KEY].numel()}; a diverged or damaged "
                "adapter cannot be merged or run")
    assert _refused(_merge(run, tmp_path / "out"), capsys, tmp_path / "out") == expected
    assert _refused(_generate(run), capsys) == expected


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c.update(r=0), "r = 0 is not valid (expected an integer 1..16384)"),
    (lambda c: c.update(r="8"), "r = '8' is not valid (expected an integer 1..16384)"),
    (lambda c: c.pop("r"), "r = missing is not valid"),
    (lambda c: c.update(lora_alpha=float("nan")), "lora_alpha = nan is not valid (expected a finite number"),
    (lambda c: c.update(target_modules=5), "target_modules = 5 is not valid"),
    (lambda c: c.update(rank_pattern={"q_proj": -1}), "rank_pattern: q_proj = -1 is not valid"),
    (lambda c: c.update(use_rslora="yes"), "use_rslora = 'yes' is not valid"),
])
def test_adapter_config_values_are_checked(run, tmp_path, capsys, edit, expected):
    _edit_json(run, "adapter_config.json", edit)
    for argv in (_merge(run, tmp_path / "out"), _generate(run)):
        line = _refused(argv, capsys)
        assert line.startswith(f"error: {run / 'adapter' / 'adapter_config.json'}: ") and expected in line, line


@pytest.mark.parametrize("content, expected", [
    (b"{not json", "not valid JSON"), (b"\xff\xfe{}", "not valid JSON"), (b"[1, 2]", "expected a JSON object"),
])
def test_adapter_config_that_is_not_a_json_object_is_one_line(run, tmp_path, capsys, content, expected):
    (run / "adapter" / "adapter_config.json").write_bytes(content)
    assert expected in _refused(_merge(run, tmp_path / "out"), capsys)
    assert expected in _refused(_generate(run), capsys)


def test_a_truncated_adapter_file_is_one_line(run, tmp_path, capsys):
    path = run / "adapter" / WEIGHTS
    path.write_bytes(path.read_bytes()[:200])
    line = _refused(_merge(run, tmp_path / "out"), capsys)
    assert line.startswith(f"error: {path}: not a readable safetensors file"), line


def test_factors_of_the_wrong_shape_and_modules_the_base_lacks_are_refused_naming_them(run, tmp_path, capsys):
    _edit_factors(run, lambda t: t.__setitem__(A_KEY, torch.zeros(t[A_KEY].shape[0], 7)))
    for argv in (_merge(run, tmp_path / "out"), _generate(run)):
        assert "adapter/base mismatch: weight shapes (out x in) differ for 1 modules, e.g. " \
               "model.layers.0.self_attn.q_proj (adapter 64x7, base 64x64)" in _refused(argv, capsys)

    def rename(t):  # a partial adapter: its layer-1 modules named as a layer 9 the 2-layer base does not have
        for key in [k for k in t if ".layers.1." in k]:
            t[key.replace(".layers.1.", ".layers.9.")] = t.pop(key)

    _edit_factors(run, lambda t: t.__setitem__(A_KEY, torch.zeros(t[A_KEY].shape[0], 64)))
    _edit_factors(run, rename)
    line = _refused(_generate(run), capsys)  # peft loaded such an adapter partially, with a warning, exit 0
    assert "has no Linear weight for 7 adapted modules, e.g. ['model.layers.9.mlp.down_proj', " \
           "'model.layers.9.mlp.gate_proj']" in line, line
    assert "has no Linear weight for 7 adapted modules" in _refused(_merge(run, tmp_path / "out"), capsys)


@pytest.mark.parametrize("edit, expected", [
    (lambda b: b.update(model_dir=5), "model_dir = 5 is not valid (expected a non-empty string)"),
    (lambda b: b.update(format=["nf4"]), "format = ['nf4'] is not valid"),
    (lambda b: b.update(settings={"double_quant": float("nan")}), "settings.double_quant = nan is not valid"),
])
def test_a_damaged_base_record_is_one_line(run, tmp_path, capsys, edit, expected):
    _edit_json(run, "base.json", edit)
    for argv in (_merge(run, tmp_path / "out"), _generate(run)):
        line = _refused(argv, capsys)
        assert line.startswith(f"error: {run / 'adapter' / 'base.json'}: ") and expected in line, line


def _base_with(tiny_model_dir, tmp_path, key: str, value: float):
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    tensors = load_file(str(base / "model.safetensors"))
    tensors[key].view(-1)[5] = value
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    return base


def test_merged_weights_that_are_not_finite_are_never_written(nf4_run, tiny_model_dir, tmp_path, capsys):
    key = "model.layers.1.self_attn.o_proj.weight"
    base = _base_with(tiny_model_dir, tmp_path, key, float("nan"))
    line = _refused(_merge(nf4_run, tmp_path / "out", "--base", str(base)), capsys, tmp_path / "out")
    # The NF4 base is rebuilt as trained: one NaN makes its block's scale, and so the dequantized weight, NaN.
    assert re.match(rf"error: {key}: \d+ of 4096 merged values are NaN or infinite; nothing was written", line), line


def test_values_out_of_the_output_formats_range_are_never_written(nf4_run, tiny_model_dir, tmp_path, capsys):
    key = "model.layers.0.mlp.up_proj.weight"
    base = _base_with(tiny_model_dir, tmp_path, key, 1e6)  # finite in fp32, infinite in fp16
    argv = ["merge", str(nf4_run), "--out", str(tmp_path / "out"), "--format", "fp16", "--no-report", "-q",
            "--base", str(base), "--merge-into", "original"]
    line = _refused(argv, capsys, tmp_path / "out")
    assert line.startswith(f"error: {key}: 1 of 8192 encoded values are NaN or infinite"), line
