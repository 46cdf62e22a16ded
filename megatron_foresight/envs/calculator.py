"""The calculator behind <calc>: arithmetic on exact rationals, read by a recursive-descent parser
of its own. Model text is never handed to Python's eval; anything that is not arithmetic (names,
attributes, strings, ...) is refused with what is wrong, where, and what is allowed. Sizes are
checked before anything is computed, so no expression can make it run for long."""

from __future__ import annotations

import math
import re
from decimal import ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction
from typing import NamedTuple

MAX_LENGTH = 500
MAX_DEPTH = 50
MAX_EXPONENT = 1000
MAX_DIGITS = 1000  # of a power's numerator or denominator; every value stays <= 10^1000
SIGNIFICANT = 12  # digits shown of a value that is not an integer
EXACT_ROOTS = 64  # highest root tried exactly (8^(1/3) = 2); beyond, roots are approximated
# The functions and the most arguments each takes (None: any number; every call has one).
FUNCTIONS = {"sqrt": 1, "abs": 1, "round": 2, "min": None, "max": None, "floor": 1, "ceil": 1}
ALLOWED = "use numbers, + - * / // % ^ ( ) and the functions " + ", ".join(FUNCTIONS)

_LIMIT = 10 ** MAX_DIGITS
_TOKEN = re.compile(r"(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
                    r"|(?P<name>[A-Za-z_]\w*)|(?P<op>\*\*|//|[-+*/%^(),])")
_UNICODE = str.maketrans({"×": "*", "÷": "/", "−": "-", "·": "*"})
# Characters of Python (or of other notations) that have no place in arithmetic, and why.
_FOREIGN = {
    ".": "attribute access is not arithmetic",
    "[": "subscripts and lists are not arithmetic",
    "]": "subscripts and lists are not arithmetic",
    "'": "strings are not arithmetic",
    '"': "strings are not arithmetic",
    "=": "'=' is not arithmetic (no assignments, comparisons or keyword arguments)",
    "<": "comparisons are not arithmetic",
    ">": "comparisons are not arithmetic",
    "!": "comparisons and factorials are not allowed",
    "{": "braces are not arithmetic",
    "}": "braces are not arithmetic",
}


class CalcError(ValueError):
    """An expression the calculator refuses: `message` says what is wrong (and what is allowed),
    `offset` is where in the expression."""

    def __init__(self, message: str, offset: int):
        self.message, self.offset = message, offset
        super().__init__(f"at offset {offset}: {message}")

    def __reduce__(self):
        return CalcError, (self.message, self.offset)


class _Token(NamedTuple):
    kind: str  # number, name, op or end
    text: str
    at: int


def _tokens(text: str) -> list[_Token]:
    out, pos = [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return out + [_Token("end", "", pos)]
        match = _TOKEN.match(text, pos)
        if match is None:
            char = text[pos]
            problem = _FOREIGN.get(char, f"unexpected character {char!r}")
            raise CalcError(f"{problem}; {ALLOWED}", pos)
        out.append(_Token(match.lastgroup, match.group(), pos))
        pos = match.end()


def _number(token: _Token) -> Fraction:
    mantissa, _, exponent = token.text.lower().partition("e")
    if exponent and abs(int(exponent)) > MAX_DIGITS:
        raise CalcError(f"exponent {int(exponent)} is too large (at most {MAX_DIGITS})",
                        token.at)
    return _bounded(Fraction(mantissa) * Fraction(10) ** int(exponent or 0), token.at)


def _bounded(value: Fraction, at: int) -> Fraction:
    if abs(value.numerator) > _LIMIT * value.denominator:
        raise CalcError(f"the result is larger than 10^{MAX_DIGITS}", at)
    return value


def _log10(value: Fraction) -> float:
    """log10 of a positive value, whatever its size (math.log10 takes ints of any size)."""
    return math.log10(value.numerator) - math.log10(value.denominator)


def _exact_root(n: int, k: int) -> int | None:
    """The integer k-th root of n >= 0 when n is a perfect k-th power, else None."""
    if n < 2:
        return n
    x = 1 << -(-n.bit_length() // k)  # a power of two at or above the root; Newton from above
    while True:
        y = ((k - 1) * x + n // x ** (k - 1)) // k
        if y >= x:
            return x if x ** k == n else None
        x = y


def _power(base: Fraction, exponent: Fraction, at: int) -> Fraction:
    if abs(exponent) > MAX_EXPONENT:
        raise CalcError(f"exponent {_text(exponent)} is too large (at most {MAX_EXPONENT})", at)
    if base == 0:
        if exponent < 0:
            raise CalcError("division by zero (zero to a negative power)", at)
        return Fraction(0) if exponent else Fraction(1)
    if exponent.denominator == 1:
        # Digits of the numerator or denominator, estimated before computing them.
        digits = abs(exponent) * max(math.log10(abs(base.numerator)), math.log10(base.denominator))
        if digits > MAX_DIGITS:
            raise CalcError(f"the result would have more than {MAX_DIGITS} digits", at)
        return base ** int(exponent)
    if base < 0:
        raise CalcError("a negative number to a fractional power is not real", at)
    magnitude = float(exponent) * _log10(base)
    if abs(magnitude) > MAX_DIGITS:
        raise CalcError(f"the result would have more than {MAX_DIGITS} digits", at)
    if exponent.denominator <= EXACT_ROOTS:
        num = _exact_root(base.numerator, exponent.denominator)
        den = _exact_root(base.denominator, exponent.denominator)
        if num is not None and den is not None:
            return _power(Fraction(num, den), Fraction(exponent.numerator), at)
    with localcontext() as ctx:
        # Digits past the point too, so that no approximation of a large value is an integer
        # (printed in full as if exact); and to spare, so more arithmetic keeps 12 digits right.
        ctx.prec = max(math.ceil(magnitude), 0) + 2 * SIGNIFICANT + 6
        value = ((Decimal(base.numerator) / Decimal(base.denominator))
                 ** (Decimal(exponent.numerator) / Decimal(exponent.denominator)))
    return Fraction(value)


def _round(value: Fraction, digits: int) -> Fraction:
    # Halves go away from zero, as taught (Python's round goes to even: round(2.5) = 2).
    shift = Fraction(10) ** digits
    magnitude = math.floor(abs(value) * shift + Fraction(1, 2)) / shift
    return magnitude if value >= 0 else -magnitude


class _Parser:
    def __init__(self, text: str):
        self.tokens, self.i, self.depth = _tokens(text), 0, 0

    @property
    def token(self) -> _Token:
        return self.tokens[self.i]

    def advance(self) -> _Token:
        self.i += 1
        return self.tokens[self.i - 1]

    def expect(self, text: str) -> None:
        token = self.advance()
        if token.text != text:
            raise CalcError(f"expected {text!r}, found {token.text or 'the end'!r}", token.at)

    def nest(self, at: int) -> None:
        # Parentheses, calls and exponents recurse; bounding them bounds Python's stack.
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalcError(f"nested deeper than {MAX_DEPTH} levels", at)

    def expression(self) -> Fraction:
        value = self.term()
        while self.token.text in ("+", "-"):
            op = self.advance()
            right = self.term()
            value = _bounded(value + right if op.text == "+" else value - right, op.at)
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.token.text in ("*", "/", "//", "%"):
            op = self.advance()
            right = self.unary()
            if op.text != "*" and right == 0:
                raise CalcError("division by zero", op.at)
            value = _bounded({"*": lambda: value * right, "/": lambda: value / right,
                              "//": lambda: Fraction(value // right),
                              "%": lambda: value % right}[op.text](), op.at)
        return value

    def unary(self) -> Fraction:
        # A loop, not recursion: "- - - 1" is not nesting.
        negative = False
        while self.token.text in ("+", "-"):
            negative ^= self.advance().text == "-"
        value = self.power()  # binds tighter than the sign: -2^2 = -4
        return -value if negative else value

    def power(self) -> Fraction:
        base = self.atom()
        if self.token.text not in ("^", "**"):
            return base
        op = self.advance()
        self.nest(op.at)
        exponent = self.unary()  # right-associative: 2^3^2 = 2^9
        self.depth -= 1
        return _bounded(_power(base, exponent, op.at), op.at)

    def atom(self) -> Fraction:
        token = self.advance()
        if token.kind == "number":
            return _number(token)
        if token.text == "(":
            self.nest(token.at)
            value = self.expression()
            self.expect(")")
            self.depth -= 1
            return value
        if token.kind == "name":
            if token.text not in FUNCTIONS:
                raise CalcError(f"names are not allowed ({token.text!r}); {ALLOWED}", token.at)
            return self.call(token)
        raise CalcError(f"expected a number or '(', found {token.text or 'the end'!r}", token.at)

    def call(self, name: _Token) -> Fraction:
        self.nest(name.at)
        self.expect("(")
        args = [self.expression()]
        while self.token.text == ",":
            self.advance()
            args.append(self.expression())
        self.expect(")")
        self.depth -= 1
        return _apply(name, args)


def _apply(name: _Token, args: list[Fraction]) -> Fraction:
    most = FUNCTIONS[name.text]
    if most is not None and len(args) > most:
        count = "1 argument" if most == 1 else f"1 or {most} arguments"
        raise CalcError(f"{name.text} takes {count}, got {len(args)}", name.at)
    x = args[0]
    if name.text == "sqrt":
        if x < 0:
            raise CalcError("the square root of a negative number is not real", name.at)
        return _power(x, Fraction(1, 2), name.at)
    if name.text == "round":
        digits = args[1] if len(args) == 2 else Fraction(0)
        if digits.denominator != 1 or abs(digits) > MAX_DIGITS:
            raise CalcError(f"round's digits must be a whole number from -{MAX_DIGITS} to "
                            f"{MAX_DIGITS}", name.at)
        return _round(x, int(digits))
    if name.text in ("min", "max"):
        return (min if name.text == "min" else max)(args)
    return Fraction({"abs": abs, "floor": math.floor, "ceil": math.ceil}[name.text](x))


def _text(value: Fraction) -> str:
    """Integers in full; other values to 12 significant digits, rounded half up, written as
    Python writes floats (0.333333333333, 1.5e-07)."""
    if value.denominator == 1:
        return str(value.numerator)
    with localcontext() as ctx:
        ctx.prec, ctx.rounding = SIGNIFICANT, ROUND_HALF_UP
        rounded = (Decimal(value.numerator) / Decimal(value.denominator)).normalize()
    if -4 <= rounded.adjusted() < SIGNIFICANT:
        return format(rounded, "f")
    mantissa, exponent = format(rounded, "e").split("e")
    return f"{mantissa}e{int(exponent):+03d}"


# What can follow a complete expression, by token kind (operators by their text).
_FOLLOWING = {
    "number": "a missing operator between two numbers",
    "name": "a missing operator before a name",
    "(": "a missing operator before '(' (write 2*(3), not 2(3))",
    ")": "an unmatched ')'",
    ",": "a comma outside a function's arguments (write 1000, not 1,000: no thousands "
         "separators)",
}


def evaluate(expression: str) -> str:
    """The value of an arithmetic expression, as text: `3 * (2 + 5)` -> `21`, `7/2` -> `3.5`,
    `sqrt(2)` -> `1.41421356237`. Raises CalcError for anything else."""
    if not expression.strip():
        raise CalcError(f"empty expression; {ALLOWED}", 0)
    if len(expression) > MAX_LENGTH:
        raise CalcError(f"expression longer than {MAX_LENGTH} characters", MAX_LENGTH)
    parser = _Parser(expression.translate(_UNICODE))
    value = parser.expression()
    left = parser.token
    if left.kind != "end":
        problem = _FOLLOWING[left.text if left.kind == "op" else left.kind]
        raise CalcError(f"unexpected {left.text!r} after a complete expression: {problem}",
                        left.at)
    return _text(value)
