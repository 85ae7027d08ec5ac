"""HTML layouts that templates extend: found from the templates table, under the same limits."""

from __future__ import annotations

import pytest

from pgnotify_worker.core.templates import Renderer, TemplateParts, build_context
from pgnotify_worker.errors import TemplateError

LAYOUT = "<html><body>{% block content %}{% endblock %}<footer>{{ footer }}</footer></body></html>"
PAGE = '{% extends "layout" %}{% block content %}<p>Hi {{ name }}</p>{% endblock %}'


def test_a_template_extends_its_layout_with_autoescape() -> None:
    renderer = Renderer()
    out = renderer.render(
        TemplateParts(html_body=PAGE),
        build_context({"name": "<Ada>", "footer": "bye & thanks"}),
        {("layout", True): LAYOUT},
    )
    assert (
        out.html
        == "<html><body><p>Hi &lt;Ada&gt;</p><footer>bye &amp; thanks</footer></body></html>"
    )
    assert renderer.references(PAGE, html=True) == {"layout"}
    assert renderer.references("<p>{{ x }}</p>", html=True) == set()


def test_a_missing_layout_is_named() -> None:
    with pytest.raises(
        TemplateError, match=r"layout 'layout' is not in pgnotify\.templates"
    ) as caught:
        Renderer().render(TemplateParts(html_body=PAGE), build_context({"name": "x", "footer": ""}))
    assert caught.value.code == "template_missing"


def test_the_loop_budget_and_sandbox_apply_inside_layouts() -> None:
    hungry = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% block content %}{% endblock %}"
    with pytest.raises(TemplateError, match="iteration limit"):
        Renderer().render(
            TemplateParts(html_body=PAGE), build_context({"name": "x"}), {("layout", True): hungry}
        )
    sneaky = "{{ ''.__class__.__mro__ }}{% block content %}{% endblock %}"
    with pytest.raises(TemplateError, match="sandbox"):
        Renderer().render(
            TemplateParts(html_body=PAGE), build_context({"name": "x"}), {("layout", True): sneaky}
        )


def test_a_changed_layout_is_not_served_from_the_cache() -> None:
    renderer = Renderer()
    ctx = build_context({"name": "x", "footer": "f"})
    first = renderer.render(TemplateParts(html_body=PAGE), ctx, {("layout", True): LAYOUT})
    second = renderer.render(
        TemplateParts(html_body=PAGE),
        ctx,
        {("layout", True): "NEW {% block content %}{% endblock %}"},
    )
    assert first.html != second.html and second.html == "NEW <p>Hi x</p>"
