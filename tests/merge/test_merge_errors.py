"""Failures leave nothing behind, user mistakes are one clear line, and the CLI wires it all up."""

from __future__ import annotations

import json
import shutil

import pytest

from finetune.cli import main
from quant import tensorfiles
from quant.errors import UserError
from support import quiet_merge


class _Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
def test_interrupted_merge_leaves_no_output(nf4_run, tmp_path, monkeypatch, exc):
    real_add, calls = tensorfiles.ShardWriter.add, {"n": 0}

    def failing_add(self, tensors):
        calls["n"] += 1
        if calls["n"] == 2:  # after the embeddings, in the middle of the layers
            raise exc()
        return real_add(self, tensors)

    monkeypatch.setattr(tensorfiles.ShardWriter, "add", failing_add)
    with pytest.raises(exc):
        quiet_merge(nf4_run, tmp_path / "out", "nf4", report=False)
    assert calls["n"] == 2
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [".out.lock"], "the temporary directory is removed too (the " \
        "lock file stays, as filelock keeps it on Unix)"


def test_failed_overwrite_keeps_the_previous_output(nf4_run, tmp_path, monkeypatch):
    out = quiet_merge(nf4_run, tmp_path / "out", "bf16", report=False).out_dir
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        quiet_merge(nf4_run, out, "bf16", report=False)

    def failing_config(*a, **k):
        raise _Boom()

    monkeypatch.setattr("finetune.merge.pipeline.write_config", failing_config)
    with pytest.raises(_Boom):  # fails after every layer was written, before the model is complete: nothing replaced
        quiet_merge(nf4_run, out, "nf4", overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_a_failed_scoring_keeps_the_complete_merged_model(nf4_run, tmp_path, monkeypatch, capsys):
    """The model is in place before the fidelity evaluation starts (which can take minutes on CPU): a failure or a
    Ctrl-C there leaves the new model and its merge report, without a fidelity."""
    def failing_report(*a, **k):
        raise _Boom()

    monkeypatch.setattr("finetune.merge.report.fidelity", failing_report)
    out = tmp_path / "out"
    with pytest.raises(_Boom):
        quiet_merge(nf4_run, out, "bf16")
    report = json.loads((out / "merge_report.json").read_text())
    assert report["format"] == "bf16" and "fidelity" not in report and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("finetune.merge.report.fidelity", interrupted)
    assert main(["merge", str(nf4_run), "--out", str(tmp_path / "ctrl-c"), "--format", "bf16", "-q"]) == 130
    assert capsys.readouterr().err.strip().endswith(f"interrupted while scoring; the merged model is complete in "
                                                    f"{tmp_path / 'ctrl-c'} (its merge_report.json has no fidelity)")
    assert (tmp_path / "ctrl-c" / "model.safetensors").is_file()


def _edited_adapter(run, tmp_path, **config):
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "adapter", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(config)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return adapter


def test_user_errors(nf4_run, gptq_run, tmp_path, tokenizer):
    from finetune.synthetic import random_model

    def fails(match, *args, **kwargs):
        with pytest.raises(UserError, match=match):
            quiet_merge(*args, report=False, **kwargs)
        assert not (tmp_path / "o").exists()

    out = tmp_path / "o"
    wider = tmp_path / "wider"
    random_model("tiny", vocab_size=len(tokenizer), hidden_size=96, intermediate_size=128).save_pretrained(wider)
    tokenizer.save_pretrained(wider)
    fails(r"adapter/base mismatch: weight shapes \(out x in\) differ for 14 modules, e\.g\. "
          r"model\.layers\.0\.mlp\.down_proj \(adapter 64x128, base 96x128\)", nf4_run, out, "bf16", base=str(wider))
    shallow = tmp_path / "shallow"
    random_model("tiny", vocab_size=len(tokenizer), num_hidden_layers=1).save_pretrained(shallow)
    fails(r"has no Linear weight for 7 adapted modules, e\.g\. \['model\.layers\.1\.mlp\.down_proj'",
          nf4_run, out, "bf16", base=str(shallow))
    fails("needs calibration data: pass --calib", nf4_run, out, "gptq")
    fails("--calib applies to --format gptq, awq, gguf only", nf4_run, out, "nf4", calib="x.txt")
    fails("--bits/--group-size apply to --format gptq, awq only", nf4_run, out, "int8",
          options={"bits": 4, "group_size": 64})
    fails("--merge-into original on a GPTQ-trained adapter needs --base-original", gptq_run, out, "bf16",
          merge_into="original")
    fails("trained on a GPTQ base but .* is not a GPTQ checkpoint", gptq_run, out, "bf16", base=str(wider))
    fails("group size 128 does not fit layer", nf4_run, out, "gptq", options={"method": "rtn"})
    fails("--format must be one of", nf4_run, out, "onnx")
    fails("DoRA", _edited_adapter(nf4_run, tmp_path, use_dora=True), out, "bf16")
    fails("no adapter_config.json", wider, out, "bf16")
    fails(r"adapter is the adapter; writing there would replace it", nf4_run, nf4_run / "adapter", "bf16",
          overwrite=True)


def test_cli(nf4_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["merge", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for word in ("--format", "nf4", "--merge-into", "--calib", "retention", "KL(b||c)", "--no-report"):
        assert word in help_text

    assert main(["merge", str(nf4_run), "--out", str(tmp_path / "bad"), "--format", "gptq", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --format gptq needs calibration data") and "\n" not in err
    assert not (tmp_path / "bad").exists()

    assert main(["merge", str(nf4_run), "--out", str(tmp_path / "m"), "--format", "fp16", "--no-report", "-q"]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["dtype"] == "float16" and "quantization_config" not in config
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["format"] == "fp16" and "fidelity" not in report
