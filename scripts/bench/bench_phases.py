"""Peak GPU memory per phase of a `finetune sft` run, and an optional profile of a few of its steps.

`PhaseMemory.installed()` wraps the run's phase functions where the phases call them (set-up, evaluation, samples,
each optimizer step, checkpoints, the adapter) so that each records torch's max_memory_allocated over its own
calls: the peak counter is reset when a phase starts and read when it ends, and the run's overall peak is kept
by folding each reading in. Both are host-side counters of the caching allocator: nothing here syncs the
device, so the timings of the run are those of the loop itself (except inside the profiled steps).
"""

from __future__ import annotations

import cProfile
import importlib
import io
import pstats
import time
from contextlib import contextmanager

import torch
from torch.autograd import DeviceType

from finetune.train.setup import Run
from scripts.bench.bench_profile import kernel_buckets

# (module, function the phases call through that module's globals, phase)
WRAPPED = [
    ("finetune.train.loop", "setup", "set-up (load, data)"),
    ("finetune.train.evaluate", "evaluate", "evaluation"),
    ("finetune.train.fit", "evaluate", "evaluation"),
    ("finetune.train.finish", "evaluate", "evaluation"),
    ("finetune.train.evaluate", "generate_samples", "samples"),
    ("finetune.train.finish", "generate_samples", "samples"),
    ("finetune.train.fit", "_step", "steps"),
    ("finetune.train.finish", "_save_adapter", "adapter"),
]
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


class PhaseMemory:
    def __init__(self, profile_steps: int = 0, profile_from: int = 1):
        self.peaks: dict[str, int] = {}
        self.run_peak = 0
        self.steps = 0
        self.profile_steps, self.profile_from = profile_steps, profile_from
        self.profile: dict | None = None
        self._prof = self._py = None

    def _enter(self) -> None:
        self.run_peak = max(self.run_peak, torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()

    def _leave(self, phase: str) -> None:
        peak = torch.cuda.max_memory_allocated()
        self.run_peak = max(self.run_peak, peak)
        self.peaks[phase] = max(self.peaks.get(phase, 0), peak)

    def _wrap(self, fn, phase: str):
        def wrapped(*args, **kwargs):
            name = phase
            if phase == "steps":
                self.steps += 1
                name = "first step" if self.steps == 1 else phase
                self._profile_edge(start=True)
            self._enter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._leave(name)
                if phase == "steps":
                    self._profile_edge(start=False)
        return wrapped

    @contextmanager
    def installed(self):
        saved = []
        for module_name, attr, phase in WRAPPED:
            module = importlib.import_module(module_name)
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, self._wrap(getattr(module, attr), phase))
        saved.append((Run, "save_checkpoint", Run.save_checkpoint))
        Run.save_checkpoint = self._wrap(Run.save_checkpoint, "checkpoint")
        try:
            yield self
        finally:
            for owner, attr, original in reversed(saved):
                setattr(owner, attr, original)

    def peaks_gib(self) -> dict[str, float]:
        return {k: v / 2**30 for k, v in self.peaks.items()}

    def run_peak_gib(self) -> float:
        return max(self.run_peak, torch.cuda.max_memory_allocated()) / 2**30

    # ---- the profiled steps

    def _profile_edge(self, start: bool) -> None:
        """torch.profiler over steps [from, from + n), then cProfile (the Python side) over the next n steps."""
        if not self.profile_steps:
            return
        first, n = self.profile_from, self.profile_steps
        if start and self.steps == first:
            torch.cuda.synchronize()
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self._prof = torch.profiler.profile(activities=acts, record_shapes=True)
            self._prof.__enter__()
            self._t0 = time.perf_counter()
        elif not start and self.steps == first + n - 1 and self._prof is not None:
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - self._t0) * 1e3
            self._prof.__exit__(None, None, None)
            self.profile = summarise(self._prof, n, wall_ms)
            self._prof = None
        elif start and self.steps == first + n:
            self._py = cProfile.Profile()
            self._py.enable()
        elif not start and self.steps == first + 2 * n - 1 and self._py is not None:
            self._py.disable()
            text = io.StringIO()
            pstats.Stats(self._py, stream=text).sort_stats("tottime").print_stats(25)
            self.profile["python"] = text.getvalue()[-6000:]
            self._py = None

    def profiled(self, step: int) -> bool:
        """Whether `step` ran under one of the profilers (its time is not the loop's)."""
        return bool(self.profile_steps) and self.profile_from <= step < self.profile_from + 2 * self.profile_steps


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summarise(prof, steps: int, wall_ms: float, top: int = 12) -> dict:
    """Per step: wall and GPU-busy time, kernels launched, host syncs and memcpys, the costliest CPU ops."""
    kernels, syncs, copies = [], 0, 0
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            kernels.append((e.time_range.start, e.time_range.end))
        elif e.name in SYNC_CALLS:
            syncs += 1
        elif e.name.startswith("cudaMemcpy"):
            copies += 1
    busy_ms = _busy_us(kernels) / 1e3
    ops = sorted((a for a in prof.key_averages() if a.key.startswith("aten::") or "Backward" in a.key
                  or a.key.startswith("autograd")), key=lambda a: -a.self_cpu_time_total)[:top]
    return {"step_ms": wall_ms / steps, "gpu_busy_ms": busy_ms / steps, "idle_ms": (wall_ms - busy_ms) / steps,
            "kernels": len(kernels) / steps, "syncs": syncs / steps, "memcpys": copies / steps,
            "buckets_ms": {k: v / 1e3 / steps for k, v in kernel_buckets(prof, rank=16, vocab=None).items()},
            "top_cpu": [(a.key, a.self_cpu_time_total / 1e3 / steps, a.count / steps) for a in ops]}


def profile_text(p: dict) -> str:
    lines = [f"per step: wall {p['step_ms']:.1f} ms, GPU busy {p['gpu_busy_ms']:.1f} ms, idle {p['idle_ms']:.1f} ms; "
             f"{p['kernels']:.0f} kernels, {p['syncs']:.1f} host syncs, {p['memcpys']:.1f} memcpys",
             "GPU ms by bucket: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                               sorted(p["buckets_ms"].items(), key=lambda kv: -kv[1])),
             "CPU ops by self time (ms per step, calls per step):"]
    lines += [f"  {name}: {ms:.2f} ms, {n:.0f} calls" for name, ms, n in p["top_cpu"]]
    if "python" in p:
        lines += ["Python functions by own time (cProfile, the next steps):", p["python"]]
    return "\n".join(lines)
