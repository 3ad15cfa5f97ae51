"""LoRA on AWQ bases and the way back: an AWQ checkpoint trains as itself (base.quantization auto), the loss
falls, and `finetune merge --format awq` requantizes the merged model into a checkpoint that follows
quant/formats/AWQ.md and loads through our loader with the adapter model's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.cli import main as finetune_main
from finetune.model import load_adapter, load_base
from finetune.recipe import recipe_from_dict
from finetune.train.loop import train
from quant.awq.model import load_awq_model
from quant.awq.nn import AWQLinear
from quant.packed import read_state
from support import awq_base, error_line, single_thread, tiny_recipe

IDS = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory, tokenizer) -> Path:
    return awq_base(tmp_path_factory.mktemp("tiny-awq"), tokenizer)


@pytest.fixture(scope="module")
def awq_run(tmp_path_factory, awq_dir, chat_files):
    out = tmp_path_factory.mktemp("awq-run") / "run"
    recipe = recipe_from_dict(tiny_recipe(awq_dir, *chat_files, out, base={"quantization": "auto"},
                                          train={"max_steps": 12, "gradient_checkpointing": False}))
    with single_thread():
        result = train(recipe, echo=lambda *a: None)
    return recipe, result, out


def test_awq_base_trains_and_is_detected_automatically(awq_run, awq_dir):
    recipe, result, out = awq_run
    base = json.loads((out / "adapter" / "base.json").read_text())
    assert (base["format"], base["asked_format"], base["settings"]["group_size"]) == ("awq", "auto", 32)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.25, losses
    assert result.eval_loss_after < result.eval_loss_before
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == LINEARS

    model = load_base(recipe.base, torch.device("cpu")).model
    assert isinstance(model.model.layers[0].mlp.down_proj, AWQLinear)
    with torch.no_grad():
        plain = model(IDS).logits
        tuned = load_adapter(model, result.adapter_dir).eval()(IDS).logits
    assert not torch.allclose(plain, tuned, atol=1e-4), "adapter had no effect on the AWQ base"



def _check_awq_layout(out: Path, group_size: int) -> None:
    """quant/formats/AWQ.md on a written checkpoint: the config block and one layer's tensors."""
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["zero_point"], qc["version"]) == \
        ("awq", 4, group_size, True, "gemm")
    assert qc == json.loads((out / "quantize_config.json").read_text())
    tensors = read_state(out)
    K, N = 128, 64  # down_proj of the tiny model
    name = "model.layers.0.mlp.down_proj"
    assert f"{name}.weight" not in tensors and f"{name}.g_idx" not in tensors
    assert tensors[f"{name}.qweight"].dtype == torch.int32 and tuple(tensors[f"{name}.qweight"].shape) == (K, N // 8)
    assert tensors[f"{name}.qzeros"].dtype == torch.int32
    assert tuple(tensors[f"{name}.qzeros"].shape) == (K // group_size, N // 8)
    assert tensors[f"{name}.scales"].dtype == torch.float16
    assert tuple(tensors[f"{name}.scales"].shape) == (K // group_size, N)
    assert tensors["model.embed_tokens.weight"].dtype == tensors["model.norm.weight"].dtype == torch.float16


def test_awq_base_adapter_merges_back_to_awq(awq_run, awq_dir, chat_files, tmp_path):
    recipe, result, out = awq_run
    merged = tmp_path / "merged-awq"
    with single_thread():
        code = finetune_main(["merge", str(out), "--out", str(merged), "--format", "awq", "--calib",
                              str(chat_files[0]), "--calib-samples", "8", "--calib-seqlen", "64", "-q"])
    assert code == 0
    _check_awq_layout(merged, 32)  # by default the base's group size
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["awq"]["method"] == "awq" and report["awq"]["calib_samples"] == 8
    assert report["fidelity"]["retention"] > 0.8
    log = json.loads((merged / "quant_log.json").read_text())
    assert len(log["layers"]) == 14 and log["mean_rel_error"] < 0.1 and log["scales"]

    model = load_awq_model(merged)
    assert sum(isinstance(m, AWQLinear) for m in model.modules()) == 14
    base = load_base(recipe.base, torch.device("cpu")).model
    with torch.no_grad():
        plain = base(IDS).logits
        want = load_adapter(base, result.adapter_dir).eval()(IDS).logits
        got = model(IDS).logits
    # The requantized merge is far closer to the adapter model than the base was: the adapter's effect survives.
    assert _kl(want, got) < _kl(want, plain) / 10


def test_awq_merge_by_round_to_nearest_needs_no_calibration(awq_run, tmp_path, capsys):
    """--method rtn: the AWQ grid without the scale search, so no --calib; a GPTQ method name is refused."""
    merged = tmp_path / "merged-rtn"
    with single_thread():
        code = finetune_main(["merge", str(awq_run[2]), "--out", str(merged), "--format", "awq", "--method", "rtn",
                              "--group-size", "64", "-q"])
    assert code == 0
    _check_awq_layout(merged, 64)
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["awq"]["method"] == "rtn" and report["fidelity"]["retention"] > 0.8
    assert not json.loads((merged / "quant_log.json").read_text())["scales"]  # nothing searched, nothing folded
    capsys.readouterr()
    code = finetune_main(["merge", str(awq_run[2]), "--out", str(tmp_path / "x"), "--format", "awq", "--method",
                          "gptq", "-q"])
    assert code == 2 and error_line(capsys.readouterr().err) == "error: --method must be one of awq, rtn (got 'gptq')"


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean per-token KL(p || q) of two models' next-token distributions."""
    p, q = p_logits.log_softmax(-1).flatten(0, 1), q_logits.log_softmax(-1).flatten(0, 1)
    return torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean").item()


def test_awq_adapter_cannot_merge_into_the_original_weights(awq_run, tiny_model_dir, tmp_path, capsys):
    """The AWQ base's norms and projections carry folded scales, so a delta learned on it does not belong to the
    original weights: refused in one line, before anything is written."""
    out = tmp_path / "orig"
    code = finetune_main(["merge", str(awq_run[2]), "--out", str(out), "--format", "bf16", "--merge-into", "original",
                          "--base-original", str(tiny_model_dir), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "--merge-into original is not possible for an adapter trained on AWQ" in error_line(err)
    assert not out.exists()
