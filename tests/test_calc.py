"""The calc tool: arithmetic right, everything else refused as text, fast on adversarial input."""

from __future__ import annotations

import time

import pytest

from trgrpo.run.records import Example
from trgrpo.tasks.calc import MAX_EXPRESSION_CHARS, CalcTool, evaluate

EXAMPLE = Example("x", "prompt", "0")


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2", "3"),
        ("2018 - 1875", "143"),
        ("-(3 - 10) * 2", "14"),
        ("7 / 2", "3.5"),
        ("6 / 3", "2"),
        ("7 // 2", "3"),
        ("-7 % 3", "2"),
        ("2 ** 10", "1024"),
        ("2 ^ 10", "1024"),
        ("3 × 4 ÷ 2", "6"),
        ("1.5 * 4", "6"),
        ("+5", "5"),
        ("2 ** -1", "0.5"),
        ("((1 + 2) * (3 + 4))", "21"),
        ("  12  ", "12"),
        ("1 / 3", "0.3333333333"),
        ("-" * 199 + "1", "-1"),  # deep but legal nesting
    ],
)
def test_arithmetic(expression: str, expected: str) -> None:
    assert evaluate(expression) == expected


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('echo hi')",
        "().__class__.__bases__[0].__subclasses__()",
        "(1).real",
        "x + 1",
        "abs(-3)",
        "lambda: 1",
        "[1, 2]",
        "'a' * 3",
        "True + 1",
        "1 if 1 else 2",
        "1 < 2",
        "1 & 3",
        "1 << 62",
        "9**9**9",
        "10 ** 100",
        "2 ** 1e9",
        "(-8) ** 0.5",
        "1e300 * 1e300",
        "10 ** 16",
        "99999999999999999999",
        "1 / 0",
        "5 // 0",
        "5 % 0",
        "0 ** -1",
        "0.5 ** -2000",
        "",
        "1 +",
        "1\x00+1",
        "(" * 150 + "1" + ")" * 150,
        "1+" * 1000 + "1",
    ],
)
def test_refused_as_text(expression: str) -> None:
    start = time.perf_counter()
    result = evaluate(expression)
    assert time.perf_counter() - start < 0.5
    assert result.startswith("error:"), (expression, result)


def test_long_input_is_refused_before_parsing() -> None:
    assert "longer than" in evaluate("1" * (MAX_EXPRESSION_CHARS + 1))


def test_tool_wraps_the_result() -> None:
    tool = CalcTool()
    assert (tool.name, tool.open_tag, tool.close_tag) == ("calc", "<calc>", "</calc>")
    assert tool("40 + 2", EXAMPLE) == "<result>42</result>"
    assert tool("os.getcwd()", EXAMPLE).startswith("<result>error:")
