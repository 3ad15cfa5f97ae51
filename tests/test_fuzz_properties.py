"""Property-based fuzzing (hypothesis) of what users hand us: recipes, data rows, and files read as data (GGUF
headers, model configs, adapter configs, chat templates, YAML aliases, metrics.jsonl).

Whatever the input, the outcome is either a valid object or one line naming the problem (RecipeError /
UserError): never another exception, never a non-finite or out-of-range value in a Recipe, never a NaN or
an unencodable string trained as text. scripts/robustness/fuzz_inputs.py runs the same idea end to end on the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import tiny_recipe
from finetune.data import build_datasets
from finetune.recipe import DataConfig, Recipe, RecipeError, load_recipe, recipe_from_dict
from quant.errors import UserError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70) | st.floats()
           | st.text(max_size=12) | st.sampled_from(["1e400", "2e-4", ".inf", "all-linear", "(", "", "~", "\0"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _section(tp):
    """The section class of a field's type (also an Optional section, as `preference`), else None."""
    return next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), None)


def _dotted_keys(cls=Recipe, prefix="") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        keys.append(prefix + f.name)
        if _section(tp):
            keys += _dotted_keys(_section(tp), f"{prefix}{f.name}.")
    return keys


keys = st.sampled_from(_dotted_keys()) | st.lists(st.text(max_size=6), min_size=1, max_size=3).map(".".join)


def _apply(recipe: dict, key: str, value) -> None:
    node, parts = recipe, key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _check_valid(obj, where="") -> None:
    """Every float finite, every ranged value in its range, throughout the built Recipe."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_valid(value, f"{where}{f.name}.")
            continue
        for item in value if isinstance(value, list) else [value]:
            assert not (isinstance(item, float) and not math.isfinite(item)), (where + f.name, item)
            assert not (isinstance(item, str) and "\0" in item), (where + f.name, item)
        lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
        if value is not None and lo is not None:
            assert value > lo if f.metadata.get("lo_open") else value >= lo, (where + f.name, value)
        if value is not None and hi is not None:
            assert value <= hi, (where + f.name, value)


@pytest.fixture(scope="module")
def base_recipe(tiny_model_dir, chat_files) -> dict:
    return tiny_recipe(tiny_model_dir, *chat_files, "runs/fuzz")


@SETTINGS
@given(mutations=st.lists(st.tuples(keys, values), max_size=4))
def test_any_recipe_dict_builds_a_valid_recipe_or_one_line(base_recipe, mutations):
    recipe = json.loads(json.dumps(base_recipe))
    for key, value in mutations:
        _apply(recipe, key, value)
    try:
        built = recipe_from_dict(recipe, "r.yaml")
    except RecipeError as e:
        assert str(e).startswith("r.yaml: ") and "\n" not in str(e)
        return
    _check_valid(built)
    if built.preference is not None:  # a section that built is one its objective can train with
        assert built.preference.validate() == built.preference


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@SETTINGS
@given(text=st.text(max_size=200) | st.binary(max_size=200))
def test_any_recipe_file_loads_or_is_one_line(scratch, text):
    with tempfile.NamedTemporaryFile(dir=scratch, suffix=".yaml", delete=False) as f:
        f.write(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        _check_valid(load_recipe(f.name))
    except RecipeError as e:
        assert "\n" not in str(e)
    finally:
        Path(f.name).unlink()


# ---------------------------------------------------------------------------------------------- data rows

texts = st.text(alphabet=st.characters(codec=None, categories=None), max_size=30)  # lone surrogates included
contents = texts | st.floats() | st.integers() | st.none() | st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts | st.floats()}), max_size=2)
turns = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "gpt", "tool", ""]),
                               "content": contents})
rows = st.lists(st.fixed_dictionaries({"messages": st.lists(turns, min_size=1, max_size=4)}), min_size=1, max_size=8)


def _clean_text(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
    if isinstance(value, list):
        return all(_clean_text(p.get("text")) for p in value)
    return True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=rows)
def test_any_chat_rows_train_only_clean_text_or_are_one_line(scratch, tokenizer, data):
    with tempfile.NamedTemporaryFile("w", dir=scratch, suffix=".jsonl", delete=False, encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in data))  # NaN literals and \\ud800 escapes, as dumps write them
    try:
        bundle = build_datasets(DataConfig(train=f.name, max_length=64, packing=False), tokenizer, seed=0)
    except UserError as e:
        assert "\n" not in str(e)
        return
    finally:
        Path(f.name).unlink()
    for example in bundle.train:  # every turn a trained row kept held only finite numbers and encodable strings
        kept = [t for t in data[example["row"]]["messages"] if t["role"] in ("user", "assistant", "system", "gpt")]
        assert all(_clean_text(t["content"]) for t in kept), data[example["row"]]


# ---------------------------------------------------------------------------------------------- files read as data
# (#23: scripts/robustness/fuzz_files.py runs the same surfaces end to end on the CLIs)

one_line = lambda e: "\n" not in str(e)  # noqa: E731


@pytest.fixture(scope="module")
def gguf_header(tmp_path_factory) -> bytes:
    from scripts.robustness.fuzz_files import tiny_gguf

    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf")


@SETTINGS
@given(cut=st.integers(0, 400), edits=st.lists(st.tuples(st.integers(0, 399), st.binary(min_size=1, max_size=8)),
                                                 max_size=4))
def test_any_damaged_gguf_header_is_one_line(scratch, gguf_header, cut, edits):
    from quant.model_checks import check_gguf

    data = bytearray(gguf_header)
    for at, raw in edits:  # counts, lengths, types and offsets all live in the first few hundred bytes
        data[at:at + len(raw)] = raw
    data = bytes(data[: len(data) - cut])
    path = scratch / "h.gguf"
    path.write_bytes(data)
    try:
        check_gguf(path)
    except UserError as e:
        assert str(e).startswith(f"{path}: not a valid GGUF file: ") and one_line(e)


sizes = st.sampled_from(["num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "head_dim",
                         "intermediate_size", "rope_theta", "rms_norm_eps", "n_layer", "text_config"])


@SETTINGS
@given(changes=st.dictionaries(sizes, values, max_size=4))
def test_any_model_config_is_valid_or_one_line(changes):
    from quant.model_checks import check_config

    config = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, **changes}
    try:
        check_config(config, "config.json")
    except UserError as e:
        assert str(e).startswith("config.json: ") and one_line(e)
        return
    for key, value in changes.items():  # what passed is what a model can have
        if key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "head_dim", "n_layer"):
            assert value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1), key


@SETTINGS
@given(changes=st.dictionaries(st.sampled_from(["r", "lora_alpha", "target_modules", "rank_pattern",
                                                "alpha_pattern", "use_rslora", "peft_type", "bias"]),
                               values, max_size=4))
def test_any_adapter_config_is_valid_or_one_line(tmp_path_factory, changes):
    from finetune.merge.adapter import _check_config

    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], **changes}
    try:
        _check_config(config, Path("adapter"))
    except UserError as e:
        assert one_line(e)
        return
    assert isinstance(config["r"], int) and 0 < config["r"] and math.isfinite(config["lora_alpha"])


fragments = st.sampled_from([
    "{% for i in range(N) %}", "{% endfor %}", "{{ 'x' * N }}", "{{ m['content'] ~ m['content'] }}",
    "{% set ns.s = ns.s ~ ns.s %}", "{% set ns.s = ns.s + ns.s %}", "{{ ns.s | length }}",
    "{{ 'y' | center(N) }}", "{{ range(N) | join('ab' * N) }}", "{{ '%0Nd' % 1 }}", "{{ '{:>N}'.format(1) }}",
    "{{ N ** N }}", "{{ (ns.s * N) | replace('x', 'yy' * N) }}", "{% for m in messages %}", "{{ loop.index }}",
    "{{ raise_exception('no') }}", "{{ 1 / 0 }}", "{% if %}", "{{ messages | tojson(indent=N) }}",
])


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.tuples(fragments, st.sampled_from([2, 64, 4096, 10**6, 10**12])), max_size=6))
def test_any_template_renders_within_its_bounds_or_is_one_line(tokenizer, monkeypatch, parts):
    import copy

    import finetune.data.template as bounded

    monkeypatch.setattr(bounded, "STEP_LIMIT", 20_000)  # the same checks, reached sooner
    monkeypatch.setattr(bounded, "BASE_CHARS", 1 << 16)
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% set ns = namespace(s='x') %}" + "".join(f.replace("N", str(n)) for f, n in parts)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]
    try:
        text = bounded.render(tok, messages, True)
    except UserError as e:
        assert one_line(e) and "the chat template of" in str(e)
        return
    assert len(text) <= 1 << 16


yaml_nodes = st.recursive(st.sampled_from(["1", "x", "*a", "*b", "[*a, *a, *a]", "{k: *a}"]),
                          lambda inner: st.lists(inner, max_size=6).map(lambda xs: "[" + ", ".join(xs) + "]"),
                          max_leaves=30)


@SETTINGS
@given(first=yaml_nodes, second=yaml_nodes, rest=st.lists(yaml_nodes, max_size=6))
def test_any_aliases_load_within_the_bound_or_are_one_line(first, second, rest):
    from finetune.recipe_checks import parse_text

    text = f"a: &a {first}\nb: &b {second}\n" + "".join(f"c{i}: &c{i} {r}\n" for i, r in enumerate(rest))
    try:
        parse_text(text, "r.yaml")
    except RecipeError as e:
        assert str(e).startswith("r.yaml: ") and one_line(e)


@SETTINGS
@given(lines=st.lists(st.text(max_size=40) | st.builds(json.dumps, values) | st.builds(
    lambda step, v: json.dumps({"step": step, "loss": v}), st.integers(-5, 10**13) | values, values), max_size=20))
def test_any_metrics_lines_read_or_skip(scratch, lines):
    from finetune.report.validate import read_metrics

    path = scratch / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    rows, skipped = read_metrics(path)
    assert all(isinstance(r["step"], int) and 0 <= r["step"] <= 10**12 for r in rows)
    assert all(isinstance(r["loss"], (int, float)) and math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert skipped <= 2 * len(lines)
