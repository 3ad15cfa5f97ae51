"""Packing, the batch contract, batch order (resume, sharding), and packed == unpacked loss on a real model."""

import numpy as np
import pytest
import torch

from finetune.data import batch_indices, collate, count_label_tokens, num_micro_batches, pack


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for row, n in enumerate(lengths):
        ids = rng.integers(3, 300, n).astype(np.int32)
        labels = np.where(rng.random(n) < 0.6, ids, -100).astype(np.int32)
        labels[0] = -100
        labels[-1] = ids[-1]
        out.append({"input_ids": ids, "labels": labels, "row": row})
    return out


def _segments(packed_row):
    """Split a packed row back into examples at each position-id restart."""
    starts = [i for i, p in enumerate(packed_row["position_ids"]) if p == 0] + [len(packed_row["input_ids"])]
    return [(tuple(packed_row["input_ids"][a:b]), tuple(packed_row["labels"][a:b])) for a, b in zip(starts, starts[1:])]


def test_packing_keeps_every_example_whole_and_restarts_positions():
    examples = _examples([5, 64, 17, 33, 1 + 63, 2, 40, 40, 40, 9, 30, 31] * 3)
    rows = pack(examples, max_length=64, seed=1)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    seen = [seg for r in rows for seg in _segments(r)]
    original = [(tuple(e["input_ids"]), tuple(e["labels"])) for e in examples]
    assert sorted(seen) == sorted(original)  # every token kept, no example split across rows
    assert sorted(i for r in rows for i in r["rows"]) == list(range(len(examples)))
    for r in rows:
        for (ids, _), n in zip(_segments(r), [len(examples[i]["input_ids"]) for i in r["rows"]]):
            assert len(ids) == n
    assert len(rows) <= -(-sum(len(e["input_ids"]) for e in examples) // 64) + 2  # near the lower bound
    assert [list(r["rows"]) for r in pack(examples, 64, seed=1)] == [list(r["rows"]) for r in rows]


def test_unpacked_batch_contract():
    examples = _examples([3, 6])
    batch = collate(examples, pad_token_id=0, packed=False)
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask"}
    assert all(t.dtype == torch.long and t.shape == (2, 6) for t in batch.values())
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert batch["labels"][0, 3:].tolist() == [-100] * 3 and batch["input_ids"][0, 3:].tolist() == [0] * 3
    assert batch["position_ids"].tolist() == [list(range(6))] * 2
    assert count_label_tokens(batch) == sum(int((e["labels"] != -100).sum()) for e in examples)
    assert collate(examples, 0, packed=False, pad_to=8)["input_ids"].shape == (2, 8)
    with pytest.raises(ValueError, match="does not fit pad_to=4"):
        collate(examples, 0, packed=False, pad_to=4)


def test_packed_batch_contract():
    rows = pack(_examples([4, 3, 5]), max_length=8, seed=0)
    batch = collate(rows, pad_token_id=0, packed=True, pad_to=8)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: positions define attention
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["position_ids"][r, :n].tolist() == row["position_ids"].tolist()
        assert batch["position_ids"][r, n:].tolist() == list(range(8 - n))  # tail padding: its own segment
        assert batch["labels"][r, n:].eq(-100).all()
    assert batch["labels"][:, 0].eq(-100).all()


def test_batch_order_is_deterministic_resumable_and_shardable():
    n, mbs = 23, 4
    epoch0 = batch_indices(n, mbs, shuffle=True, seed=7, epoch=0)
    assert epoch0 == batch_indices(n, mbs, shuffle=True, seed=7, epoch=0)
    assert epoch0 != batch_indices(n, mbs, shuffle=True, seed=7, epoch=1)
    assert sorted(i for b in epoch0 for i in b) == list(range(n))
    assert len(epoch0) == num_micro_batches(n, mbs) == 6
    assert batch_indices(n, mbs, shuffle=True, seed=7, epoch=0, start=4) == epoch0[4:]
    assert batch_indices(n, mbs, shuffle=False, seed=7, epoch=3)[0] == [0, 1, 2, 3]
    # Two ranks deal the same global order round-robin, from any resume point, in equal numbers.
    for start in (0, 1, 3):
        r0 = batch_indices(n, mbs, shuffle=True, seed=7, epoch=0, start=start, rank=0, world_size=2)
        r1 = batch_indices(n, mbs, shuffle=True, seed=7, epoch=0, start=start, rank=1, world_size=2)
        assert len(r0) == len(r1) == (6 - start) // 2
        assert [b for pair in zip(r0, r1) for b in pair] == epoch0[start:start + 2 * len(r0)]
    assert num_micro_batches(n, mbs, world_size=4) == 1


def _shifted_loss(logits, labels):
    """Sum of next-token CE over label tokens / label tokens, shifting inside each row."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_unpacked_batches_give_the_same_loss(tiny_tok, write_jsonl, data_cfg, chat_row, attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.data import build_datasets

    phrases = ["hello there", "fine thanks, how are you today?", "the user asks a question", "ship three mugs",
               "you are a helpful assistant", "answer briefly"]
    rows = [chat_row(*[(phrases[(i + j) % 6], phrases[(i * j + 1) % 6] * (1 + i % 3)) for j in range(1 + i % 3)])
            for i in range(10)]
    path = write_jsonl(rows)
    unpacked = build_datasets(data_cfg(path, packing=False, max_length=256), tiny_tok, seed=0)
    packed = build_datasets(data_cfg(path, packing=True, max_length=256), tiny_tok, seed=0)
    assert len(packed.train) < len(unpacked.train) == 10
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tiny_tok), max_position_embeddings=256)
    model = LlamaForCausalLM(config).to(torch.float64)
    model.config._attn_implementation = attn  # noqa: SLF001 - the documented way to switch an existing model
    model.eval()
    with torch.no_grad():
        a = collate(unpacked.train, unpacked.pad_token_id, packed=False)
        b = collate(packed.train, packed.pad_token_id, packed=True)
        assert count_label_tokens(a) == count_label_tokens(b)
        loss_a = _shifted_loss(model(**a, use_cache=False).logits, a["labels"])
        loss_b = _shifted_loss(model(**b, use_cache=False).logits, b["labels"])
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-9, atol=1e-9)
        # HF's own loss shifts the same way, so it agrees on both layouts too.
        torch.testing.assert_close(model(**a, use_cache=False).loss, model(**b, use_cache=False).loss)
