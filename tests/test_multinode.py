"""Training across machines: two separate `accelerate launch` commands on 127.0.0.1 acting as machine 0 and
machine 1 (one process each, gloo on CPU) with the shipped multi-machine config, checked against one process at
the same global batch and against one machine running 2 processes. The multi-machine configs are also read
through accelerate's own launch code, as on a cluster.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from support import single_thread, tiny_recipe
from finetune.recipe import recipe_from_dict
from finetune.train.loop import train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "accelerate"
STEPS = 4
# One global batch of 4 sequences: 2 processes x micro-batch 2, or 1 process x micro-batch 2 x accumulation 2.
ONE_PROCESS = {"micro_batch_size": 2, "gradient_accumulation": 2, "max_steps": STEPS}
TWO_PROCESSES = {"micro_batch_size": 2, "gradient_accumulation": 1, "max_steps": STEPS}


def _env() -> dict:
    """CPU/gloo; the repo first on PYTHONPATH, then what the test session set (conftest's forced-CPU directory)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "true",
            "PYTHONPATH": path}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate(config: str, *launch_args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(CONFIGS / config),
            *launch_args]


def _recipe(path: Path, model_dir, chat_files, out: Path) -> Path:
    path.write_text(yaml.safe_dump(tiny_recipe(model_dir, *chat_files, out, train=TWO_PROCESSES)))
    return path


def _adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _losses(run: Path) -> list[dict]:
    return [r for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in (r := json.loads(line))]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir, chat_files) -> Path:
    out = tmp_path_factory.mktemp("one-process") / "run"
    with single_thread():  # as each launched process runs
        train(recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, out, train=ONE_PROCESS)), echo=lambda *a: None)
    return out


def test_two_machines_train_as_one_two_process_run(tmp_path, tiny_model_dir, chat_files, one_process):
    out = tmp_path / "two-machines"
    recipe = _recipe(tmp_path / "recipe.yaml", tiny_model_dir, chat_files, out)
    port = str(_free_port())
    machines = []
    for rank in (0, 1):  # two launches, as on two hosts: each starts its own process and finds the other
        cmd = _accelerate("multinode_ddp.yaml", "--num_machines", "2", "--num_processes", "2", "--machine_rank",
                          str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                          "-m", "finetune", "sft", str(recipe))
        machines.append(subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
    logs = []
    try:
        for proc in machines:
            stdout, stderr = proc.communicate(timeout=600)
            logs.append((proc.returncode, stdout, stderr))
    finally:
        for proc in machines:
            if proc.poll() is None:
                proc.kill()
    for rc, stdout, stderr in logs:
        assert rc == 0, stderr[-4000:]

    # One run of world size 2: both machines' processes joined it, each with its own RNG state.
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert sorted(p.name for p in (out / "checkpoint-4").glob("rng*")) == ["rng-0.safetensors", "rng-1.safetensors"]
    assert "distributed: " in logs[0][1] and "2 processes" in logs[0][1]
    # One set of outputs, written by the main process (machine 0) alone: each step logged once, and
    # machine 1 printed no training log. (.lock: the run lock, .qlora-finetune.json: the run's marker,
    # finetune/train/rundir.py.)
    assert sorted(p.name for p in out.iterdir()) == [".lock", ".qlora-finetune.json", "adapter", "checkpoint-4",
                                                     "data_report.json", "metrics.jsonl", "recipe.yaml"]
    assert [r["step"] for r in _losses(out)] == [1, 2, 3, 4]
    assert "step 1/4" in logs[0][2] + logs[0][1] and "step 1/4" not in logs[1][2] + logs[1][1]

    # The same update as one process with the same global batch (accumulation 2), step by step.
    assert _max_diff(_adapter(out), _adapter(one_process)) < 1e-6
    assert [r["loss"] for r in _losses(out)] == pytest.approx([r["loss"] for r in _losses(one_process)], rel=1e-5)

    # And as one machine running both processes.
    single = tmp_path / "one-machine"
    recipe = _recipe(tmp_path / "recipe-single.yaml", tiny_model_dir, chat_files, single)
    proc = subprocess.run(_accelerate("ddp.yaml", "--main_process_port", "0", "-m", "finetune", "sft", str(recipe)),
                          env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _max_diff(_adapter(out), _adapter(single)) < 1e-6


# ----------------------------------------------------------------------------- configs, without launching


def _launch_args(config: str, *extra: str):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / config), *extra, "-m", "finetune"])
    return _validate_launch_command(args)[0]


def test_multinode_ddp_config_starts_torchrun_across_machines(monkeypatch):
    from accelerate.utils.launch import prepare_multi_gpu_env

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    args = _launch_args("multinode_ddp.yaml", "--machine_rank", "1")
    assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 16, 1)
    assert (args.main_process_ip, args.main_process_port) == ("10.0.0.1", 29500)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"
    # torchrun's view: 2 nodes of 8 processes, this one node 1, rendezvous at the main machine.
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert (args.rdzv_backend, args.rdzv_endpoint) == ("static", "10.0.0.1:29500")


def test_multinode_deepspeed_config_launches_from_the_hostfile():
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = _launch_args("multinode_zero2.yaml")
    assert args.use_deepspeed and args.num_machines == 2 and args.zero_stage == 2
    args.deepspeed_fields_from_accelerate_config = "zero_stage"
    cmd, env = prepare_deepspeed_cmd_env(args)
    hostfile = cmd[cmd.index("--hostfile") + 1]
    assert cmd[0] == "deepspeed" and Path(REPO / hostfile).is_file()
    assert cmd[cmd.index("--launcher") + 1] == "pdsh" and cmd[cmd.index("--num_gpus") + 1] == "8"
    assert cmd[cmd.index("--master_addr") + 1] == "node1"
    slots = [line.split() for line in (REPO / hostfile).read_text().splitlines() if line.strip()]
    assert sum(int(s.split("=")[1]) for _, s in slots) == args.num_processes  # hostfile slots = processes
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"
