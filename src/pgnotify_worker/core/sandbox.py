"""The Jinja2 sandbox behind core.templates.Renderer: limits on loops, output size and operators.
Imported on the first template a worker renders (core.templates stays free of Jinja2)."""

from __future__ import annotations

import contextvars
import functools
import re
import string
import types
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
import jinja2.meta
import markupsafe
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from pgnotify_worker.errors import TemplateError

TICK_FN = "_pgn_tick"
CONCAT_FN = "_pgn_concat"
_WIDTH_LIMIT = 10_000
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


class _Budget:
    """Counts loop iterations of one render (recursive loops included)."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise TemplateError("template_limit", "template loops ran past the iteration limit")


_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("pgnotify_template_budget")
_LAYOUTS: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "pgnotify_template_layouts", default=types.MappingProxyType({})
)


def _load_layout(name: str) -> tuple[str, None, Callable[[], bool]] | None:
    """Layouts a template extends or includes: only those the render was given (from the
    templates table), never files."""
    source = _LAYOUTS.get().get(name)
    if source is None:
        return None
    return source, None, lambda: _LAYOUTS.get().get(name) == source


_MAX_OUTPUT: contextvars.ContextVar[int] = contextvars.ContextVar("pgnotify_max_output")


def _tick() -> str:
    """Called at the top of every loop body: one iteration spent."""
    _BUDGET.get().take()
    return ""


def _limit(size: int, what: str) -> None:
    """Refuse to build anything larger than the output may be."""
    if size > _MAX_OUTPUT.get():
        raise TemplateError("template_limit", f"{what} would be larger than the output limit")


def _width(value: Any, what: str) -> None:
    if isinstance(value, int) and abs(value) > _WIDTH_LIMIT:
        raise TemplateError("template_limit", f"{what}: width {value} is over {_WIDTH_LIMIT}")


def _concat(*parts: Any) -> Any:
    """`a ~ b` with a size check; Markup stays Markup (autoescape)."""
    texts = [p if isinstance(p, str) else str(p) for p in parts]
    _limit(sum(len(t) for t in texts), "concatenation")
    if any(hasattr(p, "__html__") for p in parts):
        return markupsafe.Markup("").join(parts)
    return "".join(texts)


def _check_percent_format(fmt: str) -> None:
    for match in _PERCENT_SPEC.finditer(fmt):
        for group in match.groups():
            if group == "*" or (group and int(group) > _WIDTH_LIMIT):
                raise TemplateError("template_limit", "format: field width over the limit")


def _check_brace_format(fmt: str, depth: int = 0) -> None:
    """str.format specs: no huge widths, no nested fields we cannot check."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format itself will raise the same ValueError
    for _literal, _name, spec, _conversion in fields:
        if not spec:
            continue
        if "{" in spec:
            raise TemplateError("template_limit", "format: nested fields in a format spec")
        for number in re.findall(r"\d+", spec):
            if int(number) > _WIDTH_LIMIT:
                raise TemplateError("template_limit", "format: field width over the limit")


def _replace_size(text: str, old: str, new: str, count: int = -1) -> int:
    hits = text.count(old) if old else len(text) + 1
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * (len(new) - len(old))


def _guard_str_call(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Bound str methods that can allocate far more than their inputs."""
    name = getattr(obj, "__name__", "")
    text = getattr(obj, "__self__", None)
    if not isinstance(text, str):
        return
    if name in ("center", "ljust", "rjust", "zfill") and args:
        _width(args[0], f"str.{name}")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        _width(size, "str.expandtabs")
        _limit(len(text) + text.count("\t") * int(size), "str.expandtabs")
    elif name == "replace" and len(args) >= 2:
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        _limit(_replace_size(text, str(args[0]), str(args[1]), count), "str.replace")
    elif name == "join" and args:
        items = args[0] if isinstance(args[0], list | tuple) else None
        if items is not None:
            _limit(len(text) * len(items) + sum(len(str(i)) for i in items), "str.join")


def _guard_filters(filters: dict[str, Any]) -> None:
    """Filters that can allocate far more than their inputs get a size check first."""
    center, indent, tojson = filters["center"], filters["indent"], filters["tojson"]
    join, replace, fmt = filters["join"], filters["replace"], filters["format"]

    def do_center(value: Any, width: int = 80) -> Any:
        _width(width, "filter center")
        return center(value, width)

    def do_indent(value: Any, width: Any = 4, *args: Any, **kwargs: Any) -> Any:
        _width(width if isinstance(width, int) else len(str(width)), "filter indent")
        lines = str(value).count("\n") + 1
        _limit(
            len(str(value)) + lines * (width if isinstance(width, int) else len(str(width))),
            "indent",
        )
        return indent(value, width, *args, **kwargs)

    def do_join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> Any:
        items = list(value)
        _limit(len(str(d)) * len(items) + sum(len(str(i)) for i in items), "filter join")
        return join(eval_ctx, items, d, attribute)

    def do_replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: Any = None) -> Any:
        _limit(_replace_size(str(s), str(old), str(new), -1 if count is None else count), "replace")
        return replace(eval_ctx, s, old, new, count)

    def do_format(value: Any, *args: Any, **kwargs: Any) -> Any:
        _check_percent_format(str(value))
        return fmt(value, *args, **kwargs)

    def do_tojson(eval_ctx: Any, value: Any, indent: Any = None) -> Any:
        _width(indent, "filter tojson indent")
        if isinstance(indent, int) and indent > 16:
            raise TemplateError("template_limit", "filter tojson: indent over 16")
        return tojson(eval_ctx, value, indent)

    plain: dict[str, Callable[..., Any]] = {
        "center": do_center,
        "indent": do_indent,
        "format": do_format,
    }
    with_context: dict[str, Callable[..., Any]] = {
        "join": do_join,
        "replace": do_replace,
        "tojson": do_tojson,
    }
    for name, fn in plain.items():
        filters[name] = functools.wraps(filters[name])(fn)
    for name, fn in with_context.items():
        filters[name] = jinja2.pass_eval_context(functools.wraps(filters[name])(fn))


def _printable(value: Any) -> Any:
    """What `{{ ... }}` prints: a value. A function or method (`''|attr('format')`) is refused:
    its repr is no content and shows memory addresses."""
    if callable(value) and not isinstance(value, markupsafe.Markup | str | jinja2.Undefined):
        raise TemplateError("template_error", "the template prints a function, not a value")
    return value


class _Environment(ImmutableSandboxedEnvironment):
    """The sandbox, plus bounds on the operators and calls that allocate or loop."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *, autoescape: bool) -> None:
        super().__init__(
            undefined=jinja2.StrictUndefined,
            autoescape=autoescape,
            keep_trailing_newline=True,
            loader=jinja2.FunctionLoader(_load_layout),
            auto_reload=True,  # a cached layout is checked against the current source
            cache_size=64,  # layouts only: our own sources are cached by Renderer
            finalize=_printable,
        )
        self.globals = {"range": self.globals["range"], TICK_FN: _tick, CONCAT_FN: _concat}
        _guard_filters(self.filters)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """Every tree, ours and loaded layouts alike, gets the loop and concatenation limits."""
        tree: nodes.Template = _Limits().visit(super()._parse(source, name, filename))
        return tree

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int):
                    _limit(len(seq) * times, "repetition")
        elif operator == "**":
            if isinstance(right, int | float) and abs(right) > 256:
                raise TemplateError("template_limit", "exponent larger than 256")
            if isinstance(left, int | float) and abs(left) > 2**64 and abs(right) > 1:
                raise TemplateError("template_limit", "power of a very large number")
        elif operator == "+":
            if isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
                _limit(len(left) + len(right), "concatenation")
        elif operator == "%" and isinstance(left, str):
            _check_percent_format(left)
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        _check_brace_format(value.__self__)
        return wrapped

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _guard_str_call(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


class _Limits(NodeTransformer):
    """Rewrites the template tree: every loop body ticks the budget, `~` is size-checked."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        tick = nodes.Output([nodes.Call(nodes.Name(TICK_FN, "load"), [], [], None, None)])
        node.body = [tick, *node.body]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        parts = [self.visit(part) for part in node.nodes]
        return nodes.Call(nodes.Name(CONCAT_FN, "load"), parts, [], None, None)


class Sandbox:
    """Compiles (once, cached) and renders template sources with per-render limits."""

    def __init__(
        self, *, max_source: int, max_output: int, loop_budget: int, cache_size: int
    ) -> None:
        self.max_source = max_source
        self.max_output = max_output
        self.loop_budget = loop_budget
        self._envs = {False: _Environment(autoescape=False), True: _Environment(autoescape=True)}
        self._compile = functools.lru_cache(maxsize=cache_size)(self._compile_uncached)

    def _compile_uncached(self, source: str, html: bool) -> jinja2.Template:
        env = self._envs[html]
        code = env.compile(env.parse(source))
        return env.template_class.from_code(env, code, env.make_globals(None), None)

    def compile(self, source: str, *, html: bool = False, part: str = "body") -> jinja2.Template:
        """The compiled template, or TemplateError naming what is wrong with it."""
        if len(source) > self.max_source:
            raise TemplateError(
                "template_too_large",
                f"{part} template is {len(source)} characters, over {self.max_source}",
            )
        try:
            return self._compile(source, html)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(
                "template_syntax",
                f"{part} template syntax error at line {exc.lineno}: {exc.message}",
            ) from None
        except RecursionError:
            raise TemplateError("template_limit", f"{part} template is nested too deeply") from None

    def references(self, source: str, *, html: bool) -> set[str]:
        """Names a source extends, includes or imports (they must be fetched before rendering)."""
        try:
            ast = self._envs[html].parse(source)
        except (jinja2.TemplateSyntaxError, RecursionError):
            return set()  # render_one reports the syntax error
        return {name for name in jinja2.meta.find_referenced_templates(ast) if name is not None}

    def render_one(
        self,
        source: str,
        context: Mapping[str, Any],
        *,
        html: bool,
        part: str,
        layouts: Mapping[str, str] | None = None,
    ) -> str:
        """Render one source with the loop budget and the output cap."""
        template = self.compile(source, html=html, part=part)
        token = _BUDGET.set(_Budget(self.loop_budget))
        cap = _MAX_OUTPUT.set(self.max_output)
        shelf = _LAYOUTS.set(layouts or {})
        chunks: list[str] = []
        size = 0
        try:
            for chunk in template.generate(context):
                size += len(chunk)
                if size > self.max_output:
                    raise TemplateError(
                        "template_limit", f"{part} output is over {self.max_output} characters"
                    )
                chunks.append(chunk)
        except TemplateError:
            raise
        except jinja2.UndefinedError as exc:
            raise TemplateError("template_variable", f"{part}: {_undefined_message(exc)}") from None
        except SecurityError as exc:
            raise TemplateError("template_unsafe", f"{part}: the sandbox refused: {exc}") from None
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(
                "template_missing", f"{part}: layout {exc.name!r} is not in pgnotify.templates"
            ) from None
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(
                "template_syntax",
                f"{part}: layout syntax error at line {exc.lineno}: {exc.message}",
            ) from None
        except RecursionError:
            raise TemplateError("template_limit", f"{part}: recursion too deep") from None
        except Exception as exc:  # a template may raise anything (ZeroDivisionError, TypeError...)
            raise TemplateError("template_error", f"{part}: {type(exc).__name__}: {exc}") from None
        finally:
            _BUDGET.reset(token)
            _MAX_OUTPUT.reset(cap)
            _LAYOUTS.reset(shelf)
        return "".join(chunks)


def _undefined_message(exc: jinja2.UndefinedError) -> str:
    message = str(exc.message or exc)
    match = re.match(r"'([^']+)' is undefined", message)
    if match:
        return f"template variable '{match.group(1)}' is undefined (missing from the payload)"
    return message
