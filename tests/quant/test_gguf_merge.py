"""`finetune merge --format gguf`: an adapter merged into one .gguf file that the gguf package's dequantizer reads
back as the merged weights, that transformers (gguf_file) and llama.cpp load, and whose --calib importance is
the merged model's own activation energy."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as G
from gguf_helpers import save_tiny, token_ids, trained_tokenizer

from quant.files import MARKER
from quant.formats.gguf import FILE
from quant.formats.registry import output_format, resolve_base
from quant.ggml.arch import Arch
from quant.ggml.imatrix import collect_importance
from quant.ggml.writer import write_gguf
from support import quiet_merge

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
# Relative Frobenius error of a dequantized tensor against the merged float weight it encodes, by tensor type.
TOLERANCE = {G.F32: 1e-7, G.Q8_0: 0.01, G.Q6_K: 0.03, G.Q4_K: 0.1}


def _adapter(root, **tiny):
    """(base dir, adapter dir, merged float model): a LoRA on every Linear of a tiny model whose delta is large
    against the weights, so that a file missing the merge fails by far."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = save_tiny(root / "base", "llama", **tiny)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    resolve_base(str(base), str(base), "none").save(adapter)
    return base, adapter, model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _adapter(tmp_path_factory.mktemp("gguf-merge"))


@pytest.fixture(scope="module")
def smollm_like(tmp_path_factory):
    """SmolLM2's shape of things: tied embeddings (the held-back head is the embedding) and its BPE tokenizer."""
    return _adapter(tmp_path_factory.mktemp("gguf-merge-tied"), tie=True, tokenizer=trained_tokenizer("smollm"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _dequantized(path) -> dict[str, tuple[G, torch.Tensor]]:
    """Every tensor of a .gguf file as the gguf package's reference dequantizer reads it (GGUF layout)."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        out[t.name] = (t.tensor_type, torch.from_numpy(np.array(values, dtype=np.float32)))
    return out


def _source(model, config=None) -> dict[str, torch.Tensor]:
    """A model's tensors by GGUF name, in GGUF layout (`config`: the HF config, default the model's)."""
    arch = Arch.from_config((config or model.config).to_dict())
    return {t.name: t.make(v.detach().float()) for k, v in model.state_dict().items() for t in arch.targets(k)}


def _llama_cpp(path, use):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False)
    try:
        return use(llm)
    finally:
        llm.close()


def test_merge_writes_one_gguf_file_of_the_merged_weights(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    base, adapter, merged = trained
    result = quiet_merge(adapter, tmp_path / "out", "gguf", report=False, options={"gguf_type": "Q4_K_M"})
    out = result.out_dir
    assert sorted(p.name for p in out.iterdir()) == sorted([FILE, "merge_report.json", MARKER])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert result.report["gguf"]["gguf_type"] == "Q4_K_M"
    assert result.report["output_bytes"] == (out / FILE).stat().st_size

    want, before = _source(merged), _source(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32))
    stored = _dequantized(out / FILE)
    assert set(stored) == set(want) and {G.Q4_K, G.Q6_K, G.F32} <= {ggml for ggml, _ in stored.values()}
    for name, (ggml, values) in stored.items():
        assert _rel(values, want[name]) < TOLERANCE[ggml], (name, ggml.name)
        if name.endswith(("attn_q.weight", "ffn_down.weight")):  # the LoRA delta is in the file
            assert _rel(values, before[name]) > 2 * _rel(values, want[name]), name

    loaded = output_format("gguf").load_merged(out, CPU, torch.float32)  # the fidelity report's model (c)
    assert all(torch.equal(values, stored[name][1]) for name, values in _source(loaded, merged.config).items())
    ids = token_ids(32)
    with torch.no_grad():
        got = loaded(ids).logits[0]
    cpp = _llama_cpp(out / FILE, lambda llm: (llm.eval(ids[0].tolist()), llm.scores[: ids.shape[1]])[1])
    assert _rel(torch.tensor(np.array(cpp)), got) < 0.05  # the same file as transformers, up to 8-bit activations


def test_chat_generate_and_eval_read_a_gguf_merge(smollm_like, tmp_path):
    """A GGUF merge directory holds no config.json or tokenizer files; finetune's model loading (chat, generate,
    eval) reads it as transformers does: the model from the file, the tokenizer from the file's metadata."""
    from transformers import AutoTokenizer

    from finetune.inference import load

    base, adapter, _ = smollm_like
    out = quiet_merge(adapter, tmp_path / "out", "gguf", report=False, options={"gguf_type": "Q8_0"}).out_dir
    used = load(out, CPU)
    assert used.kind == "gguf"
    text = "To be, or not to be: that is the question."
    assert used.tokenizer(text).input_ids == AutoTokenizer.from_pretrained(str(base))(text).input_ids
    ids = token_ids(16)
    with torch.no_grad():
        want = output_format("gguf").load_merged(out, CPU, torch.float32)(ids).logits
        assert torch.equal(used.model(ids).logits, want)


def test_calibrated_merge_weights_by_the_merged_models_activation_energy(smollm_like, tmp_path):
    """The importance the streaming merge measures layer by layer is the merged model's own: the file equals one
    written from the merged model's whole-model activation energy, and differs from an uncalibrated one."""
    base, adapter, merged = smollm_like
    calib = [token_ids(24, seed=s) for s in range(3)]
    result = quiet_merge(adapter, tmp_path / "c", "gguf", report=False, calib=calib,
                         options={"gguf_type": "q4_k_m"})
    assert result.report["gguf"]["importance"] is True and result.report["gguf"]["calib_samples"] == 3
    energy = collect_importance(merged, calib, progress=False)
    write_gguf(merged.state_dict().items(), merged.config, base, tmp_path / "ref.gguf", "q4_k_m", importance=energy,
               progress=False)
    plain = quiet_merge(adapter, tmp_path / "p", "gguf", report=False)
    got, ref, uncal = (_dequantized(p) for p in (result.out_dir / FILE, tmp_path / "ref.gguf", plain.out_dir / FILE))
    for name, (ggml, values) in ref.items():
        torch.testing.assert_close(got[name][1], values, rtol=0, atol=1e-6 * values.abs().max().item())
    assert "output.weight" not in got  # tied: the embedding is the head, held back until the final norm ran
    assert not torch.equal(got["token_embd.weight"][1], uncal["token_embd.weight"][1])
    from transformers import AutoTokenizer

    text = "Full fathom five thy father lies; of his bones are coral made."
    want = AutoTokenizer.from_pretrained(str(base)).encode(text)  # the adapter has no copy: the base's is used
    assert _llama_cpp(result.out_dir / FILE, lambda llm: llm.tokenize(text.encode(), add_bos=False)) == want
    assert not torch.equal(got["blk.1.ffn_up.weight"][1], uncal["blk.1.ffn_up.weight"][1])


def test_merge_refuses_what_gguf_cannot_be_before_any_work(trained, tmp_path):
    from quant.errors import UserError

    _, adapter, _ = trained
    with pytest.raises(UserError, match="--gguf-type must be one of"):
        quiet_merge(adapter, tmp_path / "x", "gguf", report=False, options={"gguf_type": "q3_k_s"})
    with pytest.raises(UserError, match="--dtype applies to quantized formats"):
        quiet_merge(adapter, tmp_path / "x", "gguf", report=False, dtype="float16")
    assert not (tmp_path / "x").exists()
