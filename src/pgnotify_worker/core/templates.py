"""Template rendering in a Jinja2 sandbox, with limits on loops, output size and operators."""

from __future__ import annotations

import contextvars
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pgnotify_worker.errors import TemplateError

LOOP_FN = "_pgn_loop"
_WIDTH_LIMIT = 10_000
_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


@dataclass(frozen=True, slots=True)
class TemplateParts:
    """The sources to render: a stored template's parts with any inline overrides applied."""

    subject: str | None = None
    body: str | None = None
    html_body: str | None = None
    key: str | None = None
    version: int | None = None


@dataclass(frozen=True, slots=True)
class Rendered:
    """Rendered subject, text and HTML (None where there was no source)."""

    subject: str | None
    text: str | None
    html: str | None


class _Budget:
    """Counts loop iterations of one render."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise TemplateError("template_limit", "template loops ran past the iteration limit")


_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("pgnotify_template_budget")


def _counted(iterable: Iterable[Any]) -> Iterator[Any]:
    budget = _BUDGET.get()
    for item in iterable:
        budget.take()
        yield item


def _check_width(name: str, value: Any) -> None:
    if isinstance(value, int) and abs(value) > _WIDTH_LIMIT:
        raise TemplateError(
            "template_limit", f"filter {name}: width {value} is over {_WIDTH_LIMIT}"
        )


def _guard_filter(
    name: str, fn: Callable[..., Any], positions: tuple[int, ...], keys: tuple[str, ...]
) -> Any:
    """Wrap a filter so numeric width arguments stay small (no '|center(10**9)')."""

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        for pos in positions:
            if pos < len(args):
                _check_width(name, args[pos])
        for key in keys:
            if key in kwargs:
                _check_width(name, kwargs[key])
        return fn(*args, **kwargs)

    return guarded


def _safe_format(value: str, *args: Any, **kwargs: Any) -> str:
    for match in _FORMAT_WIDTH.finditer(str(value)):
        for group in match.groups():
            if group == "*" or (group and int(group) > _WIDTH_LIMIT):
                raise TemplateError("template_limit", "format: field width over the limit")
    result: str = jinja2.filters.do_format(value, *args, **kwargs)
    return result


class _Environment(ImmutableSandboxedEnvironment):
    """Sandbox that also bounds '*' and '**' so a one-liner cannot exhaust memory or CPU."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, *, max_output: int, autoescape: bool) -> None:
        super().__init__(
            undefined=jinja2.StrictUndefined,
            autoescape=autoescape,
            keep_trailing_newline=True,
            auto_reload=False,
            cache_size=0,  # we cache compiled templates ourselves
        )
        self.max_output = max_output
        self.globals = {"range": self.globals["range"], LOOP_FN: _counted}
        guards = {
            "center": ((1,), ("width",)),
            "indent": ((1,), ("width",)),
            "wordwrap": ((1,), ("width",)),
            "truncate": ((1,), ("length",)),
            "tojson": ((1,), ("indent",)),
        }
        for name, (positions, keys) in guards.items():
            self.filters[name] = _guard_filter(name, self.filters[name], positions, keys)
        self.filters["format"] = _safe_format

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                sized = isinstance(seq, str | list | tuple) and isinstance(times, int)
                if sized and len(seq) * times > self.max_output:
                    raise TemplateError("template_limit", "repetition larger than the output limit")
        elif operator == "**":
            if isinstance(right, int | float) and abs(right) > 256:
                raise TemplateError("template_limit", "exponent larger than 256")
            if isinstance(left, int | float) and abs(left) > 2**64 and abs(right) > 1:
                raise TemplateError("template_limit", "power of a very large number")
        return super().call_binop(context, operator, left, right)


def _wrap_loops(tree: nodes.Template) -> nodes.Template:
    """Route every `for` iterable through the budget counter."""
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Call(nodes.Name(LOOP_FN, "load"), [loop.iter], [], None, None)
    return tree


class Renderer:
    """Compiles (once, cached) and renders template sources with per-render limits."""

    def __init__(
        self,
        *,
        max_source: int = 65_536,
        max_output: int = 1_000_000,
        loop_budget: int = 100_000,
        cache_size: int = 512,
    ) -> None:
        self.max_source = max_source
        self.max_output = max_output
        self.loop_budget = loop_budget
        self._envs = {
            False: _Environment(max_output=max_output, autoescape=False),
            True: _Environment(max_output=max_output, autoescape=True),
        }
        self._compile = functools.lru_cache(maxsize=cache_size)(self._compile_uncached)

    def _compile_uncached(self, source: str, html: bool) -> jinja2.Template:
        env = self._envs[html]
        tree = _wrap_loops(env.parse(source))
        code = env.compile(tree)
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

    def render_one(self, source: str, context: Mapping[str, Any], *, html: bool, part: str) -> str:
        """Render one source with the loop budget and the output cap."""
        template = self.compile(source, html=html, part=part)
        token = _BUDGET.set(_Budget(self.loop_budget))
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
        except RecursionError:
            raise TemplateError("template_limit", f"{part}: recursion too deep") from None
        except Exception as exc:  # a template may raise anything (ZeroDivisionError, TypeError...)
            raise TemplateError("template_error", f"{part}: {type(exc).__name__}: {exc}") from None
        finally:
            _BUDGET.reset(token)
        return "".join(chunks)

    def render(self, parts: TemplateParts, context: Mapping[str, Any]) -> Rendered:
        """Render subject, text and HTML; a subject may not contain line breaks."""
        subject = text = html = None
        if parts.subject is not None:
            subject = self.render_one(parts.subject, context, html=False, part="subject").strip()
            if "\r" in subject or "\n" in subject:
                raise TemplateError(
                    "template_header", "subject: rendered subject contains a line break"
                )
        if parts.body is not None:
            text = self.render_one(parts.body, context, html=False, part="body")
        if parts.html_body is not None:
            html = self.render_one(parts.html_body, context, html=True, part="html_body")
        return Rendered(subject, text, html)


def _undefined_message(exc: jinja2.UndefinedError) -> str:
    message = str(exc.message or exc)
    match = re.match(r"'([^']+)' is undefined", message)
    if match:
        return f"template variable '{match.group(1)}' is undefined (missing from the payload)"
    return message


def build_context(
    payload: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Template variables: the payload's keys, `payload` itself, then worker-provided extras."""
    context: dict[str, Any] = {"payload": payload}
    context.update(payload)
    if extra:
        context.update(extra)
    return context
