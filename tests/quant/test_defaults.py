"""One set of defaults: the config dataclasses' defaults are the quantizers' (`quant gptq` / `quant awq` with no
quantizer flags give the very tensors GPTQConfig() / AWQConfig() give from Python), and the merge starts from them."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import char_tokenizer, tiny_llama
from transformers import AutoModelForCausalLM

from quant import AWQConfig, GPTQConfig, quantize_model, quantize_model_awq
from quant.calibration import calibration_chunks, load_texts
from quant.cli import main
from quant.formats.base import BaseSpec
from quant.formats.registry import output_format
from quant.packed import read_state

SAMPLES, SEQLEN = 4, 32  # calibration flags (not quantizer settings), kept small for speed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny float model whose layers fit the default group size of 128 (in_features 128 and 256)."""
    d = tmp_path_factory.mktemp("tiny-g128")
    tiny_llama(hidden=128, intermediate=256).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


def cli_checkpoint(command: str, model_dir, prose_file, out) -> dict[str, torch.Tensor]:
    assert main(["--log-level", "WARNING", command, str(model_dir), "--out", str(out), "--calib", str(prose_file),
                 "--calib-samples", str(SAMPLES), "--calib-seqlen", str(SEQLEN), "--device", "cpu",
                 "--no-progress"]) == 0
    return read_state(out)


def python_model(model_dir, prose_file):
    """The same float model and calibration windows as the CLI builds them, for the Python API."""
    chunks = calibration_chunks(load_texts([str(prose_file)]), char_tokenizer(), SAMPLES, SEQLEN, seed=0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), chunks


def assert_same_checkpoint(cli: dict, model) -> None:
    mine = model.state_dict()
    assert set(cli) == set(mine) - {"lm_head.weight"}  # the tied head is written once
    for key, t in cli.items():
        ours = mine[key] if not mine[key].is_floating_point() or mine[key].dtype == t.dtype else mine[key].to(t.dtype)
        assert torch.equal(t, ours), key


def test_gptq_config_defaults_are_quant_gptqs(model_dir, prose_file, tmp_path):
    cli = cli_checkpoint("gptq", model_dir, prose_file, tmp_path / "cli")
    model, chunks = python_model(model_dir, prose_file)
    quantize_model(model, chunks, GPTQConfig(), device="cpu", progress=False)
    assert_same_checkpoint(cli, model)
    # the measured defaults are not the paper's: they change the weights
    published, _ = python_model(model_dir, prose_file)
    quantize_model(published, chunks, GPTQConfig.published(), device="cpu", progress=False)
    assert not torch.equal(published.model.layers[0].mlp.down_proj.qweight, model.model.layers[0].mlp.down_proj.qweight)


def test_awq_config_defaults_are_quant_awqs(model_dir, prose_file, tmp_path):
    cli = cli_checkpoint("awq", model_dir, prose_file, tmp_path / "cli")
    model, chunks = python_model(model_dir, prose_file)
    quantize_model_awq(model, chunks, AWQConfig(), device="cpu", progress=False)
    assert_same_checkpoint(cli, model)


def test_rtn_defaults_are_plain_min_max_rounding():
    cfg = GPTQConfig(method="rtn")
    assert (cfg.desc_act, cfg.mse, cfg.decorrelate) == (False, 0.0, 0.0)
    assert (GPTQConfig().desc_act, GPTQConfig().mse, GPTQConfig().decorrelate) == (True, 2.4, 0.25)
    assert GPTQConfig(method="rtn", mse=2.4).mse == 2.4  # a value given is kept


@pytest.mark.parametrize("base_format", ["nf4", "gptq"])
def test_merge_requantizes_with_the_same_defaults_and_reads_a_bases_recorded_settings(base_format):
    fmt = output_format("gptq")
    recorded = {"bits": 4, "group_size": 64, "desc_act": False, "sym": True, "mse": 0.0, "decorrelate": 0.5,
                "method": "rtn", "checkpoint_format": "gptq"}
    base = BaseSpec(model="m", model_dir="m", format=base_format, compute_dtype="float32",
                    settings=recorded if base_format == "gptq" else {"double_quant": True})
    cfg = fmt.gptq_config(base, None)
    if base_format == "gptq":  # what the base records, decorrelate included; the method is the merge's own
        assert (cfg.group_size, cfg.desc_act, cfg.mse, cfg.decorrelate, cfg.method) == (64, False, 0.0, 0.5, "gptq")
    else:
        assert cfg == GPTQConfig()


def test_merge_awq_differs_from_quant_awq_in_its_rounding_only():
    fmt = output_format("awq")
    base = BaseSpec(model="m", model_dir="m", format="nf4", compute_dtype="float32", settings={})
    cfg = fmt.awq_config(base, None)
    assert cfg.rounding == "dithered" and cfg == AWQConfig(rounding="dithered")
