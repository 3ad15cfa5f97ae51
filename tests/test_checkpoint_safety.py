"""Checkpoints are data and all-or-nothing: planted pickles never run, damage is found by the manifest and
--resume falls back past it, pruning and replacing never leave a half-written directory under a final name,
a full disk is one line, and a resumed run ends with exactly the uninterrupted run's adapter."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support import tiny_recipe
from finetune.recipe import recipe_from_dict
from finetune.train import checkpoint as ckpt
from finetune.train.loop import train
from finetune.train.rundir import select_checkpoint
from finetune.train.state_io import (StateFormatError, load_json_tree, load_tree, save_json_tree, save_tree,
                                     weights_only_load)
from quant.errors import UserError

FAST = {"base": {"quantization": "none"}, "lora": {"dropout": 0.1}}  # dropout: the RNG state matters
TRAIN = {"max_steps": 4, "save_every": 2, "save_total_limit": 3, "lr_scheduler": "cosine", "warmup_steps": 1}


def _recipe(model_dir, chat_files, out: Path, **train_kw):
    return recipe_from_dict(tiny_recipe(model_dir, chat_files[0], None, out, train={**TRAIN, **train_kw}, **FAST))


def _adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _assert_same_adapter(a: Path, b: Path) -> None:
    x, y = _adapter(a), _adapter(b)
    assert x.keys() == y.keys()
    assert max(float((x[k] - y[k]).abs().max()) for k in x) == 0.0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, chat_files) -> Path:
    """A finished 4-step run with checkpoint-2 and checkpoint-4."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(_recipe(tiny_model_dir, chat_files, out), echo=lambda *a: None)
    return out


@pytest.fixture
def interrupted(tmp_path, reference) -> Path:
    """The reference run as if killed after its last checkpoint: no adapter yet."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "adapter")
    return run


class Payload:
    """Unpickling this creates a directory: the proof that a load ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _plant(file: Path, marker: Path) -> None:
    """Replace `file` by a malicious pickle and re-hash the manifest, as an attacker handing over a run would."""
    file.write_bytes(pickle.dumps({"state": Payload(marker)}))
    root = file.parent.parent if file.parent.name == "adapter" else file.parent
    (root / ckpt.MANIFEST).unlink()
    ckpt.write_manifest(root, int(root.name.split("-")[1]))


# ---------------------------------------------------------------------------------------------- data, not code


def test_optimizer_scheduler_and_rng_state_round_trip_exactly(tmp_path):
    import bitsandbytes as bnb

    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    for opt in (torch.optim.AdamW(params, lr=1e-2), bnb.optim.AdamW8bit(params, lr=1e-2, min_8bit_size=1)):
        for _ in range(2):
            sum((p ** 2).sum() for p in params).backward()
            opt.step()
        save_tree(opt.state_dict(), tmp_path / "opt.safetensors")
        loaded = load_tree(tmp_path / "opt.safetensors")
        assert _same(loaded, opt.state_dict())  # int parameter keys, tuples and bnb's nested quant state too
        opt.load_state_dict(loaded)
    adam = torch.optim.AdamW(params)
    sched = torch.optim.lr_scheduler.LambdaLR(adam, lambda s: 0.5 ** s)
    adam.step()
    sched.step()
    save_json_tree(sched.state_dict(), tmp_path / "s.json")
    assert load_json_tree(tmp_path / "s.json") == sched.state_dict()
    state = ckpt.rng_state()
    save_tree(state, tmp_path / "rng.safetensors")
    expected = torch.rand(3)
    torch.manual_seed(123)
    ckpt.set_rng_state(load_tree(tmp_path / "rng.safetensors"))
    assert torch.equal(torch.rand(3), expected)


def _same(a, b) -> bool:
    if torch.is_tensor(b):
        return torch.is_tensor(a) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(b, dict):
        return isinstance(a, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in b)
    if isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("name", ["optimizer.safetensors", "rng.safetensors", "scheduler.json", "trainer_state.json",
                                  "recipe.yaml", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"])
def test_a_planted_pickle_is_never_unpickled(interrupted, tmp_path, name):
    marker = tmp_path / "CODE-RAN"
    file = interrupted / "checkpoint-4" / name
    _plant(file, marker)
    readers = {".safetensors": load_tree, ".json": load_json_tree}
    if name in ("optimizer.safetensors", "rng.safetensors", "scheduler.json"):
        with pytest.raises(StateFormatError):  # each reader alone refuses it, whatever the manifest says
            readers[file.suffix](file)
    with pytest.raises(StateFormatError):
        weights_only_load(file)  # DeepSpeed's own files are read through this
    said = []
    assert select_checkpoint(interrupted, said.append) == interrupted / "checkpoint-2"
    assert said and said[0].startswith(f"warning: --resume: checkpoint-4 is not usable ({name} ")
    assert not marker.exists()


def test_resume_past_a_planted_pickle_ends_with_the_uninterrupted_adapter(interrupted, reference, tmp_path):
    marker = tmp_path / "CODE-RAN"
    _plant(interrupted / "checkpoint-4" / "optimizer.safetensors", marker)
    (interrupted / "metrics.jsonl").open("a").write('{"step": 5, "lo')  # and a torn last metrics line
    said = []
    train(recipe_from_dict(_recipe_dict(interrupted)), resume=True, echo=said.append)
    assert not marker.exists()
    assert any(s.startswith("warning: --resume: checkpoint-4 is not usable") for s in said), said
    assert f"resumed from {interrupted / 'checkpoint-2'}" in " ".join(said)
    assert (interrupted / "checkpoint-4.invalid").is_dir()
    assert ckpt.checkpoint_problem(interrupted / "checkpoint-4") is None  # written anew
    _assert_same_adapter(interrupted, reference)
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_checkpoint_of_the_old_pickle_format_is_refused_in_one_line(interrupted, tmp_path):
    marker = tmp_path / "CODE-RAN"
    old = interrupted / "checkpoint-4"
    for name in ("optimizer.safetensors", "rng.safetensors", "scheduler.json", ckpt.MANIFEST):
        (old / name).unlink()
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        (old / name).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UserError, match=r"checkpoint-4 is in the pickle format of an earlier version, which "
                                        r"--resume does not load \(unpickling a file can run code\)"):
        select_checkpoint(interrupted, print)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- damage


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, expected", [
    (lambda c: (c / "scheduler.json").unlink(), "scheduler.json is missing"),
    (lambda c: (c / "optimizer.safetensors").write_bytes(b"x"), "optimizer.safetensors is 1 bytes, the manifest says"),
    (lambda c: _flip(c / "adapter" / "adapter_model.safetensors"),
     "adapter/adapter_model.safetensors does not match its sha256 in the manifest"),
    (lambda c: (c / ckpt.MANIFEST).unlink(), "no manifest.json (the write never finished)"),
    (lambda c: (c / ckpt.MANIFEST).write_text('{"format": "finetune-checkpoint/2", "st'), "manifest.json is unreadable"),
    (lambda c: (c / "trainer_state.json").write_text('{"step": 4, "ep'), "trainer_state.json is"),
])
def test_the_manifest_names_what_is_wrong(interrupted, damage, expected):
    damage(interrupted / "checkpoint-4")
    assert expected in ckpt.checkpoint_problem(interrupted / "checkpoint-4")
    assert ckpt.checkpoint_problem(interrupted / "checkpoint-2") is None


def test_a_bit_flip_is_named_in_one_warning_line(interrupted):
    _flip(interrupted / "checkpoint-4" / "adapter" / "adapter_model.safetensors")
    said = []
    assert select_checkpoint(interrupted, said.append) == interrupted / "checkpoint-2"
    assert said == ["warning: --resume: checkpoint-4 is not usable (adapter/adapter_model.safetensors does not "
                    "match its sha256 in the manifest (changed after it was written)); moved it to "
                    "checkpoint-4.invalid and fell back to the previous checkpoint"]


def _recipe_dict(run: Path) -> dict:
    """The run's own recipe, pointed at `run` (a copy of the reference run)."""
    import yaml

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["output"]["dir"] = str(run)
    return recipe


# ---------------------------------------------------------------------------------------------- kill points


def test_pruning_never_leaves_a_half_deleted_checkpoint_under_its_name(interrupted, monkeypatch):
    real = shutil.rmtree

    def killed_midway(path, *a, **k):  # delete one file, then die
        next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_checkpoints(interrupted, keep=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real)
    assert [p.name for p in ckpt.list_checkpoints(interrupted)] == ["checkpoint-4"]
    assert [p.name for p in interrupted.iterdir() if p.name.startswith(".trash-checkpoint-2-")]
    assert all(name.startswith(".trash-") for name in ckpt.remove_stale(interrupted))
    assert not [p for p in interrupted.iterdir() if p.name.startswith(".trash-")]


def test_a_finished_checkpoint_is_never_written_again(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (run / "checkpoint-4").rglob("*")}
    train(recipe_from_dict(_recipe_dict(run)), resume=True, echo=lambda *a: None)  # resumes at the last step
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (run / "checkpoint-4").rglob("*")}
    assert after == before
    _assert_same_adapter(run, reference)


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_a_directory_keeps_a_complete_one_at_its_name(tmp_path, monkeypatch, exchange):
    final, new = tmp_path / "adapter", tmp_path / ".tmp-adapter-1"
    final.mkdir()
    (final / "w").write_text("old")
    new.mkdir()
    (new / "w").write_text("new")
    if not exchange:
        monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    ckpt.replace_dir(new, final)
    assert (final / "w").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_full_disk_is_one_line_and_the_run_resumes_after(tmp_path, interrupted, reference, monkeypatch, capsys):
    import yaml

    from finetune.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**_recipe_dict(interrupted), "output": {"dir": str(tmp_path / "full")}}))
    real, calls = ckpt.save_tree, {"n": 0}

    def fills_up(obj, path):
        calls["n"] += 1
        if calls["n"] == 3:  # checkpoint-2's first file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, path)

    monkeypatch.setattr(ckpt, "save_tree", fills_up)
    assert main(["sft", str(recipe), "--set", "train.save_every=1", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: no space left writing {tmp_path / 'full' / 'checkpoint-2'}; ") and \
        " MiB free, about " in err and err.endswith(" MiB needed (free some space, then --resume)"), err
    full = tmp_path / "full"
    assert [p.name for p in ckpt.list_checkpoints(full)] == ["checkpoint-1"]
    assert ckpt.checkpoint_problem(full / "checkpoint-1") is None
    assert not [p for p in full.iterdir() if p.name.startswith(".tmp-checkpoint")]
    monkeypatch.setattr(ckpt, "save_tree", real)
    assert main(["sft", str(recipe), "--set", "train.save_every=1", "--resume", "-q"]) == 0
    _assert_same_adapter(full, reference)
