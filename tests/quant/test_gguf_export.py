"""GGUF files from `write_gguf` / `quant gguf`, read back by the `gguf` package and loaded by transformers."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as G
from gguf_helpers import save_tiny, sentencepiece_tokenizer, tiny_model, token_ids, trained_tokenizer

from quant.cli import main
from quant.errors import UserError
from quant.export import export_gguf
from quant.ggml.imatrix import collect_importance, weight_name
from quant.ggml.writer import write_gguf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", tie=True)


def fields(path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}, {t.name: t for t in r.tensors}


def hf_logits(model_dir, ids, gguf_file=None):
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(ids).logits[0]


def export(src, out, gguf_type, **kw):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    return write_gguf(model.state_dict().items(), model.config, src, out, gguf_type, progress=False, **kw)


def test_llama_file_has_llama_cpps_metadata_tokenizer_names_and_mix(llama_dir, tmp_path):
    out = tmp_path / "m.gguf"
    report = export(llama_dir, out, "q4_k_m")
    kv, tensors = fields(out)
    assert kv["general.architecture"] == "llama" and kv["general.file_type"] == 15
    assert (kv["llama.block_count"], kv["llama.embedding_length"], kv["llama.feed_forward_length"]) == (2, 256, 512)
    assert (kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"]) == (4, 2)
    assert (kv["llama.rope.dimension_count"], kv["llama.vocab_size"], kv["llama.context_length"]) == (64, 259, 512)
    assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert (kv["tokenizer.ggml.model"], kv["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert len(kv["tokenizer.ggml.tokens"]) == 259 and kv["tokenizer.ggml.tokens"][32] == "A"
    assert kv["tokenizer.ggml.token_type"][256:] == [3, 3, 3]  # the ChatML specials are control tokens
    assert (kv["tokenizer.ggml.eos_token_id"], kv["tokenizer.ggml.padding_token_id"]) == (256, 257)
    assert not kv["tokenizer.ggml.add_bos_token"] and "<|im_start|>" in kv["tokenizer.chat_template"]
    types = {n: t.tensor_type for n, t in tensors.items()}
    assert len(types) == 3 + 2 * 9 and report.tensors == {n: t.name for n, t in types.items()}
    assert types["output.weight"] == G.Q6_K and types["token_embd.weight"] == G.Q4_K
    assert types["blk.1.attn_v.weight"] == G.Q6_K and types["blk.0.attn_v.weight"] == G.Q4_K  # use_more_bits
    assert types["blk.0.attn_norm.weight"] == G.F32 and types["blk.1.ffn_down.weight"] == G.Q6_K
    assert tuple(tensors["blk.0.ffn_down.weight"].shape) == (512, 256)  # ggml order: ne0 = row length first
    assert report.bytes == out.stat().st_size and not list(tmp_path.glob(".*"))


# Largest |logit difference| allowed, relative to the largest |logit|, per file type: about 1.5x what these small
# random models show (they amplify weight error: bf16's 0.4% per weight moves the logits by 1%).
TOLERANCE = {"f32": 1e-5, "bf16": 0.02, "q8_0": 0.05, "q6_k": 0.2, "q5_k_m": 0.3, "q4_k_m": 0.5, "q4_0": 0.7}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("gguf_type", list(TOLERANCE))
def test_transformers_loads_the_file_with_logits_close_to_the_source(arch, gguf_type, llama_dir, qwen_dir, tmp_path):
    src = llama_dir if arch == "llama" else qwen_dir
    export(src, tmp_path / "m.gguf", gguf_type)
    ids = token_ids()
    ref = hf_logits(src, ids)
    got = hf_logits(tmp_path, ids, gguf_file="m.gguf")
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= TOLERANCE[gguf_type]
    if gguf_type != "f32":
        assert err > 0  # really quantized


def test_qwen2_keeps_biases_and_a_tied_head_is_not_written(qwen_dir, tmp_path):
    export(qwen_dir, tmp_path / "q.gguf", "q8_0")
    kv, tensors = fields(tmp_path / "q.gguf")
    assert kv["general.architecture"] == "qwen2" and kv["qwen2.rope.freq_base"] == pytest.approx(1e6)
    assert "output.weight" not in tensors and tensors["token_embd.weight"].tensor_type == G.Q8_0
    assert tensors["blk.0.attn_q.bias"].tensor_type == G.F32


def test_more_bits_cost_more_bytes_and_less_error(llama_dir, tmp_path):
    ids = token_ids()
    ref = hf_logits(llama_dir, ids)
    sizes, errors = [], []
    for t in ("q4_0", "q4_k_m", "q5_k_m", "q6_k", "q8_0", "bf16"):
        sizes.append(export(llama_dir, tmp_path / f"{t}.gguf", t).bytes)
        errors.append((hf_logits(tmp_path, ids, gguf_file=f"{t}.gguf") - ref).abs().mean().item())
    assert sizes == sorted(sizes)
    assert errors[1:] == sorted(errors[1:], reverse=True) and errors[0] > errors[2]


def test_a_failed_stream_leaves_the_old_file_and_no_temporaries(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama_dir))
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")

    def broken():
        for i, item in enumerate(model.state_dict().items()):
            if i == 5:
                raise RuntimeError("merge died")
            yield item

    with pytest.raises(RuntimeError, match="merge died"):
        write_gguf(broken(), model.config, llama_dir, out, "q4_k_m", progress=False)
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    state = dict(model.state_dict())
    del state["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(UserError, match="ended without 1 tensors llama.cpp needs, e.g. blk.1.ffn_down.weight"):
        write_gguf(state.items(), model.config, llama_dir, out, "q8_0", progress=False)
    with pytest.raises(UserError, match="appears twice"):
        write_gguf([*model.state_dict().items(), *model.state_dict().items()], model.config, llama_dir, out, "q8_0",
                   progress=False)
    assert out.read_bytes() == b"previous" and len(list(tmp_path.iterdir())) == 1


def test_importance_is_the_mean_square_input_of_each_linear():
    model = tiny_model("llama")
    chunks = [token_ids(16, seed=s) for s in range(3)]
    seen = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    imp = collect_importance(model, chunks, progress=False)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    torch.testing.assert_close(imp["model.layers.1.mlp.down_proj.weight"], x.pow(2).mean(0))
    assert len(imp) == 2 * 7 + 1 and imp["lm_head.weight"].shape == (256,)
    assert weight_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer") == \
        "model.layers.0.self_attn.q_proj.weight"


def test_importance_changes_the_bytes_of_the_weighted_types_only(llama_dir, tmp_path):
    model = tiny_model("llama")
    imp = collect_importance(model, [token_ids(32, seed=s) for s in range(4)], progress=False)
    _, plain = fields(export(llama_dir, tmp_path / "a.gguf", "q4_k_m").path)
    _, weighted = fields(export(llama_dir, tmp_path / "b.gguf", "q4_k_m", importance=imp).path)
    for name, t in plain.items():
        same = np.array_equal(np.asarray(t.data), np.asarray(weighted[name].data))
        assert same == (t.tensor_type == G.F32 or name == "token_embd.weight"), name  # untied embd: a lookup


def test_cli_writes_the_file_and_words_bad_input_in_one_line(llama_dir, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert main(["--log-level", "WARNING", "gguf", str(llama_dir), "--out", str(out), "--type", "q6_k",
                 "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out and fields(out)[0]["general.file_type"] == 18
    for argv, message in ((["gguf", str(tmp_path / "nope"), "--out", str(tmp_path / "n.gguf")],
                           "neither an existing path"),
                          (["gguf", str(llama_dir), "--out", str(tmp_path / "x.bin")], "name a .gguf file")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    before = out.read_bytes()
    with pytest.raises(SystemExit) as e:  # an existing file is kept unless --overwrite
        main(["gguf", str(llama_dir), "--out", str(out), "--type", "q8_0", "--no-progress"])
    assert e.value.code == 2 and "pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["--log-level", "WARNING", "gguf", str(llama_dir), "--out", str(out), "--type", "q8_0",
                 "--no-progress", "--overwrite"]) == 0
    assert fields(out)[0]["general.file_type"] == 7 and not list(tmp_path.glob(".tmp-*"))


def test_calibrated_export_from_the_cli_needs_real_text(llama_dir, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "c.gguf"
    assert main(["--log-level", "WARNING", "gguf", str(llama_dir), "--out", str(out), "--calib", str(text),
                 "--calib-samples", "4", "--calib-seqlen", "64", "--no-progress"]) == 0
    assert "+ importance" in capsys.readouterr().out


def test_gptq_checkpoint_goes_straight_to_gguf(tmp_path):
    from finetune.synthetic import save_rtn_gptq

    from quant.gptq.model import load_gptq_model

    ckpt = save_rtn_gptq(tiny_model("llama"), tmp_path / "gptq", group_size=64)
    ids = token_ids()
    gptq = load_gptq_model(ckpt)
    with torch.no_grad():
        ref = gptq(ids).logits[0]
    report = export_gguf(str(ckpt), tmp_path / "g.gguf", "f32", progress=False)
    assert report.type_counts() == {"F32": 21}
    got = hf_logits(tmp_path, ids, gguf_file="g.gguf")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_calibrated_export_of_an_awq_checkpoint_weighs_every_projection(tmp_path, monkeypatch):
    """`quant gguf <AWQ dir> --calib`: the source loads with AWQLinear projections, and the importance statistics
    cover every one of them (and the head), not only the layers that are still nn.Linear (lm_head)."""
    import quant.export
    from finetune.synthetic import save_rtn_awq

    ckpt = save_rtn_awq(tiny_model("llama"), tmp_path / "awq", group_size=64)
    weighed = {}
    write = quant.export.write_gguf

    def spy(*args, importance=None, **kwargs):
        weighed.update(importance)
        return write(*args, importance=importance, **kwargs)

    monkeypatch.setattr(quant.export, "write_gguf", spy)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    assert main(["--log-level", "WARNING", "gguf", str(ckpt), "--out", str(tmp_path / "a.gguf"), "--calib", str(text),
                 "--calib-samples", "4", "--calib-seqlen", "64", "--no-progress"]) == 0
    projections = {f"{n}.weight" for n, m in tiny_model("llama").named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(projections) == 15 and set(weighed) == projections
    assert all(v.shape == (256 if "down_proj" not in k else 512,) and (v > 0).all() for k, v in weighed.items())


def test_gguf_source_keeps_its_tokenizer_metadata(tmp_path, monkeypatch):
    """A .gguf source is dequantized by transformers (which reads its tokenizer too) and re-exported."""
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    src = save_tiny(tmp_path / "src", tokenizer=trained_tokenizer("smollm"))
    first = tmp_path / "f32.gguf"
    export(src, first, "f32")
    second = tmp_path / "q8.gguf"
    export_gguf(str(first), second, "q8_0", progress=False)
    kv1, _ = fields(first)
    kv2, t2 = fields(second)
    assert {k: v for k, v in kv1.items() if k.startswith("tokenizer.")} == \
        {k: v for k, v in kv2.items() if k.startswith("tokenizer.")}
    assert t2["blk.0.attn_q.weight"].tensor_type == G.Q8_0
    ids = token_ids()
    assert kv2["tokenizer.ggml.pre"] == "smollm" and len(kv2["tokenizer.ggml.merges"]) > 200
    ref = hf_logits(src, ids)
    assert (hf_logits(tmp_path, ids, "q8.gguf") - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_pre_tokenizer_is_recognised_from_tokenizer_json(pre, tmp_path):
    tok = trained_tokenizer(pre)
    src = save_tiny(tmp_path / "src", tokenizer=tok)
    export(src, tmp_path / "m.gguf", "q8_0")
    kv, _ = fields(tmp_path / "m.gguf")
    assert kv["tokenizer.ggml.pre"] == pre and kv["tokenizer.ggml.model"] == "gpt2"
    assert len(kv["tokenizer.ggml.merges"]) == len(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"])
    assert len(kv["tokenizer.ggml.tokens"]) == 500 and kv["tokenizer.ggml.eos_token_id"] == tok.eos_token_id


def test_sentencepiece_tokenizer_becomes_a_llama_vocabulary_with_scores(tmp_path):
    tok = sentencepiece_tokenizer()
    src = save_tiny(tmp_path / "src", tokenizer=tok)
    export(src, tmp_path / "m.gguf", "q8_0")
    kv, _ = fields(tmp_path / "m.gguf")
    assert (kv["tokenizer.ggml.model"], kv["tokenizer.ggml.pre"]) == ("llama", "default")
    assert kv["tokenizer.ggml.tokens"][3] == "<0x00>" and kv["tokenizer.ggml.token_type"][3] == 6  # byte token
    scores = kv["tokenizer.ggml.scores"]
    assert scores[300] > scores[400] and kv["tokenizer.ggml.add_bos_token"] and kv["tokenizer.ggml.bos_token_id"] == 1
