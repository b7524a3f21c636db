"""The calculator tool (book chapter 15): arithmetic a language model should never do in its head.

A small recursive-descent parser, never `eval`: numbers (`525.6`, `1e-3`, `1_000`), `+ - * / // %`, powers
(`^` or `**`, right-associative, binding tighter than a leading minus: `-2^2` is -4), factorial `n!`,
parentheses, the constants `pi`, `e`, `tau`, and the functions in `FUNCTIONS`.

Exact decimals: numbers are exact fractions (`fractions.Fraction`), so `0.1 + 0.2` is 0.3 and the book's
`525.6 * 315 / 3942` is exactly 42; a result is printed exactly when its decimal expansion ends, else rounded to
`DIGITS` significant digits and marked approximate (`1/3` -> `0.3333...` with `exact=False`). Irrational functions
(`sqrt(2)`, `sin`, `log`, a fractional power) are computed with `decimal` at `DIGITS + 10` digits and make the result
approximate.

Limits (an answer never costs unbounded time or memory): at most `MAX_INPUT` characters and `MAX_DEPTH` nested
levels; a power's result at most `MAX_BITS` bits (`9^9^9` is refused, not computed); `n!` for n <= `MAX_FACTORIAL`;
numbers' exponents within +-`MAX_EXPONENT`. Everything that goes wrong is a `CalculatorError` with one line.
"""

from __future__ import annotations

import decimal
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

MAX_INPUT = 500
MAX_DEPTH = 60
MAX_BITS = 20_000  # about 6,000 decimal digits
MAX_FACTORIAL = 1000
MAX_EXPONENT = 1000  # 1e1000 is accepted; 1e1001 is not
DIGITS = 30  # significant digits of an inexact result

Number = Fraction


class CalculatorError(ValueError):
    """The expression cannot be computed (bad syntax, a division by zero, a limit passed)."""


@dataclass(frozen=True)
class Answer:
    value: Fraction
    exact: bool  # False when rounding happened (an irrational function or a non-terminating division's display)
    text: str  # the value as it should be shown


TOKEN = re.compile(r"\s*(?:(?P<number>(?:\d[\d_]*\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z_0-9]*)"
                   r"|(?P<op>\*\*|//|[-+*/%^(),!×÷−]))")
SYNONYMS = {"×": "*", "÷": "/", "−": "-", "**": "^"}


def _context() -> decimal.Context:
    return decimal.Context(prec=DIGITS + 10, Emax=MAX_EXPONENT * 4, Emin=-MAX_EXPONENT * 4,
                           traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow])


def _to_decimal(x: Fraction, ctx: decimal.Context) -> decimal.Decimal:
    return ctx.divide(decimal.Decimal(x.numerator), decimal.Decimal(x.denominator))


def _from_decimal(x: decimal.Decimal) -> Fraction:
    if not x.is_finite():
        raise CalculatorError("the result is not a finite number")
    return Fraction(x)


def _check_size(x: Fraction) -> Fraction:
    if x.numerator.bit_length() > MAX_BITS or x.denominator.bit_length() > MAX_BITS:
        raise CalculatorError(f"a number in this calculation passes the limit of {MAX_BITS} bits "
                              f"(about {int(MAX_BITS * 0.301)} digits)")
    return x


def _irrational(name: str, fn: Callable[[decimal.Decimal, decimal.Context], decimal.Decimal],
                check: Callable[[Fraction], str | None] | None = None) -> Callable[[Fraction], tuple[Fraction, bool]]:
    def apply(x: Fraction) -> tuple[Fraction, bool]:
        if check is not None and (why := check(x)):
            raise CalculatorError(f"{name}({_show(x)}): {why}")
        ctx = _context()
        try:
            return _check_size(_from_decimal(fn(_to_decimal(x, ctx), ctx))), False
        except (decimal.InvalidOperation, decimal.Overflow, OverflowError):
            raise CalculatorError(f"{name}({_show(x)}) is out of range") from None
    return apply


def _trig(fn: Callable[[float], float]) -> Callable[[decimal.Decimal, decimal.Context], decimal.Decimal]:
    # Trigonometric functions in double precision (15-16 digits), the one place the calculator uses floats.
    def apply(x: decimal.Decimal, ctx: decimal.Context) -> decimal.Decimal:
        if abs(x) > 10**15:
            raise CalculatorError("the angle is too large for an accurate sine or cosine")
        return decimal.Decimal(repr(fn(float(x))))
    return apply


def _sqrt(x: Fraction) -> tuple[Fraction, bool]:
    if x < 0:
        raise CalculatorError(f"sqrt({_show(x)}): the square root of a negative number is not real")
    # An exact square (of integers or fractions) stays exact.
    rn, rd = math.isqrt(x.numerator), math.isqrt(x.denominator)
    if rn * rn == x.numerator and rd * rd == x.denominator:
        return Fraction(rn, rd), True
    return _irrational("sqrt", lambda d, c: c.sqrt(d))(x)


def _positive(x: Fraction) -> str | None:
    return None if x > 0 else "defined only for positive numbers"


def _integer_fn(name: str, fn: Callable[[Fraction], int]) -> Callable[[Fraction], tuple[Fraction, bool]]:
    return lambda x: (Fraction(fn(x)), True)


FUNCTIONS: dict[str, Callable[[Fraction], tuple[Fraction, bool]]] = {
    "sqrt": _sqrt,
    "abs": lambda x: (abs(x), True),
    "floor": _integer_fn("floor", math.floor),
    "ceil": _integer_fn("ceil", math.ceil),
    "round": _integer_fn("round", round),
    "exp": _irrational("exp", lambda d, c: c.exp(d)),
    "ln": _irrational("ln", lambda d, c: c.ln(d), _positive),
    "log": _irrational("log", lambda d, c: c.log10(d), _positive),
    "log10": _irrational("log10", lambda d, c: c.log10(d), _positive),
    "log2": _irrational("log2", lambda d, c: c.divide(c.ln(d), c.ln(decimal.Decimal(2))), _positive),
    "sin": _irrational("sin", _trig(math.sin)),
    "cos": _irrational("cos", _trig(math.cos)),
    "tan": _irrational("tan", _trig(math.tan)),
    "asin": _irrational("asin", _trig(math.asin), lambda x: None if -1 <= x <= 1 else "defined on [-1, 1]"),
    "acos": _irrational("acos", _trig(math.acos), lambda x: None if -1 <= x <= 1 else "defined on [-1, 1]"),
    "atan": _irrational("atan", _trig(math.atan)),
}
PI = "3.14159265358979323846264338327950288419716939937510582097494459"
E = "2.71828182845904523536028747135266249775724709369995957496696763"
CONSTANTS = {"pi": (Fraction(PI), False), "π": (Fraction(PI), False), "e": (Fraction(E), False),
             "tau": (2 * Fraction(PI), False)}


class _Parser:
    def __init__(self, text: str):
        self.tokens = self._tokenize(text)
        self.i = 0
        self.depth = 0
        self.exact = True

    @staticmethod
    def _tokenize(text: str) -> list[tuple[str, str]]:
        tokens, pos = [], 0
        text = text.replace("π", "pi")
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                bad = text[pos:].lstrip()[:1]
                raise CalculatorError(f"unexpected character {bad!r} at position {len(text) - len(text[pos:].lstrip())}"
                                      "; use numbers, + - * / // % ^ !, parentheses, constants and functions "
                                      f"({', '.join(sorted(FUNCTIONS))})")
            kind = m.lastgroup or ""
            value = m.group(kind)
            tokens.append((kind, SYNONYMS.get(value, value)))
            pos = m.end()
        return tokens

    def peek(self) -> str | None:
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        if self.i >= len(self.tokens):
            raise CalculatorError("the expression ends too early")
        token = self.tokens[self.i]
        self.i += 1
        return token

    def expect(self, op: str) -> None:
        kind, value = self.take()
        if value != op:
            raise CalculatorError(f"expected {op!r}, found {value!r}")

    def parse(self) -> Fraction:
        if not self.tokens:
            raise CalculatorError("the expression is empty")
        value = self.expression()
        if self.i < len(self.tokens):
            raise CalculatorError(f"unexpected {self.tokens[self.i][1]!r} after a complete expression")
        return value

    def nested(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalculatorError(f"the expression nests deeper than {MAX_DEPTH} levels")

    def expression(self) -> Fraction:
        self.nested()
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()[1]
            right = self.term()
            value = _check_size(value + right if op == "+" else value - right)
        self.depth -= 1
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/", "//", "%"):
            op = self.take()[1]
            right = self.unary()
            if op == "*":
                value = value * right
            elif right == 0:
                raise CalculatorError("division by zero")
            elif op == "/":
                value = value / right
            elif op == "//":
                value = Fraction(value // right)
            else:
                value = value % right
            value = _check_size(value)
        return value

    def unary(self) -> Fraction:
        if self.peek() in ("+", "-"):
            op = self.take()[1]
            self.nested()
            value = self.unary()
            self.depth -= 1
            return -value if op == "-" else value
        return self.power()

    def power(self) -> Fraction:
        base = self.postfix()
        if self.peek() == "^":
            self.take()
            self.nested()
            exponent = self.unary()  # right-associative: 2^3^2 = 2^9
            self.depth -= 1
            return self.raise_to(base, exponent)
        return base

    def raise_to(self, base: Fraction, exponent: Fraction) -> Fraction:
        if base == 0 and exponent < 0:
            raise CalculatorError("zero cannot be raised to a negative power (division by zero)")
        if exponent.denominator == 1:
            n = abs(exponent.numerator)
            size = max(base.numerator.bit_length(), base.denominator.bit_length())
            if base not in (0, 1, -1) and (size - 1) * n > MAX_BITS:
                raise CalculatorError(f"the power {_show(base)}^{_show(exponent)} would pass the limit of "
                                      f"{MAX_BITS} bits (about {int(MAX_BITS * 0.301)} digits)")
            return _check_size(base ** exponent.numerator)
        if base < 0:
            raise CalculatorError(f"{_show(base)}^{_show(exponent)} is not a real number (a negative base with a "
                                  "fractional exponent)")
        if base == 0:
            return Fraction(0)
        self.exact = False
        ctx = _context()
        try:
            log_size = abs(float(exponent) * math.log10(float(base)))
        except (OverflowError, ValueError):
            log_size = math.inf
        if log_size > MAX_BITS * 0.301:
            raise CalculatorError(f"the power {_show(base)}^{_show(exponent)} is too large")
        try:
            return _check_size(_from_decimal(ctx.power(_to_decimal(base, ctx), _to_decimal(exponent, ctx))))
        except (decimal.InvalidOperation, decimal.Overflow):
            raise CalculatorError(f"the power {_show(base)}^{_show(exponent)} is out of range") from None

    def postfix(self) -> Fraction:
        value = self.primary()
        while self.peek() == "!":
            self.take()
            if value.denominator != 1 or value < 0:
                raise CalculatorError(f"{_show(value)}! : the factorial is defined for whole numbers >= 0")
            if value > MAX_FACTORIAL:
                raise CalculatorError(f"{_show(value)}! is too large (the limit is {MAX_FACTORIAL}!)")
            value = _check_size(Fraction(math.factorial(int(value))))
        return value

    def primary(self) -> Fraction:
        kind, value = self.take()
        if kind == "number":
            return _number(value)
        if value == "(":
            inner = self.expression()
            self.expect(")")
            return inner
        if kind == "name":
            name = value.lower()
            if name in CONSTANTS:
                number, exact = CONSTANTS[name]
                self.exact = self.exact and exact
                return number
            if name in FUNCTIONS:
                self.expect("(")
                argument = self.expression()
                self.expect(")")
                result, exact = FUNCTIONS[name](argument)
                self.exact = self.exact and exact
                return result
            raise CalculatorError(f"unknown name {value!r}; functions: {', '.join(sorted(FUNCTIONS))}; constants: "
                                  "pi, e, tau")
        raise CalculatorError(f"unexpected {value!r}")


def _number(text: str) -> Fraction:
    mantissa, _, exponent = text.lower().replace("_", "").partition("e")
    if exponent and abs(int(exponent)) > MAX_EXPONENT:
        raise CalculatorError(f"the number {text} passes the limit of 1e{MAX_EXPONENT}")
    try:
        return _check_size(Fraction(mantissa) * Fraction(10) ** int(exponent or 0))
    except ValueError:
        raise CalculatorError(f"{text!r} is not a number") from None


def _terminates(x: Fraction) -> bool:
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _show(x: Fraction, digits: int = DIGITS, exact: bool = True) -> str:
    """A fraction as decimal text: all its digits when it is exact and its expansion ends (and is short), else
    `digits` significant digits."""
    if x.denominator == 1 and (exact or x.numerator.bit_length() < 90):
        return str(x.numerator)
    if exact and _terminates(x) and x.denominator.bit_length() < 200:
        with decimal.localcontext(decimal.Context(prec=10_000)) as ctx:
            text = format(ctx.divide(decimal.Decimal(x.numerator), decimal.Decimal(x.denominator)), "f")
        return text
    with decimal.localcontext(decimal.Context(prec=digits)) as ctx:
        value = ctx.divide(decimal.Decimal(x.numerator), decimal.Decimal(x.denominator))
    text = format(value, "f") if abs(value.adjusted()) < 30 else format(value, "e")
    return text.rstrip("0").rstrip(".") if "." in text and "e" not in text else text


def calculate(expression: str) -> Answer:
    """Compute `expression` (see the module docstring); a `CalculatorError` says what was wrong."""
    if not isinstance(expression, str):
        raise CalculatorError("the expression must be text")
    if len(expression) > MAX_INPUT:
        raise CalculatorError(f"the expression is {len(expression)} characters long; the limit is {MAX_INPUT}")
    parser = _Parser(expression)
    value = parser.parse()
    exact = parser.exact and _terminates(value)
    return Answer(value, exact, _show(value, exact=parser.exact))


# An arithmetic expression inside a message: at least two numbers joined by operators (the orchestrator's rule for
# sending a question to the calculator), e.g. "what is 525.6 * 315 / 3942?" or "(2+3)^2".
_NUM = r"(?:\d[\d_]*(?:\.\d+)?|\.\d+)(?:[eE][+-]?\d+)?"
_OPERAND = rf"(?:[-+(\s]*(?:{_NUM}|pi|sqrt\s*\(|[(])[)\s!]*)"
EXPRESSION_IN_TEXT = re.compile(rf"{_OPERAND}(?:\s*(?:\*\*|//|[-+*/%^×÷−])\s*{_OPERAND})+|sqrt\s*\(\s*{_NUM}\s*\)")


def find_expression(text: str) -> str | None:
    """The longest arithmetic expression in `text` that the calculator can compute, or None."""
    best: str | None = None
    for match in EXPRESSION_IN_TEXT.finditer(text):
        candidate = match.group(0).strip()
        # Balance parentheses the regular expression could not see
        candidate = candidate.strip()
        while candidate.count("(") > candidate.count(")") and candidate.startswith("("):
            candidate = candidate[1:].strip()
        while candidate.count(")") > candidate.count("(") and candidate.endswith(")"):
            candidate = candidate[:-1].strip()
        try:
            calculate(candidate)
        except CalculatorError:
            continue
        if best is None or len(candidate) > len(best):
            best = candidate
    return best
