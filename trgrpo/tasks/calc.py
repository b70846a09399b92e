"""The `calc` tool: arithmetic on numbers by walking a Python `ast` with a whitelist of node types.

It never calls `eval`/`exec` and never raises on model output: every error (a name, an attribute, a
call, a huge power, division by zero, an over-long input) comes back as text the policy can read, e.g.
`<result>error: names are not allowed</result>`. Sizes are bounded before work is done (input length,
exponent, digits of every intermediate result), so no expression can take noticeable time or memory.
"""

from __future__ import annotations

import ast
import math
import operator

from trgrpo.run.records import Example

MAX_EXPRESSION_CHARS = 200  # longer inputs are refused before parsing
MAX_MAGNITUDE = 1e15  # |value| of every constant and intermediate result
MAX_POWER_BITS = 60  # a power's result may need at most this many bits (checked before computing it)
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_SPELLINGS = {"×": "*", "÷": "/", "−": "-", "^": "**"}  # what people (and models) write for the operators


class CalcError(ValueError):
    """An expression the calculator refuses; the message is shown to the policy."""


def _check(value: int | float) -> int | float:
    if isinstance(value, complex) or not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise CalcError("result out of range")
    return value


def _power(base: int | float, exponent: int | float) -> int | float:
    if abs(exponent) > 1000:
        raise CalcError("exponent too large")
    if abs(base) > 1 and exponent > 0 and exponent * math.log2(abs(base)) > MAX_POWER_BITS:
        raise CalcError("result out of range")
    return base**exponent


def _walk(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise CalcError("only numbers are allowed")
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _check(_UNARY[type(node.op)](_walk(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow):
            return _check(_power(left, right))
        return _check(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Name):
        raise CalcError("names are not allowed")
    if isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
        raise CalcError("only + - * / // % ** and parentheses are allowed")
    raise CalcError(f"unsupported syntax: {type(node).__name__}")


def _format(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)


def evaluate(expression: str) -> str:
    """The value of an arithmetic expression as text, or "error: …"; never raises."""
    try:
        if len(expression) > MAX_EXPRESSION_CHARS:
            raise CalcError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
        for written, python in _SPELLINGS.items():
            expression = expression.replace(written, python)
        tree = ast.parse(expression.strip(), mode="eval")
        return _format(_walk(tree))
    except CalcError as err:
        return f"error: {err}"
    except ZeroDivisionError:
        return "error: division by zero"
    except (SyntaxError, ValueError):
        return "error: not an arithmetic expression"
    except (OverflowError, ArithmeticError):
        return "error: result out of range"
    except Exception as err:  # a tool never raises on model output
        return f"error: {type(err).__name__}"


class CalcTool:
    """`<calc>expression</calc>` → `<result>value</result>`."""

    name = "calc"
    open_tag = "<calc>"
    close_tag = "</calc>"

    def __call__(self, query: str, example: Example) -> str:
        return f"<result>{evaluate(query)}</result>"
