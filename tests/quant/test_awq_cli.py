"""`quant awq` and `quant eval` on its checkpoints."""

from __future__ import annotations

import json

from test_quant_cli import evaluated, run_cli


def test_awq_then_eval_end_to_end(tmp_path, tiny_model_dir, prose_file, capsys):
    out = tmp_path / "q"
    code, stdout, _ = run_cli(["--log-level", "WARNING", "awq", str(tiny_model_dir), "--out", str(out),
                               "--group-size", "32", "--calib", str(prose_file), "--calib-samples", "4",
                               "--calib-seqlen", "64", "--search-tokens", "128", "--no-progress"], capsys)
    assert code == 0 and "wrote" in stdout and "awq 4-bit g32" in stdout
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["zero_point"], qc["version"]) == ("awq", 4, 32, True,
                                                                                                 "gemm")
    assert qc["meta"]["clip"] is True and qc["meta"]["search_tokens"] == 128
    # the defaults measured best out of the calibration domain (README, "quant awq")
    assert (qc["meta"]["rounding"], qc["meta"]["decorrelate"]) == ("feedback", 0.5)
    log = json.loads((out / "quant_log.json").read_text())
    assert log["calib_samples"] == 4 and len(log["layers"]) == 14 and all(e["rel_error"] > 0 for e in log["layers"])
    assert (out / "tokenizer.json").exists()
    res, _ = evaluated(out, prose_file, capsys)
    assert res["quantization"] == "awq"
    code, _, err = run_cli(["eval", str(out), "--data", str(prose_file), "--quantization", "gptq"], capsys)
    assert code == 2 and "is a AWQ checkpoint; use 'awq' or 'auto'" in err


def test_awq_rtn_needs_no_calibration_and_no_clip_is_recorded(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "r"
    code, stdout, _ = run_cli(["--log-level", "WARNING", "awq", str(tiny_model_dir), "--out", str(out),
                               "--group-size", "64", "--method", "rtn", "--no-clip", "--no-progress"], capsys)
    assert code == 0 and "rtn 4-bit g64" in stdout
    meta = json.loads((out / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["method"] == "rtn" and meta["clip"] is False


def test_awq_refuses_its_own_source_as_output(tiny_model_dir, capsys):
    before = sorted(p.name for p in tiny_model_dir.iterdir())
    argv = ["awq", str(tiny_model_dir), "--out", str(tiny_model_dir), "--method", "rtn", "--group-size", "32"]
    for flags in ([], ["--overwrite"]):  # never, even with --overwrite (docs/outputs.md)
        code, _, err = run_cli(argv + flags, capsys)
        assert code == 2 and "is the model; writing there would replace it" in err
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before


def test_awq_replaces_an_existing_out_only_with_overwrite(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["--log-level", "WARNING", "awq", str(tiny_model_dir), "--out", str(out), "--method", "rtn",
            "--group-size", "32", "--no-progress"]
    assert run_cli(argv, capsys)[0] == 2 and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert run_cli(argv + ["--overwrite"], capsys)[0] == 0
    assert not (out / "notes.txt").exists()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 32
