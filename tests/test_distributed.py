"""Multi-process training through `accelerate launch`, on CPU with gloo, checked against one process.

Every launch really starts two processes: the runs record `world_size` in their checkpoints and the tests
read it back (`accelerate launch --cpu` would silently run one). The shipped configs in
recipes/accelerate/ are what the launches use. DeepSpeed runs need the optional extra and are skipped
without it; the DeepSpeed and FSDP configs are validated through accelerate's own launch code either way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from support import tiny_recipe
from finetune.recipe import TrainConfig, recipe_from_dict
from finetune.train.loop import train
from finetune.train.strategy.deepspeed import fill_deepspeed_config
from quant.errors import UserError
from quant.formats.base import BaseSpec, ShardingSetup
from quant.formats.registry import sharding_problem

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "accelerate"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="DeepSpeed is an optional extra (pip install '.[deepspeed]'); configs validated anyway")

# One global batch of 4 sequences: 2 processes x micro-batch 2, or 1 process x micro-batch 2 x accumulation 2.
STEPS, MORE_STEPS = 4, 6
ONE_PROCESS = {"micro_batch_size": 2, "gradient_accumulation": 2}
TWO_PROCESSES = {"micro_batch_size": 2, "gradient_accumulation": 1}


def _pythonpath() -> str:
    """The repo first, then what the test session set (conftest's forced-CPU-capability directory)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def _write_recipe(path: Path, model_dir, chat_files, out_dir, **sections) -> Path:
    path.write_text(yaml.safe_dump(tiny_recipe(model_dir, *chat_files, out_dir, **sections)))
    return path


def _launch(config: str, recipe: Path, *args: str, console_script: bool = False,
            command: str = "sft") -> subprocess.CompletedProcess:
    """`accelerate launch --config_file recipes/accelerate/<config>.yaml -m finetune <command> RECIPE ...`."""
    bindir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": _pythonpath()}
    if config == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"  # the shipped config says MULTI_GPU; this box has gloo on CPU
    else:
        env.pop("ACCELERATE_USE_CPU", None)  # it would switch DeepSpeed off
    target = [str(bindir / "finetune")] if console_script else ["-m", "finetune"]
    cmd = [str(bindir / "accelerate"), "launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
           "--main_process_port", "0", *target, command, str(recipe), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=recipe.parent)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


def _adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _loss_rows(out_dir: Path) -> list[dict]:
    return [r for line in (out_dir / "metrics.jsonl").read_text().splitlines() if "loss" in (r := json.loads(line))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, chat_files):
    """One process, the same global batch through accumulation; checkpoint-4 is the state after 4 steps."""
    out = tmp_path_factory.mktemp("one-process") / "run"
    recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, out, train={
        **ONE_PROCESS, "max_steps": MORE_STEPS, "save_every": STEPS, "save_total_limit": 5}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process runs; on a busy 2-core box 2 threads are much slower
    try:
        train(recipe, echo=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return out


def test_ddp_two_processes_match_one_process_and_resume(tmp_path, tiny_model_dir, chat_files, reference):
    recipe = _write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, chat_files, tmp_path / "run",
                           train={**TWO_PROCESSES, "max_steps": STEPS})
    _ok(_launch("ddp", recipe))
    out = tmp_path / "run"
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))  # .lock: the run lock
    assert visible == ["adapter", "checkpoint-4", "data_report.json", "metrics.jsonl", "recipe.yaml"]
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (out / "checkpoint-4").glob("rng*")) == ["rng-0.safetensors", "rng-1.safetensors"]
    assert [r["step"] for r in _loss_rows(out)] == [1, 2, 3, 4]  # the main process alone writes metrics
    diff = _max_diff(_adapter(out / "adapter"), _adapter(reference / "checkpoint-4" / "adapter"))
    assert diff < 1e-6, diff

    # Continue the same run to step 6 (console-script form of the command): it resumes at step 4 and ends
    # where the one-process run ended.
    proc = _launch("ddp", recipe, "--resume", "--set", f"train.max_steps={MORE_STEPS}", console_script=True)
    _ok(proc)
    assert "resumed from" in proc.stdout + proc.stderr
    diff = _max_diff(_adapter(out / "adapter"), _adapter(reference / "adapter"))
    assert diff < 1e-6, diff
    rows = _loss_rows(out)
    assert [r["step"] for r in rows] == list(range(1, MORE_STEPS + 1))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in _loss_rows(reference)], rel=1e-5)

    # Sharded state (per-rank RNG here; ZeRO partitions elsewhere) resumes only into the same world size.
    one = recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, out, train={**ONE_PROCESS, "max_steps": 8}))
    with pytest.raises(UserError, match="checkpoint-6 was written by 2 processes; resume it with the same number "
                                        r"\(this run has 1\)"):
        train(one, resume=True, echo=lambda *a: None)


def test_ddp_with_bf16_autocast_matches_one_process(tmp_path, tiny_model_dir, chat_files):
    """bf16 compute runs the forward under autocast (train.autocast, the GPU default); across processes too."""
    bf16 = {"base": {"compute_dtype": "bfloat16"}}
    one = recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, tmp_path / "one", **bf16,
                                       train={**ONE_PROCESS, "max_steps": 2}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(one, echo=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    recipe = _write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, chat_files, tmp_path / "two", **bf16,
                           train={**TWO_PROCESSES, "max_steps": 2})
    _ok(_launch("ddp", recipe))
    assert _max_diff(_adapter(tmp_path / "two" / "adapter"), _adapter(tmp_path / "one" / "adapter")) < 1e-6
    losses = [[r["loss"] for r in _loss_rows(tmp_path / d)] for d in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@needs_deepspeed
@pytest.mark.parametrize("config,storage", [("zero2", "uint8"), ("zero3", "auto")])
def test_deepspeed_two_processes_match_one_process(tmp_path, tiny_model_dir, chat_files, reference, config, storage):
    """NF4 base; ZeRO-3 partitions it, which needs the 4-bit weights stored in a float dtype (quant_storage auto)."""
    recipe = _write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, chat_files, tmp_path / "run",
                           base={"quant_storage": storage}, train={**TWO_PROCESSES, "max_steps": STEPS})
    proc = _launch(config, recipe)
    _ok(proc)
    assert f"DeepSpeed ZeRO-{config[-1]}, 2 processes" in proc.stdout
    out = tmp_path / "run"
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["world_size"] == 2
    shards = sorted(p.name for p in (out / "checkpoint-4" / "deepspeed" / "state").glob("*optim_states.pt"))
    assert len(shards) == 2, shards  # one optimizer partition per rank
    # ZeRO-3 reduce-scatters in another order than one process sums: float rounding only.
    diff = _max_diff(_adapter(out / "adapter"), _adapter(reference / "checkpoint-4" / "adapter"))
    assert diff < 1e-5, diff
    if config == "zero3":
        _ok(_launch(config, recipe, "--resume", "--set", f"train.max_steps={MORE_STEPS}"))
        diff = _max_diff(_adapter(out / "adapter"), _adapter(reference / "adapter"))
        assert diff < 1e-5, diff
        assert [r["step"] for r in _loss_rows(out)] == list(range(1, MORE_STEPS + 1))


@needs_deepspeed
def test_unshardable_base_is_refused_at_start_up(tmp_path, tiny_model_dir, chat_files):
    recipe = _write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, chat_files, tmp_path / "run",
                           base={"quantization": "int8"})
    proc = _launch("zero3", recipe)
    assert proc.returncode != 0
    assert ("error: accelerate distributed_type DEEPSPEED (ZeRO-3) cannot shard bitsandbytes int8 weights"
            in proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_fsdp_config_on_cpu_is_refused_instead_of_running_unsharded(tmp_path, tiny_model_dir, chat_files):
    recipe = _write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, chat_files, tmp_path / "run")
    proc = _launch("fsdp", recipe)
    assert proc.returncode != 0
    assert "the accelerate config asks for FSDP but accelerate set up MULTI_CPU" in proc.stderr, proc.stderr[-3000:]


def test_fsdp2_paths_on_cpu_train_gather_and_resume_exactly(tmp_path, tiny_model_dir):
    """The FSDP strategy's FSDP2 step, adapter gathering and checkpoint round trip over real FSDP2 + gloo (the model is
    sharded as accelerate's FSDP2 prepare does, since accelerate itself shards only on GPUs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "dist_helpers.py"), str(tiny_model_dir), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["sharded_weight"] == "DTensor"  # the 4-bit base is sharded
    assert result["train_diff"] < 1e-6  # 3 steps sharded == 3 steps on one process
    assert result["norms"] == pytest.approx(result["plain_norms"], rel=1e-5)
    assert result["load_diff"] == 0.0 and result["optim_diff"] == 0.0 and result["step"] == 3
    assert result["files"] == ["adapter", "manifest.json", "optimizer.safetensors", "rng-0.safetensors",
                               "rng-1.safetensors", "scheduler.json", "trainer_state.json"]


# ----------------------------------------------------------------------------- configs, without launching


def _accelerate_view(name: str, monkeypatch):
    """The plugin accelerate builds in each process from `accelerate launch --config_file <name>.yaml`: the
    launcher's own argument validation and environment, then the plugin read from that environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "-m", "finetune"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before starting the DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    plugin = None
    if args.use_deepspeed:
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
    elif args.use_fsdp:
        plugin = FullyShardedDataParallelPlugin()
    return args, env, plugin


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3", "fsdp"])
def test_shipped_config_is_what_accelerate_would_run(name, monkeypatch, tiny_model_dir):
    args, env, plugin = _accelerate_view(name, monkeypatch)
    assert args.num_processes == 2 and args.num_machines == 1
    # Precision is the recipe's base.compute_dtype; DeepSpeed/FSDP must not cast the (float-stored) 4-bit base.
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"
    if name == "ddp":
        assert args.multi_gpu and not (args.use_deepspeed or args.use_fsdp)
    elif name.startswith("zero"):
        ds = plugin.deepspeed_config
        assert args.use_deepspeed and plugin.zero_stage == int(name[-1]) == ds["zero_optimization"]["stage"]
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
        assert ds["zero_optimization"]["offload_param"]["device"] == "none"
        assert plugin.zero3_init_flag == (name == "zero3")
        assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
        assert "optimizer" not in ds and "scheduler" not in ds  # ours are used: the recipe's optimizer and LR
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert ds[key] == "auto", key  # the recipe decides
        fill_deepspeed_config(ds, TrainConfig(micro_batch_size=2, gradient_accumulation=3, max_grad_norm=0.5), 2)
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
                ds["gradient_clipping"]) == (2, 3, 12, 0.5)
    else:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        assert args.use_fsdp and plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert not plugin.activation_checkpointing  # the recipe's gradient checkpointing does it
        assert plugin.mixed_precision_policy is None
        # One FSDP unit per decoder layer, found from the model itself (_no_split_modules), LoRA included.
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=4, target_modules="all-linear"))
        plugin.set_auto_wrap_policy(model)
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        wrapped = [type(m).__name__ for m in model.modules() if policy(m)]
        assert wrapped == ["LlamaDecoderLayer"] * model.config.num_hidden_layers


def test_deepspeed_config_that_contradicts_the_recipe_is_refused():
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 8}
    with pytest.raises(UserError, match=r"DeepSpeed config: gradient_accumulation_steps = 8 but the recipe gives 2 "
                                        r"\(train.gradient_accumulation\)"):
        fill_deepspeed_config(config, TrainConfig(gradient_accumulation=2), 2)


# What each setup does with each base kind: None = supported, else the start of the refusal.
SUPPORT = {
    ("MULTI_GPU", 0): {"nf4": None, "nf4-auto": None, "int8": None, "gptq": None, "awq": None, "none": None},
    ("DEEPSPEED", 2): {"nf4": None, "nf4-auto": None, "int8": None, "gptq": None, "awq": None, "none": None},
    ("DEEPSPEED", 3): {"nf4": "cannot shard 4-bit weights stored as uint8", "nf4-auto": None,
                       "int8": "cannot shard bitsandbytes int8", "gptq": "shards parameters, but the GPTQ base",
                       "awq": "shards parameters, but the AWQ base", "none": None},
    ("FSDP", 0): {"nf4": "cannot shard 4-bit weights stored as uint8", "nf4-auto": None,
                  "int8": "cannot shard bitsandbytes int8", "gptq": "shards parameters, but the GPTQ base",
                  "awq": "shards parameters, but the AWQ base", "none": None},
}


def _problem(kind: str, stage: int, fsdp_version: int, mixed: str, fmt: str, storage: str = "uint8"):
    """The registry's answer for a base of format `fmt` (4-bit weights stored as `storage`) under a setup."""
    spec = BaseSpec(model="m", model_dir="m", format=fmt, compute_dtype="bfloat16",
                    settings={"double_quant": True, "quant_storage": storage})
    return sharding_problem(spec, ShardingSetup(kind, stage, fsdp_version, mixed))


@pytest.mark.parametrize("setup", list(SUPPORT))
def test_support_matrix(setup):
    kind, stage = setup
    storage = {"nf4": "uint8", "nf4-auto": "bfloat16"}
    for base, expected in SUPPORT[setup].items():
        problem = _problem(kind, stage, 2, "no", base.split("-")[0], storage.get(base, "uint8"))
        if expected is None:
            assert problem is None, (setup, base, problem)
        else:
            assert problem and expected in problem and problem.startswith(f"accelerate distributed_type {kind}"), \
                (setup, base, problem)


def test_mixed_precision_that_would_cast_the_quantized_base_is_refused():
    assert "mixed_precision bf16 casts every float parameter" in _problem("DEEPSPEED", 3, 0, "bf16", "nf4", "float32")
    assert _problem("DEEPSPEED", 3, 0, "bf16", "nf4", "bfloat16") is None  # the cast is a no-op
    assert "GPTQ scales" in _problem("DEEPSPEED", 2, 0, "fp16", "gptq")
    assert "AWQ scales" in _problem("DEEPSPEED", 2, 0, "fp16", "awq")
    assert "only FSDP2" in _problem("FSDP", 0, 1, "no", "nf4", "bfloat16")


def test_dpo_two_processes_match_one_process(tmp_path, tiny_model_dir, preference_files):
    """Pairs normalised over the global batch of both ranks; the precomputed reference split over the ranks and
    summed back: the one-process run's adapter."""
    sections = {"preference": {"objective": "dpo", "reference": "precomputed"}, "data": {"packing": False}}
    one = tiny_recipe(tiny_model_dir, *preference_files, tmp_path / "one", **sections,
                      train={**ONE_PROCESS, "max_steps": 3})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(recipe_from_dict(one), echo=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, *preference_files, tmp_path / "two", **sections,
                                                 train={**TWO_PROCESSES, "max_steps": 3})))
    _ok(_launch("ddp", recipe, command="dpo"))
    assert _max_diff(_adapter(tmp_path / "two" / "adapter"), _adapter(tmp_path / "one" / "adapter")) < 1e-5
    rows = [_loss_rows(tmp_path / d) for d in ("one", "two")]
    for key in ("loss", "rewards/margin", "rewards/accuracy"):
        assert [r[key] for r in rows[0]] == pytest.approx([r[key] for r in rows[1]], rel=1e-4, abs=1e-6), key


def test_kto_two_processes_reduce_the_kl_estimate_and_evaluate_uneven_shares(tmp_path, tiny_model_dir,
                                                                             preference_files):
    """The KL reference point is all-reduced across ranks at every training micro-batch; evaluation, whose 5
    micro-batches split 3 + 2 over the ranks, takes no such collective (it would wait forever)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(
        tiny_model_dir, *preference_files, tmp_path / "run", preference={"objective": "kto"},
        train={"micro_batch_size": 5, "gradient_accumulation": 1, "max_steps": 2, "eval_every": 1})))
    _ok(_launch("ddp", recipe, command="kto"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 1, 2]
    assert all(r["kl"] >= 0 and "rewards/accuracy" in r for r in rows if "loss" in r)
