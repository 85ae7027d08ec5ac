"""Template rendering: subject, text and HTML from template sources and the payload, in a Jinja2
sandbox (core.sandbox) with limits on loops, output size and operators. Jinja2 is imported on the
first source rendered: a worker whose notifications carry no template never loads it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pgnotify_worker.errors import TemplateError

if TYPE_CHECKING:
    import jinja2

    from pgnotify_worker.core.sandbox import Sandbox


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
        self.cache_size = cache_size
        self._sandbox: Sandbox | None = None

    @property
    def sandbox(self) -> Sandbox:
        """The Jinja2 sandbox, built on the first source (about 2 MB resident with Jinja2)."""
        if self._sandbox is None:
            from pgnotify_worker.core.sandbox import Sandbox  # noqa: PLC0415

            self._sandbox = Sandbox(
                max_source=self.max_source,
                max_output=self.max_output,
                loop_budget=self.loop_budget,
                cache_size=self.cache_size,
            )
        return self._sandbox

    def compile(self, source: str, *, html: bool = False, part: str = "body") -> jinja2.Template:
        """The compiled template, or TemplateError naming what is wrong with it."""
        return self.sandbox.compile(source, html=html, part=part)

    def references(self, source: str, *, html: bool) -> set[str]:
        """Names a source extends, includes or imports (they must be fetched before rendering)."""
        if "{%" not in source or not any(w in source for w in ("extends", "include", "import")):
            return set()
        return self.sandbox.references(source, html=html)

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
        return self.sandbox.render_one(source, context, html=html, part=part, layouts=layouts)

    def render(
        self,
        parts: TemplateParts,
        context: Mapping[str, Any],
        layouts: Mapping[tuple[str, bool], str] | None = None,
    ) -> Rendered:
        """Render subject, text and HTML; a subject may not contain line breaks. `layouts` maps
        (name, html) to the source a part may extend or include."""
        layouts = layouts or {}
        text_layouts = {name: src for (name, is_html), src in layouts.items() if not is_html}
        html_layouts = {name: src for (name, is_html), src in layouts.items() if is_html}
        subject = text = html = None
        if parts.subject is not None:
            subject = self.render_one(parts.subject, context, html=False, part="subject").strip()
            if "\r" in subject or "\n" in subject:
                raise TemplateError(
                    "template_header", "subject: rendered subject contains a line break"
                )
        if parts.body is not None:
            text = self.render_one(
                parts.body, context, html=False, part="body", layouts=text_layouts
            )
        if parts.html_body is not None:
            html = self.render_one(
                parts.html_body, context, html=True, part="html_body", layouts=html_layouts
            )
        return Rendered(subject, text, html)


def build_context(
    payload: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Template variables: the payload's keys, `payload` itself, then worker-provided extras."""
    context: dict[str, Any] = {"payload": payload}
    context.update(payload)
    if extra:
        context.update(extra)
    return context
