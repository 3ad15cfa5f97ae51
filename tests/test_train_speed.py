"""What keeps the run's memory at the training step's: evaluation goes through the chunked loss and never holds
full-vocabulary logits (a [tokens, vocab] tensor is 8x2048x128256x4 bytes = 7.8 GiB at the 1B shape's 8x2048)."""

from __future__ import annotations


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from support import tiny_recipe
from finetune.recipe import recipe_from_dict
from finetune.train import evaluate as evaluate_mod
from finetune.train import finish, fit, loss
from finetune.train.loop import train


class _LogitRows(TorchDispatchMode):
    """The most rows of any tensor an op returns whose last dimension is the vocabulary (logits and their kin)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("fused", [True, False])
def test_evaluation_never_holds_full_vocabulary_logits(tmp_path, tiny_model_dir, chat_files, tokenizer,
                                                       monkeypatch, fused):
    """Eval batches of 4 x 64 tokens go through the loss in chunks of 128 rows (the plain loss, the check's
    counter-example, holds logits for every token of the batch)."""
    vocab = len(tokenizer)
    monkeypatch.setattr(loss, "CPU_FUSED_CHUNK_BYTES", 4 * vocab)  # the smallest chunk: 128 rows
    seen = {"rows": 0, "calls": 0}
    real = evaluate_mod.evaluate

    def recorded(run):
        with _LogitRows(vocab) as mode:
            out = real(run)
        seen["rows"] = max(seen["rows"], mode.rows)
        seen["calls"] += 1
        return out

    for module in (evaluate_mod, fit, finish):
        monkeypatch.setattr(module, "evaluate", recorded)
    recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, tmp_path / "run", base={"quantization": "none"},
                                          train={"max_steps": 2, "fused_cross_entropy": fused, "eval_every": 1}))
    train(recipe, echo=lambda *a: None)
    assert seen["calls"] == 3  # before training, after step 1, after training
    if fused:
        assert 0 < seen["rows"] <= 128
    else:
        assert seen["rows"] >= 4 * 64 - 8  # a batch's packed rows, whole
