"""The calculator behind <calc>: arithmetic on exact rationals, parsed by a small
recursive-descent parser of its own. Model text is never handed to Python's eval; anything that
is not arithmetic (names, attributes, strings, ...) is refused with what and where."""

from __future__ import annotations

import math
import re
from fractions import Fraction

MAX_LENGTH = 500
MAX_DEPTH = 50
MAX_EXPONENT = 1000
MAX_DIGITS = 1000
SIGNIFICANT = 12
FUNCTIONS = ("sqrt", "abs", "round", "min", "max", "floor", "ceil")
ALLOWED = "numbers, + - * / // % ^ (or **), parentheses and " + ", ".join(FUNCTIONS)


class CalcError(ValueError):
    def __init__(self, message: str, offset: int):
        self.message, self.offset = message, offset
        super().__init__(f"at offset {offset}: {message}")


_TOKEN = re.compile(r"\s*(?:(?P<num>\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)"
                    r"|(?P<name>[A-Za-z_]\w*)|(?P<op>\*\*|//|[-+*/%^(),]))")
_UNICODE = str.maketrans({"×": "*", "÷": "/", "−": "-", "·": "*"})


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            at = len(text) - len(text[pos:].lstrip())
            what = text[at]
            hint = {".": "attribute access is not arithmetic", "[": "subscripts are not "
                    "arithmetic", "'": "strings are not arithmetic", '"': "strings are not "
                    "arithmetic", "=": "assignments and comparisons are not arithmetic"}.get(
                        what, f"unexpected character {what!r}")
            raise CalcError(f"{hint}; use {ALLOWED}", at)
        kind = m.lastgroup
        out.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    out.append(("end", "", len(text)))
    return out


def _check_power(base: Fraction, exponent: Fraction, offset: int) -> None:
    if exponent.denominator != 1:
        return
    if abs(exponent) > MAX_EXPONENT:
        raise CalcError(f"exponent {exponent} is too large (at most {MAX_EXPONENT})", offset)
    # Digits of the result, estimated from the base's numerator and denominator.
    size = max(abs(base.numerator), base.denominator, 1)
    if math.log10(size) * abs(int(exponent)) > MAX_DIGITS:
        raise CalcError(f"the result would have more than {MAX_DIGITS} digits", offset)


class _Parser:
    def __init__(self, text: str):
        self.tokens, self.i, self.depth = _tokens(text), 0, 0

    @property
    def peek(self):
        return self.tokens[self.i]

    def take(self):
        token = self.tokens[self.i]
        self.i += 1
        return token

    def expect(self, value: str) -> None:
        kind, text, at = self.take()
        if text != value:
            raise CalcError(f"expected {value!r}, found {text or 'the end'!r}", at)

    def expression(self) -> Fraction:
        value = self.term()
        while self.peek[1] in ("+", "-"):
            op = self.take()[1]
            value = value + self.term() if op == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek[1] in ("*", "/", "//", "%"):
            _, op, at = self.take()
            right = self.unary()
            if op != "*" and right == 0:
                raise CalcError("division by zero", at)
            value = {"*": lambda: value * right, "/": lambda: value / right,
                     "//": lambda: Fraction(math.floor(value / right)),
                     "%": lambda: value - right * math.floor(value / right)}[op]()
        return value

    def unary(self) -> Fraction:
        if self.peek[1] in ("+", "-"):
            op = self.take()[1]
            value = self.unary()
            return -value if op == "-" else value
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek[1] in ("^", "**"):
            at = self.take()[2]
            exponent = self.unary()  # right-associative: 2^3^2 = 2^9
            return _power(base, exponent, at)
        return base

    def atom(self) -> Fraction:
        kind, text, at = self.take()
        if kind == "num":
            return Fraction(text)
        if text == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise CalcError(f"nested deeper than {MAX_DEPTH} parentheses", at)
            value = self.expression()
            self.expect(")")
            self.depth -= 1
            return value
        if kind == "name":
            if text not in FUNCTIONS:
                raise CalcError(f"names are not allowed ({text!r}); use {ALLOWED}", at)
            return self.call(text, at)
        raise CalcError(f"expected a number or '(', found {text or 'the end'!r}", at)

    def call(self, name: str, at: int) -> Fraction:
        self.expect("(")
        args = [self.expression()]
        while self.peek[1] == ",":
            self.take()
            args.append(self.expression())
        self.expect(")")
        arity = {"min": None, "max": None, "round": (1, 2)}.get(name, (1,))
        if arity is not None and len(args) not in arity:
            raise CalcError(f"{name} takes {' or '.join(map(str, arity))} argument(s)", at)
        if name == "sqrt":
            if args[0] < 0:
                raise CalcError("square root of a negative number", at)
            return _power(args[0], Fraction(1, 2), at)
        if name == "round":
            digits = int(args[1]) if len(args) == 2 else 0
            return Fraction(round(args[0], digits))
        if name in ("min", "max"):
            return (min if name == "min" else max)(args)
        return Fraction({"abs": abs, "floor": math.floor, "ceil": math.ceil}[name](args[0]))


def _power(base: Fraction, exponent: Fraction, at: int) -> Fraction:
    _check_power(base, exponent, at)
    if base == 0 and exponent < 0:
        raise CalcError("division by zero (zero to a negative power)", at)
    if exponent.denominator == 1:
        return base ** int(exponent)
    if base < 0:
        raise CalcError("a negative number to a fractional power is not real", at)
    # Exact when the root is exact (sqrt(16) = 4); otherwise a float.
    root = exponent.denominator
    num, den = _int_root(base.numerator, root), _int_root(base.denominator, root)
    if num is not None and den is not None:
        return _power(Fraction(num, den), Fraction(exponent.numerator), at)
    value = float(base) ** float(exponent)
    if not math.isfinite(value):
        raise CalcError("the result is too large", at)
    return Fraction(value)


def _int_root(n: int, k: int) -> int | None:
    guess = round(n ** (1 / k)) if n < 2 ** 1000 else None
    if guess is None:
        return None
    for r in (guess - 1, guess, guess + 1):
        if r >= 0 and r ** k == n:
            return r
    return None


def format_number(value: Fraction) -> str:
    """Integers exactly; other values to 12 significant digits."""
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(value):.{SIGNIFICANT}g}"
    return text


def evaluate(expression: str) -> str:
    text = expression.translate(_UNICODE)
    if not text.strip():
        raise CalcError(f"empty expression; use {ALLOWED}", 0)
    if len(text) > MAX_LENGTH:
        raise CalcError(f"expression longer than {MAX_LENGTH} characters", MAX_LENGTH)
    parser = _Parser(text)
    value = parser.expression()
    kind, rest, at = parser.peek
    if kind != "end":
        hint = "; write numbers without thousands separators" if rest == "," else ""
        raise CalcError(f"unexpected {rest!r} after a complete expression{hint}", at)
    if abs(value.numerator) >= 10 ** MAX_DIGITS * value.denominator:
        raise CalcError(f"the result has more than {MAX_DIGITS} digits", 0)
    return format_number(value)
