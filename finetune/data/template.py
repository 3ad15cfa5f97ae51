"""Chat templates rendered with a bound on time and size: a template that comes with a model is data, not code.

A tokenizer's chat template is a Jinja program from whoever published the model. transformers renders it in
Jinja's immutable sandbox, which stops it reaching Python objects, but not from looping 10^10 times (two nested
`range(100000)` loops hang training and chat) or from asking for `'x' * 10**10` (10 GB, the machine swaps or
is killed). Here the same template is compiled by a sandbox that counts and measures:

- steps: every loop iteration (each `{% for %}` iterates through a counting filter, added to the parsed
  template), call, filter, attribute or item access and operator counts one; a rendering may take
  `STEP_LIMIT` of them and `TIME_LIMIT` seconds (checked every 1024 steps), so a loop without end stops;
- size: every operation that can make a value much larger than its operands is checked before it runs:
  `*`, `+`, `**`, `%` and `~` (concatenation, also rewritten in the parsed template), the amplifying filters and
  string methods (join, replace, indent, format, wordwrap, urlize, tojson with an indent, expandtabs,
  translate, str.format's widths), any integer argument; and every result and the output are measured after.
  Nothing may exceed `limit` characters: 2^24, or 16 times the conversation's own text when that is more.
  Jinja's constant folding is off, so nothing is computed while compiling.

A template that hits a bound, or fails (raise_exception, a type error, undefined arithmetic), is one UserError
line naming the template. Renderings equal transformers' apply_chat_template (same environment options,
extension, filters and globals, taken from transformers itself; tests compare them), except that `lipsum`
(paragraphs of Latin, never in a chat template, with an unbounded loop in C-speed Python) is not offered.

Cost, measured on this 2-core box: a 1,000-turn conversation through SmolLM2's template takes 9,002 steps and
65 ms (apply_chat_template: 29 ms); tokenizing the quickstart's 600 training rows takes 0.64 s (0.58 s before).
"""

from __future__ import annotations

import functools
import json
import re
import string
import time
from contextvars import ContextVar
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from quant.errors import UserError

STEP_LIMIT = 1_000_000  # a 1,000-turn conversation through SmolLM2's template takes ~10^4 (tests measure it)
TIME_LIMIT = 10.0  # seconds per rendering; real ones take milliseconds
BASE_CHARS = 1 << 24  # the size limit of any value or output, or 16x the conversation's text when larger
MAX_TEMPLATE = 1 << 20  # characters of template source (real ones: a few KB)
MAX_INT_BITS = 1 << 16
_STEPS = "_qlora_steps"  # the counting filter every for-loop iterates through
_CONCAT = "_qlora_concat"  # what `~` becomes
_CHECK_EVERY = 1024


class TemplateLimit(Exception):
    """A bound was hit; the message says which."""


class _Budget:
    def __init__(self, limit: int, known: dict[int, int]):
        self.steps, self.limit, self.known = 0, limit, known
        self.deadline = time.monotonic() + TIME_LIMIT

    def tick(self) -> None:
        self.steps += 1
        if self.steps > STEP_LIMIT:
            raise TemplateLimit(f"more than {STEP_LIMIT:,} steps (loops or calls without end?)")
        if self.steps % _CHECK_EVERY == 0 and time.monotonic() > self.deadline:
            raise TemplateLimit(f"more than {TIME_LIMIT:g} s")

    def size(self, value, depth: int = 0) -> int:
        """Characters `value` stands for as text (containers: their items'), stopping early past the limit."""
        if isinstance(value, (str, bytes)):
            return len(value)
        if isinstance(value, bool) or value is None:
            return 5
        if isinstance(value, int):
            return value.bit_length() // 3 + 1
        if id(value) in self.known:
            return self.known[id(value)]
        if isinstance(value, dict):
            value = [*value.keys(), *value.values()]
        if isinstance(value, (list, tuple, set, frozenset)) and depth < 32:
            total = 2 + 4 * len(value)
            for item in value:
                total += self.size(item, depth + 1)
                if total > self.limit:
                    break
            return total
        return 16

    def check(self, size: int, what: str) -> None:
        if size > self.limit:
            raise TemplateLimit(f"{what} of {size:,} characters (the limit is {self.limit:,})")

    def ints(self, args, kwargs) -> None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > self.limit:
                raise TemplateLimit(f"an argument of {value:.3g}")


_BUDGET: ContextVar[_Budget | None] = ContextVar("template_budget", default=None)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:  # only render() runs these templates
        raise TemplateLimit("rendered outside a bounded rendering")
    return budget


# ------------------------------------------------------------------------------------------ size estimates

_PERCENT = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_WIDTHS = re.compile(r"\d+")


def _format_size(budget: _Budget, fmt: str, values, percent: bool) -> int:
    """An upper bound on `fmt % values` / `fmt.format(*values)`: every field may hold the largest value at
    its width; widths are checked against the limit."""
    if percent:
        fields = [(m.group(1), m.group(2)) for m in _PERCENT.finditer(fmt)]
        widths = [int(w) for f in fields for w in f if w and w.isdigit()]
        n = len(fields)
    else:
        parsed = list(string.Formatter().parse(fmt))
        widths = [int(w) for _, name, spec, _ in parsed if name is not None and spec for w in _WIDTHS.findall(spec)]
        n = sum(1 for _, name, _, _ in parsed if name is not None)
    for w in widths:
        if w > budget.limit:
            raise TemplateLimit(f"a format width of {w:,}")
    largest = max((budget.size(v) for v in values), default=0)
    return len(fmt) + n * largest + sum(widths)


def _join_size(budget: _Budget, items: list, sep) -> int:
    return sum(budget.size(i) for i in items) + max(len(items) - 1, 0) * budget.size(sep)


def _replace_size(budget: _Budget, s, old, new) -> int:
    if not isinstance(s, str) or not isinstance(old, str):
        return budget.size(s)
    count = s.count(old) if old else len(s) + 1
    return len(s) + count * max(budget.size(new) - len(old), 0)


def _lines(s) -> int:
    return s.count("\n") + 1 if isinstance(s, str) else 1


def _tojson_size(budget: _Budget, value, indent) -> int:
    compact = json.dumps(value, ensure_ascii=False)
    budget.check(len(compact), "a JSON text")
    width = len(indent) if isinstance(indent, str) else (indent or 0)
    depth = deepest = 0
    for ch in compact:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    items = compact.count(",") + compact.count("[") + compact.count("{") + 1
    return len(compact) + items * (1 + width * deepest)


# Filters whose output can be far larger than their input: (value, *args) -> an upper bound of the output.
_FILTER_SIZE = {
    "join": lambda b, value, d="", *_, **__: _join_size(b, value, d),
    "replace": lambda b, s, old="", new="", *_, **__: _replace_size(b, str(s), old, new),
    "indent": lambda b, s, width=4, *_, **__: b.size(s) + _lines(s) * (
        len(width) if isinstance(width, str) else width),
    "format": lambda b, fmt, *args, **kwargs: _format_size(b, str(fmt), [*args, *kwargs.values()], True),
    "wordwrap": lambda b, s, width=79, brk=True, wrapstring=None, *_, **__: b.size(s) * (
        1 + b.size(wrapstring or "\n")),
    "urlize": lambda b, s, *args, **kwargs: b.size(s) * (
        2 + sum(b.size(v) for v in (*args, *kwargs.values()) if isinstance(v, str))),
    "tojson": lambda b, value, indent=None, *_, **__: _tojson_size(b, value, indent),
}
# String methods likewise (called through the sandbox's `call`).
_METHOD_SIZE = {
    "join": lambda b, s, items: _join_size(b, items, s),
    "replace": lambda b, s, old, new, *_: _replace_size(b, s, old, new),
    "expandtabs": lambda b, s, tabsize=8: len(s) + s.count("\t") * tabsize,
    "translate": lambda b, s, table: len(s) * (1 + max((b.size(v) for v in getattr(table, "values", list)()),
                                                        default=0)),
    "format": lambda b, s, *args, **kwargs: _format_size(b, s, [*args, *kwargs.values()], False),
    "format_map": lambda b, s, mapping: _format_size(b, s, list(getattr(mapping, "values", list)()), False),
}


def _materialised(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Generators among the arguments as lists, so that they can be measured (they are bounded: every source
    of items is)."""
    fix = lambda v: list(v) if hasattr(v, "__next__") else v  # noqa: E731
    return tuple(fix(a) for a in args), {k: fix(v) for k, v in kwargs.items()}


def _bounded_filter(name: str, fn):
    estimate = _FILTER_SIZE.get(name)

    @functools.wraps(fn)  # keeps Jinja's pass_context / pass_eval_context marks
    def bounded(*args, **kwargs):
        budget = _budget()
        budget.tick()
        budget.ints(args, kwargs)
        if estimate is not None:
            passed = getattr(fn, "jinja_pass_arg", None) is not None
            args, kwargs = _materialised(args, kwargs)
            budget.check(estimate(budget, *args[passed:], **kwargs), f"the filter '{name}' would make a text")
        result = fn(*args, **kwargs)
        budget.check(budget.size(result), f"the filter '{name}' made a value")
        return result

    return bounded


# ------------------------------------------------------------------------------------------ the environment


class _Bound(NodeTransformer):
    """Every for-loop iterates through the counting filter; every `~` becomes the checked concatenation."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _STEPS, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Expr:
        node = self.generic_visit(node)
        return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), _CONCAT, [], [], None, None,
                            lineno=node.lineno)


def _steps(iterable):
    budget = _budget()
    for item in iterable:
        budget.tick()
        yield item


def _concat(values) -> str:
    budget = _budget()
    texts = [str(v) for v in values]
    budget.check(sum(map(len, texts)), "a concatenation (~)")
    return "".join(texts)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """transformers' chat template environment with every step counted and every growth checked."""

    intercepted_binops = frozenset(["*", "**", "%", "+"])

    def __init__(self):
        from transformers.utils.chat_template_utils import _compile_jinja_template

        reference = _compile_jinja_template("").environment  # transformers' own: options, extension, helpers
        super().__init__(trim_blocks=True, lstrip_blocks=True, optimized=False,
                         extensions=[type(e) for e in reference.extensions.values()])
        self.filters.update(reference.filters)
        self.globals.update({k: v for k, v in reference.globals.items() if k != "lipsum"})
        self.globals.pop("lipsum", None)
        self.filters = {name: _bounded_filter(name, fn) for name, fn in self.filters.items()}
        self.filters[_STEPS], self.filters[_CONCAT] = _steps, _concat

    def call_binop(self, context, operator: str, left, right):
        budget = _budget()
        budget.tick()
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right))
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            if right * abs(left).bit_length() > MAX_INT_BITS:
                raise TemplateLimit(f"{left} ** {right}")
        elif operator == "*" and not numbers:
            times, seq = (right, left) if isinstance(right, int) else (left, right)
            if isinstance(times, int):
                budget.check(budget.size(seq) * max(times, 0), "a repetition (*)")
        elif operator == "*" and isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateLimit("a product of huge integers")
        elif operator == "+" and not numbers:
            budget.check(budget.size(left) + budget.size(right), "a sum (+)")
        elif operator == "%" and isinstance(left, str):
            values = list(right.values()) if isinstance(right, dict) else list(right) if isinstance(right, tuple) \
                else [right]
            budget.check(_format_size(budget, left, values, percent=True), "a % format")
        result = super().call_binop(context, operator, left, right)
        budget.check(budget.size(result), f"the result of {operator}")
        return result

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's signature
        budget = _budget()
        budget.tick()
        budget.ints(args, kwargs)
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        estimate = _METHOD_SIZE.get(getattr(__obj, "__name__", ""))
        if isinstance(owner, str) and estimate is not None:
            args, kwargs = _materialised(args, kwargs)
            budget.check(estimate(budget, owner, *args, **kwargs), f"str.{__obj.__name__} would make a text")
        result = super().call(__context, __obj, *args, **kwargs)
        budget.check(budget.size(result), "a call made a value")
        return result

    def getattr(self, obj, attribute):
        _budget().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _budget().tick()
        return super().getitem(obj, argument)


@functools.lru_cache(maxsize=1)
def _environment() -> BoundedSandbox:
    return BoundedSandbox()


@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> jinja2.Template:
    env = _environment()
    tree = _Bound().visit(env.parse(source))
    return env.template_class.from_code(env, env.compile(tree), env.make_globals(None))


# ------------------------------------------------------------------------------------------ rendering


def template_name(tokenizer, template: str | None) -> str:
    """How an error names the template: the tokenizer's (by its path) or the one given."""
    if template is not None:
        return "the built-in '### Instruction:' template"
    return f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}"


def render(tokenizer, messages: list[dict], add_generation_prompt: bool, template: str | None = None,
           where: str = "") -> str:
    """`tokenizer.apply_chat_template(messages, tokenize=False, ...)` within the bounds of the module docstring;
    `template` replaces the tokenizer's own. UserError (naming `where`, e.g. a data row, and the template) for
    a template that hits a bound or fails."""
    name = template_name(tokenizer, template)
    prefix = f"{where}: " if where else ""
    try:
        source = template if template is not None else tokenizer.get_chat_template()
    except ValueError as e:  # no template at all
        raise UserError(f"{prefix}{' '.join(str(e).split())[:200]}") from None
    if len(source) > MAX_TEMPLATE:
        raise UserError(f"{prefix}{name} is {len(source):,} characters long; a chat template is a few thousand")
    chars = sum(len(v) for m in messages for v in m.values() if isinstance(v, str))
    context: dict[str, Any] = {**tokenizer.special_tokens_map, "messages": messages, "tools": None,
                               "documents": None, "add_generation_prompt": add_generation_prompt}
    known = {id(messages): 0}
    budget = _Budget(max(BASE_CHARS, 16 * chars), known)
    known[id(messages)] = budget.size(list(messages))
    token = _BUDGET.set(budget)
    try:
        pieces, total = [], 0
        for piece in _compiled(source).generate(**context):
            total += len(piece)
            budget.check(total, "an output")
            pieces.append(piece)
        return "".join(pieces)
    except TemplateLimit as e:
        raise UserError(f"{prefix}{name} was stopped: {e}; a chat template must not loop or grow without "
                        "bound (replace the tokenizer's chat_template)") from None
    except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError, AttributeError,
            RecursionError, MemoryError) as e:
        message = " ".join(str(e).split())[:300]
        raise UserError(f"{prefix}{name} refused this conversation: {type(e).__name__}: {message}") from None
    finally:
        _BUDGET.reset(token)
