"""Renderer: sandboxed Jinja2 with limits on loops, output size, operators and header injection."""

from __future__ import annotations

from typing import Any

import pytest

from pgnotify_worker.core.templates import Renderer, TemplateParts, build_context
from pgnotify_worker.errors import TemplateError

ATTACK_CODES = {"template_unsafe", "template_limit", "template_error"}


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer()


def render_body(renderer: Renderer, source: str, payload: dict[str, Any] | None = None) -> str:
    return renderer.render_one(source, build_context(payload or {}), html=False, part="body")


def test_renders_subject_text_and_html_from_the_payload(renderer: Renderer) -> None:
    payload = {"name": "Ada", "order": {"id": 42, "items": ["tea", "cake"]}}
    parts = TemplateParts(
        subject="Order {{ order.id }} for {{ name }}",
        body="Hi {{ name }}, you bought {{ order['items']|join(', ') }}.\n",
        html_body="<p>Hi {{ payload.name }}</p>",
    )
    got = renderer.render(parts, build_context(payload))
    assert got.subject == "Order 42 for Ada"
    assert got.text == "Hi Ada, you bought tea, cake.\n"  # trailing newline kept
    assert got.html == "<p>Hi Ada</p>"


def test_parts_without_a_source_render_as_none(renderer: Renderer) -> None:
    got = renderer.render(TemplateParts(body="only {{ a }}"), build_context({"a": 1}))
    assert (got.subject, got.text, got.html) == (None, "only 1", None)


def test_subject_is_stripped(renderer: Renderer) -> None:
    got = renderer.render(TemplateParts(subject="  Hi {{ n }}\n"), build_context({"n": "x"}))
    assert got.subject == "Hi x"


def test_build_context_exposes_keys_payload_and_extras_last() -> None:
    payload = {"name": "Ada", "locale": "en"}
    context = build_context(payload, {"locale": "fr", "now": "today"})
    assert context["payload"] is payload
    assert context["name"] == "Ada"
    assert context["locale"] == "fr"  # worker extras win
    assert context["now"] == "today"
    assert build_context({}) == {"payload": {}}


def test_html_is_autoescaped_but_text_is_not(renderer: Renderer) -> None:
    payload = {"name": "<script>alert(1)</script>"}
    parts = TemplateParts(subject="{{ name }}", body="{{ name }}", html_body="<b>{{ name }}</b>")
    got = renderer.render(parts, build_context(payload))
    assert got.html == "<b>&lt;script&gt;alert(1)&lt;/script&gt;</b>"
    assert got.text == "<script>alert(1)</script>"
    assert got.subject == "<script>alert(1)</script>"


@pytest.mark.parametrize(
    ("source", "variable"),
    [
        ("Hi {{ first_name }}", "first_name"),
        ("{% if vip %}gold{% endif %}", "vip"),
        ("{{ coupon|upper }}", "coupon"),
        ("{% for i in items %}{{ i }}{% endfor %}", "items"),
    ],
)
def test_missing_variable_is_a_template_variable_error_naming_it(
    renderer: Renderer, source: str, variable: str
) -> None:
    with pytest.raises(TemplateError) as info:
        render_body(renderer, source, {"name": "Ada"})
    assert info.value.code == "template_variable"
    assert variable in info.value.message
    assert "body" in info.value.message


def test_missing_variable_names_the_part(renderer: Renderer) -> None:
    with pytest.raises(TemplateError) as info:
        renderer.render(TemplateParts(subject="{{ nope }}"), build_context({}))
    assert info.value.code == "template_variable"
    assert info.value.message.startswith("subject")


SSTI = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ x|attr('format')('{0.__class__}') }}",
    "{{ x.format(x) }}",
    "{{ ''.format.__globals__ }}",
    "{{ range.__globals__ }}",
    "{{ payload.__class__.__init__ }}",
    "{{ payload|attr('__class__') }}",
    "{{ x.__len__.__self__ }}",
    "{% for i in range(10**9) %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'a'*10**9 }}",
    "{{ 10**9*'a' }}",
    "{{ ['a']*10**9 }}",
    "{{ 'a'|center(10**9) }}",
    "{{ 'a'|center(width=10**9) }}",
    "{{ 'a'|indent(10**9) }}",
    "{{ [1]|tojson(indent=10**9) }}",
    "{{ '%999999999s'|format(1) }}",
    "{{ '%.999999999f'|format(1) }}",
    "{{ '%*s'|format(999999999, 1) }}",
    "{{ 10**10**10**10 }}",
    "{{ 9**999 }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
]


@pytest.mark.parametrize("source", SSTI)
def test_sandbox_escapes_and_resource_bombs_are_refused(renderer: Renderer, source: str) -> None:
    payload = {"x": "{0.__class__}", "n": 1}
    with pytest.raises(TemplateError) as info:
        render_body(renderer, source, payload)
    assert info.value.code in ATTACK_CODES, info.value.message


def test_loop_budget_counts_nested_iterations() -> None:
    small = Renderer(loop_budget=100)
    nested = "{%% for i in range(10) %%}{%% for j in range(%d) %%}{%% endfor %%}{%% endfor %%}"
    assert render_body(small, nested % 9) == ""  # 10 + 90 iterations
    with pytest.raises(TemplateError) as info:
        render_body(small, nested % 10)  # 10 + 100
    assert info.value.code == "template_limit"


def test_loop_budget_is_per_render() -> None:
    small = Renderer(loop_budget=50)
    for _ in range(5):
        assert render_body(small, "{% for i in range(40) %}.{% endfor %}") == "." * 40


def test_a_legit_loop_over_a_large_payload_list_renders(renderer: Renderer) -> None:
    items = [{"sku": f"SKU-{i}", "qty": i % 7} for i in range(1000)]
    source = "{% for it in items %}{{ it.sku }}x{{ it.qty }};{% endfor %}"
    out = render_body(renderer, source, {"items": items})
    assert out.count(";") == 1000
    assert out.startswith("SKU-0x0;SKU-1x1;")
    assert out.endswith("SKU-999x5;")


def test_syntax_error_names_the_line() -> None:
    with pytest.raises(TemplateError) as info:
        Renderer().compile("line one\nline two\n{% if %}", part="html_body")
    assert info.value.code == "template_syntax"
    assert "line 3" in info.value.message
    assert "html_body" in info.value.message


@pytest.mark.parametrize(
    "source", ["Hi {{ name ", "{% for x in y %}", "{% endif %}", "{{ x|no_such_filter }}"]
)
def test_syntax_errors_are_template_syntax(source: str) -> None:
    with pytest.raises(TemplateError) as info:
        Renderer().compile(source)
    assert info.value.code == "template_syntax"
    assert "line 1" in info.value.message


def test_source_over_max_source_is_too_large() -> None:
    small = Renderer(max_source=100)
    small.compile("x" * 100)
    with pytest.raises(TemplateError) as info:
        small.compile("x" * 101, part="subject")
    assert info.value.code == "template_too_large"
    assert "subject" in info.value.message
    assert "101" in info.value.message


def test_output_over_max_output_is_a_limit_error() -> None:
    small = Renderer(max_output=1000)
    assert len(render_body(small, "{% for i in range(1000) %}x{% endfor %}")) == 1000
    with pytest.raises(TemplateError) as info:
        render_body(small, "{% for i in range(1000) %}xx{% endfor %}")
    assert info.value.code == "template_limit"
    assert "1000" in info.value.message


def test_repetition_is_bounded_by_max_output() -> None:
    small = Renderer(max_output=1000)
    assert render_body(small, "{{ 'ab'*500 }}") == "ab" * 500
    with pytest.raises(TemplateError) as info:
        render_body(small, "{{ ('ab'*501)|length }}")  # refused even when not printed
    assert info.value.code == "template_limit"


@pytest.mark.parametrize("value", ["a\nBcc: x", "a\r\nBcc: x", "a\rb", "line1\nline2"])
def test_subject_with_a_line_break_is_refused(renderer: Renderer, value: str) -> None:
    with pytest.raises(TemplateError) as info:
        renderer.render(TemplateParts(subject="Re: {{ v }} here"), build_context({"v": value}))
    assert info.value.code == "template_header"


def test_line_breaks_are_fine_in_bodies(renderer: Renderer) -> None:
    parts = TemplateParts(body="{{ v }}", html_body="{{ v }}")
    got = renderer.render(parts, build_context({"v": "a\nBcc: x"}))
    assert got.text == "a\nBcc: x"


def test_compiled_templates_are_cached() -> None:
    r = Renderer()
    first = r.compile("Hello {{ name }}")
    assert r.compile("Hello {{ name }}") is first
    assert r.compile("Hello {{ name }}", html=True) is not first  # other escaping, other entry
    assert r.compile("Hello {{ name }}!") is not first


def test_errors_from_template_logic_are_template_error(renderer: Renderer) -> None:
    with pytest.raises(TemplateError) as info:
        render_body(renderer, "{{ 1 / n }}", {"n": 0})
    assert info.value.code == "template_error"
    assert "ZeroDivisionError" in info.value.message


# --- bugs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    ["{{ '{:>1000000}'.format(1)|length }}", "{{ x|attr('format')(1)|length }}"],
)
def test_str_format_method_width_is_bounded_like_the_filter(
    renderer: Renderer, source: str
) -> None:
    with pytest.raises(TemplateError) as info:
        render_body(renderer, source, {"x": "{0:>1000000}"})
    assert info.value.code == "template_limit"


def test_format_filter_width_with_a_mapping_key_is_bounded(renderer: Renderer) -> None:
    with pytest.raises(TemplateError) as info:
        render_body(renderer, "{{ '%(a)1000000s'|format(a=1)|length }}")
    assert info.value.code == "template_limit"


def test_recursive_loops_count_against_the_budget() -> None:
    small = Renderer(loop_budget=10)
    source = (
        "{% for x in range(5) recursive %}"
        "{% if loop.depth < 2 %}{{ loop(range(5)) }}{% endif %}"
        "{% endfor %}"
    )  # 5 + 25 = 30 iterations
    with pytest.raises(TemplateError) as info:
        render_body(small, source)
    assert info.value.code == "template_limit"


def test_deeply_nested_expression_is_a_template_error() -> None:
    source = "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}"  # well under max_source
    with pytest.raises(TemplateError) as info:
        Renderer().compile(source)
    assert info.value.code in {"template_syntax", "template_limit"}


def test_replace_amplification_is_bounded_by_max_output() -> None:
    small = Renderer(max_output=1000)
    with pytest.raises(TemplateError) as info:
        render_body(small, "{{ (('a'*1000)|replace('', 'b'*1000))|length }}")  # 1,002,000 chars
    assert info.value.code == "template_limit"


def test_tojson_positional_indent_is_bounded(renderer: Renderer) -> None:
    with pytest.raises(TemplateError) as info:
        render_body(renderer, "{{ [1]|tojson(1000000)|length }}")
    assert info.value.code == "template_limit"
