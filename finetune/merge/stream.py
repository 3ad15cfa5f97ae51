"""Walk the base one unit (decoder layer) at a time: read it, add the LoRA deltas, hand it to an encoder and
the shard writer, forget it. Also: the adapter/base compatibility check done before any work, and the
peak-memory probe the merge reports.
"""

from __future__ import annotations

import resource
import threading
import time
from typing import Callable

import torch

from finetune.merge.adapter import LoraFactors
from finetune.merge.experts import ExpertFactors
from finetune.merge.source import Unit
from quant.errors import UserError
from quant.formats.base import Rebuilder


def check_adapter_fits(loras: dict[str, LoraFactors | ExpertFactors], base: Rebuilder, n_layers: int,
                       model=None) -> None:
    """Every adapted module exists in the base with the weight shape the LoRA factors imply (a fused expert
    parameter with the shape of the model's (`model`, the skeleton) own)."""
    missing, wrong = [], []
    params = dict(model.named_parameters()) if model is not None else {}
    for module, f in sorted(loras.items()):
        if isinstance(f, ExpertFactors):
            shape = tuple(params[module].shape) if module in params else None
            if shape is None:
                missing.append(module)
            elif shape != f.shape:
                wrong.append(f"{module} (adapter {'x'.join(map(str, f.shape))}, base {'x'.join(map(str, shape))})")
            continue
        shape = base.weight_shape(module)
        if shape is None:
            missing.append(module)
        elif tuple(shape) != f.shape:
            wrong.append(f"{module} (adapter {f.shape[0]}x{f.shape[1]}, base {shape[0]}x{shape[1]})")
    if missing:
        raise UserError(f"adapter/base mismatch: the base {base.ckpt.path} ({n_layers} layers) has no Linear weight "
                        f"for {len(missing)} adapted modules, e.g. {sorted(missing)[:2]}; is --base the model the "
                        "adapter was trained on?")
    if wrong:
        raise UserError(f"adapter/base mismatch: weight shapes (out x in) differ for {len(wrong)} modules, e.g. "
                        f"{wrong[0]}; is --base the model the adapter was trained on?")


@torch.no_grad()
def merge_unit(tensors: dict[str, torch.Tensor], loras: dict[str, LoraFactors], device=None) -> list[str]:
    """Add scale·B@A (fp32) to each adapted weight of the unit in place; returns the merged module names."""
    merged = []
    for key in list(tensors):
        module, _, leaf = key.rpartition(".")
        target = module if leaf == "weight" and isinstance(loras.get(module), LoraFactors) else \
            key if isinstance(loras.get(key), ExpertFactors) else None
        if target is not None:
            W = tensors[key].to(device=device, dtype=torch.float32)
            tensors[key] = W.add_(loras[target].delta(W.device))
            merged.append(target)
    return merged


def stream_units(base: Rebuilder, units: list[Unit], loras: dict[str, LoraFactors],
                 encode: Callable[[int | None, dict], dict], write: Callable[[dict], None],
                 progress: Callable[[Unit], None] | None = None) -> int:
    """For each unit: base weights (rebuilt as trained) + LoRA -> encoder -> writer. Returns modules merged."""
    done = 0
    for unit in units:
        tensors = base.load(unit.keys)
        done += len(merge_unit(tensors, loras, base.device))
        write(encode(unit.index, tensors))
        del tensors
        if progress is not None:
            progress(unit)
    if done != len(loras):
        raise RuntimeError(f"merged {done} of {len(loras)} adapted modules")  # check_adapter_fits should prevent
    return done


def _memory() -> dict[str, int] | None:
    """Resident bytes of this process: total, and anonymous (heap, tensors). The safetensors inputs are
    memory-mapped, so pages read from them count as file-backed RSS until the kernel reclaims them; the
    anonymous part is the memory the merge actually needs."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "RssAnon")))
        return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "anon": int(fields["RssAnon"].split()[0]) * 1024}
    except (OSError, KeyError, ValueError):
        return None


class PeakMemory:
    """Peak resident memory (total and anonymous, sampled every 20 ms from /proc) and peak CUDA allocation."""

    def __init__(self, device: torch.device):
        self.device = device
        now = _memory() or {"rss": 0, "anon": 0}
        self.start, self.peak = dict(now), dict(now)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak_gpu = None

    def _sample(self):
        while not self._stop.is_set():
            now = _memory()
            if now is not None:
                self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}
            time.sleep(0.02)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if _memory() is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        else:  # no /proc: the process-lifetime high-water mark is all there is
            self.peak["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.device.type == "cuda":
            self.peak_gpu = torch.cuda.max_memory_allocated(self.device)
        return False

    @property
    def peak_rss(self) -> int:
        return self.peak["rss"]

    def as_dict(self) -> dict:
        mb = 2**20
        return {"rss_start_mb": round(self.start["rss"] / mb, 1), "peak_rss_mb": round(self.peak["rss"] / mb, 1),
                "anon_start_mb": round(self.start["anon"] / mb, 1), "peak_anon_mb": round(self.peak["anon"] / mb, 1),
                "peak_anon_increase_mb": round((self.peak["anon"] - self.start["anon"]) / mb, 1),
                "peak_gpu_mb": round(self.peak_gpu / mb, 1) if self.peak_gpu is not None else None}
