"""A jinja2 sandbox with a budget, for templates that come inside model files (chat templates).

jinja2's ImmutableSandboxedEnvironment stops a template from reaching Python internals or
mutating its inputs, but not from exhausting the machine: `'a' * 10**10` allocates 10 GB,
nested `range(100000)` loops run for hours, a macro that calls itself recurses until Python
gives up. BudgetedEnvironment meters one render against a TemplateBudget:

- size: every string or list an operator, a call, a filter, `~` or an output makes holds at most
  max_chars, checked BEFORE it is made where it could be huge (`*`, `+`, `%`, `**`, str.format,
  join, replace, indent, wordwrap, translate, expandtabs, tojson, str() of a container), and the
  characters made over the render add up to at most max_produced; the rendered text is at most
  max_chars; integer arguments of calls and filters are at most max_int_arg.
- work: loop iterations, calls, operators, lookups and outputs are steps (at most max_steps),
  one range() holds at most max_range items, and max_seconds of the thread's CPU time bound the
  rest (e.g. comparisons of large values, which jinja2 does not route through the sandbox).
- depth: calls back into template code (macros, caller(), recursive loops) nest max_depth deep.

Exceeding any of them raises BudgetExceeded, naming the limit. The `lipsum` and `pprint`
helpers are not offered (their work is not bounded by their arguments).
"""

from __future__ import annotations

import functools
import json
import re
import string
import time
from collections import abc
from contextvars import ContextVar
from dataclasses import dataclass

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.filters import make_attrgetter
from jinja2.runtime import Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, pass_eval_context


class BudgetExceeded(Exception):
    """A template went past a limit of its TemplateBudget."""


@dataclass(frozen=True)
class TemplateBudget:
    max_chars: int = 4 << 20           # one string / list, and the rendered text
    max_produced: int = 64 << 20       # characters made by all operations of one render
    max_steps: int = 1_000_000         # iterations, calls, operators, lookups, outputs
    max_range: int = 100_000           # items of one range()
    max_depth: int = 64                # nested calls into template code
    max_int_arg: int = 1 << 16         # an integer argument of a call or filter
    max_int_bits: int = 1 << 16        # integers made by * and **
    max_seconds: float = 2.0           # CPU time of one render
    max_source: int = 1 << 20          # characters of the template's source


_meter: ContextVar[_Meter | None] = ContextVar("hetinfer_template_meter", default=None)


class _Meter:
    """The budget spent so far by one render."""

    def __init__(self, budget: TemplateBudget):
        self.b = budget
        self.steps = self.produced = self.depth = 0
        self.deadline = time.thread_time() + budget.max_seconds

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.b.max_steps:
            raise BudgetExceeded(f"more than {self.b.max_steps} steps (loop iterations, calls, operations)")
        if self.steps & 255 < n and time.thread_time() > self.deadline:
            raise BudgetExceeded(f"more than {self.b.max_seconds} s of CPU time")

    def fits(self, n: int, what: str) -> None:
        """Refuse, before making it, a value of n characters / items."""
        if n > self.b.max_chars:
            raise BudgetExceeded(f"{what} would make {n} characters or items; at most {self.b.max_chars}")

    def made(self, value):
        if isinstance(value, (str, list, tuple, dict)):
            n = len(value)
            self.fits(n, "an operation")
            self.produced += n
            if self.produced > self.b.max_produced:
                raise BudgetExceeded(f"more than {self.b.max_produced} characters made in one render")
        return value

    def int_args(self, args, kwargs) -> None:
        for a in (*args, *kwargs.values()):
            if _is_int(a) and abs(a) > self.b.max_int_arg:
                raise BudgetExceeded(f"an integer argument {a} is above {self.b.max_int_arg}")


def meter() -> _Meter:
    """The running render's meter; outside a render (jinja2 folding constants while it
    compiles) there is none, and the operation is left for the render."""
    m = _meter.get()
    if m is None:
        raise nodes.Impossible()
    return m


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def size(obj, limit: int, inner: bool = False, depth: int = 0) -> int:
    """An upper bound of len(str(obj)) (of repr inside containers), found without making it;
    the walk stops once it passes limit."""
    if isinstance(obj, str):
        n = len(obj)
        if not inner:
            return n
        return len(repr(obj)) if n <= 4096 else 10 * n + 2
    if obj is None or isinstance(obj, (bool, float)):
        return 32
    if isinstance(obj, (bytes, bytearray)):
        return 4 * len(obj) + 14
    if isinstance(obj, int):
        return obj.bit_length() // 3 + 2
    if isinstance(obj, Undefined):
        return 0
    if isinstance(obj, Namespace):
        obj = obj._Namespace__attrs
    if isinstance(obj, (abc.Mapping, abc.ItemsView)):
        items = (x for kv in (obj.items() if isinstance(obj, abc.Mapping) else obj) for x in kv)
    elif isinstance(obj, (list, tuple, abc.Set, abc.KeysView, abc.ValuesView)):
        items = iter(obj)
    else:
        return len(str(obj))            # jinja2's own objects (loop, macro, cycler): short
    if depth > 100:
        return limit + 1
    total = 16
    for x in items:
        total += size(x, limit, True, depth + 1) + 4
        if total > limit:
            break
    return total


def _percent_bound(fmt: str, values) -> int:
    """An upper bound of len(fmt % values)."""
    m = meter()
    vals = list(values.values()) if isinstance(values, abc.Mapping) else (
        list(values) if isinstance(values, tuple) else [values])
    vb = max((size(v, m.b.max_chars) for v in vals), default=0)
    ib = max((abs(v) for v in vals if _is_int(v)), default=0)
    total = len(fmt)
    for width, prec in re.findall(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?", fmt):
        w = ib if width == "*" else int(width or 0)
        p = ib if prec == "*" else int(prec or 0)
        total += w + p + vb + 320
        if total > m.b.max_chars:
            break
    return total


def _format_bound(fmt: str, args, kwargs) -> int:
    """An upper bound of len(fmt.format(*args, **kwargs))."""
    m = meter()
    vals = [*args, *kwargs.values()]
    vb = max((size(v, m.b.max_chars) for v in vals), default=0)
    ib = max((abs(v) for v in vals if _is_int(v)), default=0)
    total = 0
    for literal, field, spec, _ in string.Formatter().parse(fmt):
        total += len(literal)
        if field is not None:
            total += vb + sum(int(d) for d in re.findall(r"\d+", spec or "")) + ("{" in (spec or "")) * ib + 320
        if total > m.b.max_chars:
            break
    return total


def _replace_bound(s: str, old, new, count=-1) -> int:
    old, new = str(old), str(new)
    hits = s.count(old) if old else len(s) + 1
    if _is_int(count) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(len(new) - len(old), 0)


def _str_method_bound(s: str, name: str, args, kwargs) -> int | None:
    """An upper bound of the result of s.name(*args) for the str methods that can grow."""
    if name == "replace" and len(args) >= 2:
        return _replace_bound(s, *args[:3])
    if name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        return len(s) + s.count("\t") * max(int(tab), 0) if _is_int(tab) else None
    if name == "translate" and args and isinstance(args[0], abc.Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        return len(s) * max(longest, 1)
    if name in ("center", "ljust", "rjust", "zfill") and args and _is_int(args[0]):
        return max(len(s), args[0])
    return None


# ---- filters --------------------------------------------------------------------------------------
# filters that make a string of their value (str() of a container is bounded before it is made)
_STRINGIFY = {"capitalize", "center", "e", "escape", "forceescape", "format", "indent", "lower", "replace",
              "string", "striptags", "title", "trim", "truncate", "upper", "urlencode", "urlize",
              "wordcount", "wordwrap", "safe", "xmlattr"}


def _filter_bound(name: str, s, args, kwargs) -> int | None:
    if not isinstance(s, str):
        return None
    if name == "replace" and len(args) >= 2:
        return _replace_bound(s, *args[:3])
    if name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        return len(s) + (s.count("\n") + 1) * (width if _is_int(width) else len(str(width)))
    if name == "wordwrap":
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring")
        return len(s) + (len(s) + 1) * len(str(wrap or "\n"))
    if name == "format":
        return _percent_bound(s, kwargs or tuple(args))
    if name == "truncate":
        end = args[2] if len(args) > 2 else kwargs.get("end", "...")
        return len(s) + len(str(end))
    return None


def _wrap_filter(name: str, fn):
    from jinja2.utils import _PassArg
    skip = 0 if _PassArg.from_obj(fn) is None else 1

    @functools.wraps(fn)
    def metered(*args, **kwargs):
        m = meter()
        value, rest = args[skip], args[skip + 1:]
        m.step(1 + (len(value) if isinstance(value, (list, tuple, dict, abc.Set)) else 0))
        m.int_args(rest, kwargs)
        if name in _STRINGIFY and not isinstance(value, str):
            m.fits(size(value, m.b.max_chars), f"the {name} filter")
        bound = _filter_bound(name, value, rest, kwargs)
        if bound is not None:
            m.fits(bound, f"the {name} filter")
        return m.made(fn(*args, **kwargs))
    return metered


def _join_filter(original):
    @pass_eval_context
    def join(eval_ctx, value, d="", attribute=None):
        m = meter()
        if attribute is not None:
            value = map(make_attrgetter(eval_ctx.environment, attribute), value)
        parts, total, sep = [], 0, len(str(d))
        for x in value:
            m.step()
            total += size(x, m.b.max_chars) + sep
            m.fits(total, "the join filter")
            parts.append(x)
        return m.made(original(eval_ctx, parts, d))
    return join


def _sum_filter(original):
    @functools.wraps(original)
    def total(env, iterable, attribute=None, start=0):
        m = meter()
        items = list(iterable if attribute is None else map(make_attrgetter(env, attribute), iterable))
        m.step(1 + len(items))
        if not all(isinstance(x, (int, float)) for x in items):   # sequences: quadratic
            cost = len(items) * sum(len(x) for x in items if isinstance(x, (str, list, tuple)))
            if cost > m.b.max_produced:
                raise BudgetExceeded(f"the sum filter would copy {cost} items; at most {m.b.max_produced}")
        return m.made(original(env, items, None, start))
    return total


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """HF's tojson (json.dumps, non-ASCII kept), made piece by piece within the budget."""
    m = meter()
    if _is_int(indent) and indent > 64 or isinstance(indent, str) and len(indent) > 64:
        raise BudgetExceeded(f"tojson indent {indent!r} is above 64")
    enc = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    parts, total = [], 0
    for piece in enc.iterencode(x):
        total += len(piece)
        m.fits(total, "tojson")
        parts.append(piece)
    m.step(1 + len(parts) // 64)
    return m.made("".join(parts))


# ---- the environment -----------------------------------------------------------------------------
class _MeteredCodeGenerator(CodeGenerator):
    """Routes what the sandbox does not see through the environment: for-loop iterables
    (each item a step), `~` concatenation, slices, and the template's literal text."""

    def visit_For(self, node, frame):
        if not getattr(node, "_metered", False):
            node._metered = True
            node.iter = nodes.Call(nodes.EnvironmentAttribute("metered_iter"), [node.iter], [], None, None,
                                   lineno=node.iter.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node, frame):
        self.write("environment.metered_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_Getitem(self, node, frame):
        if not isinstance(node.arg, nodes.Slice):          # jinja2 slices bypass getitem
            return super().visit_Getitem(node, frame)
        self.write("environment.metered_slice(")
        self.visit(node.node, frame)
        self.write(", slice(")
        for part in (node.arg.start, node.arg.stop, node.arg.step):
            if part is None:
                self.write("None")
            else:
                self.visit(part, frame)
            self.write(", ")
        self.write("))")
        return None

    def _output_const_repr(self, group):
        return f"environment.metered_text({super()._output_const_repr(group)})"


_BUILTIN_VALUES = (str, bytes, int, float, list, tuple, dict)


class BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """An immutable sandbox that meters each render against a TemplateBudget. Render with
    render_text(); a render past the budget raises BudgetExceeded."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})
    code_generator_class = _MeteredCodeGenerator

    def __init__(self, budget: TemplateBudget | None = None, **options):
        super().__init__(finalize=self._finalize, **options)
        self.budget = budget or TemplateBudget()
        self.globals["range"] = self._range
        for name in ("lipsum",):
            self.globals.pop(name, None)
        self.filters.pop("pprint", None)
        self.filters["tojson"] = tojson
        self.filters["join"] = _join_filter(self.filters["join"])
        self.filters["sum"] = _sum_filter(self.filters["sum"])
        for name, fn in list(self.filters.items()):
            self.filters[name] = _wrap_filter(name, fn)

    def from_string(self, source, *args, **kwargs):
        if isinstance(source, str) and len(source) > self.budget.max_source:
            raise BudgetExceeded(f"the template is {len(source)} characters; at most {self.budget.max_source}")
        return super().from_string(source, *args, **kwargs)

    def render_text(self, template, **context) -> str:
        """Render under a fresh budget; the text is at most max_chars."""
        token = _meter.set(_Meter(self.budget))
        try:
            out, total = [], 0
            for piece in template.generate(**context):
                total += len(piece)
                if total > self.budget.max_chars:
                    raise BudgetExceeded(f"the rendered text passed {self.budget.max_chars} characters")
                out.append(piece)
            return "".join(out)
        finally:
            _meter.reset(token)

    # -- what the generated code calls
    def _finalize(self, value):
        m = _meter.get()
        if m is None:
            raise nodes.Impossible()
        m.step()
        if not isinstance(value, str):
            m.fits(size(value, m.b.max_chars), "an output")
            value = str(value)
        return m.made(value)

    def metered_text(self, text: str) -> str:
        m = meter()
        m.step()
        return m.made(text)

    def metered_iter(self, iterable):
        m = meter()
        for x in iterable:
            m.step()
            yield x

    def metered_slice(self, obj, key: slice):
        m = meter()
        m.step()
        return m.made(obj[key])

    def metered_concat(self, parts) -> str:
        m = meter()
        m.step()
        m.fits(sum(size(p, m.b.max_chars) for p in parts), "~")
        return m.made("".join(map(str, parts)))

    def _range(self, *args):
        m = meter()
        m.step()
        r = range(*args)
        try:
            n = len(r)
        except OverflowError:
            n = m.b.max_range + 1
        if n > m.b.max_range:
            raise BudgetExceeded(f"range() of {n if n <= 10**30 else 'more than 10**30'} items; "
                                 f"at most {m.b.max_range}")
        return r

    # -- the sandbox's hooks
    def call_binop(self, context, operator, left, right):
        m = meter()
        m.step()
        seqs = (str, list, tuple)
        if operator == "*":
            if isinstance(left, seqs) and _is_int(right) or isinstance(right, seqs) and _is_int(left):
                seq, n = (left, right) if isinstance(left, seqs) else (right, left)
                m.fits(len(seq) * max(n, 0), "*")
            elif _is_int(left) and _is_int(right):
                self._bits(left.bit_length() + right.bit_length())
        elif operator == "+" and isinstance(left, seqs) and isinstance(right, seqs):
            m.fits(len(left) + len(right), "+")
        elif operator == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
            self._bits(left.bit_length() * right)
        elif operator == "%" and isinstance(left, str):
            m.fits(_percent_bound(left, right), "%")
        return m.made(super().call_binop(context, operator, left, right))

    def _bits(self, bits: int) -> None:
        if bits > self.budget.max_int_bits:
            raise BudgetExceeded(f"an integer of about {bits} bits; at most {self.budget.max_int_bits}")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's signature
        m = meter()
        m.step()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, _BUILTIN_VALUES):        # e.g. (5).to_bytes(10**9): refused
            m.int_args(args, kwargs)
        if isinstance(owner, str):
            name = getattr(__obj, "__name__", "")
            if name == "join" and args:
                items = list(args[0])
                m.step(len(items))
                m.fits(sum(size(x, m.b.max_chars) for x in items) + len(owner) * len(items), "str.join")
                args = (items, *args[1:])
            else:
                bound = _str_method_bound(owner, name, args, kwargs)
                if bound is not None:
                    m.fits(bound, f"str.{name}")
        if m.depth >= m.b.max_depth:
            raise BudgetExceeded(f"calls nested more than {m.b.max_depth} deep (a macro or loop calling itself?)")
        m.depth += 1
        try:
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            m.depth -= 1
        return m.made(result)

    def getattr(self, obj, attribute):
        m = _meter.get()
        if m is not None:
            m.step()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        m = _meter.get()
        if m is not None:
            m.step()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value):
        fmt = super().wrap_str_format(value)
        if fmt is None:
            return None
        text, is_map = value.__self__, value.__name__ == "format_map"

        @functools.wraps(fmt)
        def bounded(*args, **kwargs):
            m = meter()
            if is_map and args and isinstance(args[0], abc.Mapping):
                m.fits(_format_bound(text, (), args[0]), "str.format_map")
            else:
                m.fits(_format_bound(text, args, kwargs), "str.format")
            return fmt(*args, **kwargs)
        return bounded
