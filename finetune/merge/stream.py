"""Walk the base one unit (decoder layer) at a time: read it, add the LoRA deltas, check every merged and encoded
tensor is finite, hand it to an encoder and the shard writer, forget it. Also: the adapter/base compatibility
check done before any work (by the merge, and before generation and evaluation), and the peak-memory probe the
merge reports.
"""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from finetune.merge.adapter import AdapterSource, LoraFactors
from finetune.merge.experts import ExpertFactors
from finetune.merge.source import Unit, block_prefix, skeleton
from quant.errors import UserError
from quant.formats.base import Rebuilder
from quant.model_checks import read_json_object


def check_adapter_fits(loras: dict[str, LoraFactors | ExpertFactors], shape_of: Callable[[str], tuple | None],
                       base: str, hint: str = "is --base the model the adapter was trained on?") -> None:
    """Every adapted module exists in the base with the weight shape the LoRA factors imply. `shape_of(module)`:
    the base's (out, in) for a Linear module, a fused expert parameter's own shape (its key: ExpertFactors), None
    when it has none; `base` names it in the message."""
    missing, wrong = [], []
    for module, f in sorted(loras.items()):
        shape = shape_of(module)
        if shape is None:
            missing.append(module)
        elif tuple(shape) != f.shape:
            wrong.append(f"{module} (adapter {'x'.join(map(str, f.shape))}, base {'x'.join(map(str, shape))})")
    if missing:
        raise UserError(f"adapter/base mismatch: the base {base} has no Linear weight for {len(missing)} adapted "
                        f"modules, e.g. {sorted(missing)[:2]}; {hint}")
    if wrong:
        raise UserError(f"adapter/base mismatch: weight shapes (out x in) differ for {len(wrong)} modules, e.g. "
                        f"{wrong[0]}; {hint}")


def expert_shapes(model: torch.nn.Module) -> dict[str, tuple]:
    """{key: shape} of a skeleton's fused (3-D) expert parameters, what expert adapters (ExpertFactors) adapt."""
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.dim() == 3}


def check_fits_model(source: AdapterSource) -> None:
    """`check_adapter_fits` against the base's config.json (a skeleton on the meta device: no weights read), for
    generation and evaluation, where peft would otherwise load a partial adapter with a warning."""
    config = read_json_object(Path(source.base.model_dir) / "config.json")
    if config is None:
        return  # not a Hugging Face directory: the format's loader says what it is
    model = skeleton(config)
    shapes = {name: (m.out_features, m.in_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)} | expert_shapes(model)
    _, n_layers = block_prefix(model)
    check_adapter_fits(source.loras, shapes.get, f"{source.base.model} ({n_layers} layers)",
                       f"is {source.adapter_dir / 'base.json'} naming the model the adapter was trained on?")


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse NaN/inf. min and max are NaN or infinite exactly when some value is, and need no tensor-sized
    temporary (isfinite's boolean copy of the 108 MiB SmolLM2 embedding raised the merge's peak by ~90 MiB)."""
    for key, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and t.numel():
            if bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
                continue
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise UserError(f"{key}: {bad} of {t.numel()} {what} values are NaN or infinite; nothing was "
                                "written (the adapter's factors are finite: is the base checkpoint damaged, or out "
                                "of the output format's range?)")


@torch.no_grad()
def merge_unit(tensors: dict[str, torch.Tensor], loras: dict[str, LoraFactors], device=None) -> list[str]:
    """Add scale·B@A (fp32) to each adapted weight of the unit in place; returns the merged module names."""
    merged = []
    for key in list(tensors):
        module, _, leaf = key.rpartition(".")
        if isinstance(loras.get(key), ExpertFactors):  # a fused expert parameter, adapted under its own name
            target = key
        elif leaf == "weight" and module in loras and not isinstance(loras[module], ExpertFactors):
            target = module  # a module's factors: LoRA, or an exact-merge adapter's (finetune.exact)
        else:
            continue
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
        _check_finite(tensors, "merged")
        encoded = encode(unit.index, tensors)
        _check_finite(encoded, "encoded")
        write(encoded)
        del tensors, encoded
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
