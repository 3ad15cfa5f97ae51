"""`finetune chat` and `finetune generate` on a trained adapter and on its merged output, and which model
directories they can run (model_format)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from finetune.chat import chat, generate_prompts, read_prompts
from finetune.cli import main
from finetune.generation import GenConfig, chat_prompt_ids, generate, generate_batch
from finetune.inference import load, load_for_generation, model_format
from quant.formats.registry import output_format
from support import chat_rows, quiet_merge

PROMPTS = [{"text": "reverse: red blue green"}, {"text": "reverse: gold pink gray"}]


def _config(path: Path, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    return path


@pytest.mark.parametrize("config,expected", [
    ({"torch_dtype": "bfloat16"}, "bf16"), ({"dtype": "float16"}, "fp16"), ({}, "fp32"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "gptq"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}},
     "nf4"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}},
     "fp4"),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}, "int8"),
])
def test_model_format_is_read_from_config_json(tmp_path, config, expected):
    assert model_format(_config(tmp_path / "m", **config)) == expected


def test_greedy_replies_of_the_adapter_and_its_bf16_merge_agree(wandb_run):
    """The merged model is the adapter folded into its weights: greedy decoding gives the same text."""
    adapter = load(wandb_run, torch.device("cpu"))
    merged = load(wandb_run / "merges" / "bf16", torch.device("cpu"))
    assert adapter.kind == "adapter" and merged.kind == "bf16" and merged.dtype == torch.float32
    cfg = GenConfig(max_new_tokens=12)
    for prompt in PROMPTS:
        ids = chat_prompt_ids(adapter.tokenizer, [{"role": "user", "content": prompt["text"]}])
        assert ids == chat_prompt_ids(merged.tokenizer, [{"role": "user", "content": prompt["text"]}])
        a, m = generate(adapter.model, adapter.tokenizer, ids, cfg), generate(merged.model, merged.tokenizer, ids, cfg)
        assert a.text == m.text and a.new_tokens == m.new_tokens > 0


def test_an_adapter_is_merged_at_load_for_generation_computing_what_peft_computes(wandb_run):
    """chat/generate fold the adapter into dense weights once (no 4-bit dequantization per token); the logits are
    those of the adapter on its NF4 base up to float rounding."""
    peft = load(wandb_run, torch.device("cpu"))
    fast = load_for_generation(wandb_run, torch.device("cpu"))
    assert fast.kind == "adapter" and fast.runner == "transformers" and fast.dtype == peft.dtype == torch.float32
    linear = {type(m) for m in fast.model.modules() if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__}
    assert linear == {torch.nn.Linear}  # no bitsandbytes or peft layers left
    rows = [chat_prompt_ids(fast.tokenizer, r["messages"]) for r in chat_rows(3, seed=11)]
    with torch.no_grad():
        for ids in rows:
            x = torch.tensor([ids])
            ref, got = peft.model(x).logits, fast.model(x).logits
            assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item(), (got - ref).abs().max()
    cfg = GenConfig(max_new_tokens=12)
    for ids in rows:
        merged, adapter = generate(fast.model, fast.tokenizer, ids, cfg), generate(peft.model, peft.tokenizer, ids, cfg)
        assert merged.text == adapter.text


def test_a_gguf_output_runs_in_llama_cpp_with_transformers_greedy_reply(wandb_run, tmp_path, monkeypatch):
    out = tmp_path / "gguf-f32"
    quiet_merge(wandb_run, out, "gguf", options={"gguf_type": "F32"}, report=False, device="cpu")
    # transformers cannot rebuild the tiny byte-level tokenizer from GGUF metadata (SmolLM2's it can): read the
    # same tokenizer from the run instead, for both runners.
    run_tokenizer = load(wandb_run, torch.device("cpu")).tokenizer
    monkeypatch.setattr(type(output_format("gguf")), "load_tokenizer", lambda self, model_dir: run_tokenizer)
    cpp = load_for_generation(out, torch.device("cpu"))
    hf = load_for_generation(out, torch.device("cpu"), use_llama_cpp=False)
    assert (cpp.runner, cpp.kind, hf.runner, hf.kind) == ("llama.cpp", "gguf", "transformers", "gguf")
    cfg = GenConfig(max_new_tokens=10)
    for prompt in PROMPTS:
        ids = chat_prompt_ids(hf.tokenizer, [{"role": "user", "content": prompt["text"]}])
        a, b = generate(cpp.model, cpp.tokenizer, ids, cfg), generate(hf.model, hf.tokenizer, ids, cfg)
        assert (a.text, a.new_tokens) == (b.text, b.new_tokens) and a.new_tokens > 0
    stdout, stderr = io.StringIO(), io.StringIO()
    assert chat(str(out), cfg, stdin=io.StringIO("reverse: red blue green\n"), stdout=stdout, stderr=stderr) == 1
    assert "gguf model in llama.cpp" in stderr.getvalue() and stderr.getvalue().count("tokens/s]") == 1
    ids = chat_prompt_ids(hf.tokenizer, [{"role": "user", "content": "reverse: red blue green"}])
    assert stdout.getvalue().split("assistant> ")[1].startswith(generate(hf.model, hf.tokenizer, ids, cfg).text.strip())


def test_batched_generation_equals_one_prompt_at_a_time(wandb_run):
    """Left padding in a batch changes nothing: each prompt gets the completion it gets alone."""
    m = load(wandb_run / "merges" / "bf16", torch.device("cpu"))
    prompts = [chat_prompt_ids(m.tokenizer, [{"role": "user", "content": r["messages"][0]["content"]}])
               for r in chat_rows(5, seed=7)]
    prompts[1] = prompts[1] + prompts[1][-4:]  # different lengths, so the batch really pads
    cfg = GenConfig(max_new_tokens=10)
    batched = generate_batch(m.model, m.tokenizer, prompts, cfg, batch_size=5)
    for ids, b in zip(prompts, batched):
        alone = generate(m.model, m.tokenizer, ids, cfg)
        assert (b.text, b.new_tokens) == (alone.text, alone.new_tokens)


def test_chat_streams_replies_and_keeps_the_conversation(wandb_run):
    stdin = io.StringIO("reverse: red blue green\n\n/reset\nreverse: gold pink gray\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    replies = chat(str(wandb_run), GenConfig(max_new_tokens=8), stdin=stdin, stdout=stdout, stderr=stderr)
    assert replies == 2
    out, err = stdout.getvalue(), stderr.getvalue()
    assert out.count("you> ") == 5 and out.count("assistant> ") == 2  # prompted for every line, then end of input
    assert err.count("tokens/s]") == 2 and "(conversation cleared)" in err
    assert "adapter merged at load into its nf4 base" in err
    # The streamed text is the reply generate() gives for the same prompt.
    m = load(wandb_run, torch.device("cpu"))
    ids = chat_prompt_ids(m.tokenizer, [{"role": "user", "content": "reverse: red blue green"}])
    expected = generate(m.model, m.tokenizer, ids, GenConfig(max_new_tokens=8)).text
    assert out.split("assistant> ")[1].startswith(expected.strip()[:20])


def test_sampling_is_reproducible_with_a_seed_and_differs_from_greedy(wandb_run):
    m = load(wandb_run / "merges" / "bf16", torch.device("cpu"))
    ids = chat_prompt_ids(m.tokenizer, [{"role": "user", "content": "reverse: red blue green"}])
    hot = GenConfig(max_new_tokens=16, temperature=5.0, top_p=1.0, seed=3)
    first, again = generate(m.model, m.tokenizer, ids, hot), generate(m.model, m.tokenizer, ids, hot)
    assert first.text == again.text
    greedy = generate(m.model, m.tokenizer, ids, GenConfig(max_new_tokens=16))
    assert first.text != greedy.text


def test_generate_reads_prompt_files_and_writes_jsonl(tmp_path, wandb_run):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(chat_rows(1, seed=3)[0]) + "\n" + json.dumps({"prompt": "reverse: red"}) + "\n")
    read = read_prompts(str(prompts))
    assert read[0] == {"messages": chat_rows(1, seed=3)[0]["messages"][:1]} and read[1] == {"text": "reverse: red"}
    out = tmp_path / "out.jsonl"
    records = generate_prompts(str(wandb_run / "merges" / "bf16"), read, GenConfig(max_new_tokens=6), out=str(out),
                               stdout=io.StringIO(), stderr=io.StringIO())
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    assert all(r["new_tokens"] > 0 and r["tokens_per_s"] > 0 for r in records)
    (tmp_path / "lines.txt").write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts(str(tmp_path / "lines.txt")) == [{"text": "first prompt"}, {"text": "second prompt"}]


# ----------------------------------------------------------------------------------- bad input: one line, exit 2


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", [["chat"], ["generate", "--prompt", "hi"]])
def test_missing_or_unsupported_models_are_one_line(tmp_path, capsys, command):
    cmd, *rest = command
    assert "no such run or model directory" in _error([cmd, str(tmp_path / "nope"), *rest], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a run, adapter or model directory" in _error([cmd, str(empty), *rest], capsys)
    hqq = _config(tmp_path / "hqq", quantization_config={"quant_method": "hqq", "bits": 4})
    err = _error([cmd, str(hqq), *rest], capsys)
    assert "quant_method 'hqq'" in err and "supported: run directories and adapters" in err and "AWQ" in err
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert "not a directory; supported:" in _error([cmd, str(gguf), *rest], capsys)


def test_bad_generation_settings_are_one_line(wandb_run, tmp_path, capsys):
    assert "--top-p 1.5" in _error(["generate", str(wandb_run), "--prompt", "x", "--top-p", "1.5"], capsys)
    assert "--max-new-tokens 0" in _error(["generate", str(wandb_run), "--prompt", "x", "--max-new-tokens", "0"],
                                          capsys)
    assert "--prompts" in _error(["generate", str(wandb_run), "--prompts", str(tmp_path / "none.jsonl")], capsys)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": 3}\n')
    assert "bad.jsonl:2: expected an object with 'prompt'" in _error(
        ["generate", str(wandb_run), "--prompts", str(tmp_path / "bad.jsonl")], capsys)
