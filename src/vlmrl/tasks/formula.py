"""Exact card formulas: a rational evaluator, the 24-point solver and a formula completer.

Grammar (standard precedence, left-associative, no unary minus, no exponent, whitespace ignored)::

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := NUMBER | "(" expr ")"

Values are ``fractions.Fraction``, so ``8/(3-8/3)`` is exactly 24. Nothing here calls ``eval``.
Inputs are bounded (``MAX_CHARS``, ``MAX_DEPTH``), so any text is answered quickly with a value or a
``FormulaError``.

The env builds formulas one token at a time, so besides ``evaluate`` there is an incremental parser
(``ParseState``): ``complete`` uses it to find the shortest continuation of a partial formula that
reaches a target with the unused numbers; the experts follow it.
"""

from __future__ import annotations

import itertools
from fractions import Fraction
from functools import lru_cache
from typing import Iterable, NamedTuple, Sequence

MAX_CHARS = 200  # longer text is rejected before parsing (the envs stop at 20 tokens)
MAX_DEPTH = 32  # deepest parenthesis nesting accepted (keeps recursion far from Python's limit)

ADD_OPS = ("+", "-")
MUL_OPS = ("*", "/")
OPERATORS = ADD_OPS + MUL_OPS
_ALIASES = {"×": "*", "÷": "/"}  # spellings a model might use for the same operators
_DIGITS = frozenset("0123456789")


class FormulaError(ValueError):
    """A formula that cannot be evaluated: malformed, too long, too deep, or dividing by zero."""


# --- tokens -----------------------------------------------------------------------------------------
def tokenize(formula: str | Iterable[str | int]) -> list[str]:
    """Text, or a sequence of tokens (as the env records them), -> tokens; whitespace dropped.

    A number is a maximal run of ASCII digits. In a sequence every item is tokenized on its own, so
    ``["1", "0"]`` stays two numbers (a malformed formula), never "10".
    """
    if isinstance(formula, str):
        items: Iterable[str | int] = (formula,)
    else:
        items = formula
    tokens: list[str] = []
    chars = 0
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise FormulaError(f"formula items must be strings or integers, got {type(item).__name__}")
        text = str(item)
        chars += len(text)
        if chars > MAX_CHARS:
            raise FormulaError(f"formula longer than {MAX_CHARS} characters")
        tokens.extend(_tokenize_text(text))
    return tokens


def _tokenize_text(text: str) -> list[str]:
    tokens: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch in _DIGITS:
            j = i
            while j < len(text) and text[j] in _DIGITS:
                j += 1
            tokens.append(str(int(text[i:j])))
            i = j
            continue
        if ch.isspace():
            pass
        elif ch in OPERATORS or ch in "()":
            tokens.append(ch)
        elif ch in _ALIASES:
            tokens.append(_ALIASES[ch])
        else:
            raise FormulaError(f"unexpected character {ch!r} at position {i}")
        i += 1
    return tokens


def is_number(token: str) -> bool:
    return token.isascii() and token.isdigit()


# --- evaluation (recursive descent) ----------------------------------------------------------------
def evaluate(formula: str | Iterable[str | int]) -> Fraction:
    """The exact value of a formula (text or tokens). Raises FormulaError and nothing else."""
    tokens = tokenize(formula)
    if not tokens:
        raise FormulaError("empty formula")
    parser = _Parser(tokens)
    value = parser.expr(0)
    if parser.pos != len(tokens):
        raise FormulaError(f"unexpected {tokens[parser.pos]!r} at token {parser.pos}")
    return value


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise FormulaError("division by zero")
    return a / b


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens, self.pos = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ADD_OPS:
            op = self.tokens[self.pos]
            self.pos += 1
            value = _apply(op, value, self.term(depth))
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in MUL_OPS:
            op = self.tokens[self.pos]
            self.pos += 1
            value = _apply(op, value, self.factor(depth))
        return value

    def factor(self, depth: int) -> Fraction:
        tok = self.peek()
        if tok is None:
            raise FormulaError("formula ends where a number or '(' is expected")
        self.pos += 1
        if is_number(tok):
            return Fraction(int(tok))
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise FormulaError(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self.expr(depth + 1)
            if self.peek() != ")":
                raise FormulaError("missing ')'")
            self.pos += 1
            return value
        raise FormulaError(f"unexpected {tok!r} at token {self.pos - 1}")


# --- incremental parsing (for completing partial formulas) -----------------------------------------
class Frame(NamedTuple):
    """One parenthesis level of a partial formula: ``total add_op term mul_op <next operand>``."""

    total: Fraction | None = None  # value of the finished terms of this level
    add_op: str | None = None  # the + or - before the current term
    term: Fraction | None = None  # value of the current term so far
    mul_op: str | None = None  # the * or / waiting for its right operand

    def value(self) -> Fraction:
        assert self.term is not None
        return self.term if self.total is None else _apply(self.add_op or "+", self.total, self.term)


class ParseState(NamedTuple):
    """A valid formula prefix, evaluated as far as it goes (hashable, so searches can memoise it)."""

    frames: tuple[Frame, ...] = (Frame(),)
    expect_operand: bool = True

    def feed(self, token: str) -> "ParseState":
        """The state after one more token; FormulaError if the token cannot come next."""
        top = self.frames[-1]
        if is_number(token):
            if not self.expect_operand:
                raise FormulaError(f"a number cannot follow a number or ')': {token!r}")
            return self._operand(Fraction(int(token)))
        if token == "(":
            if not self.expect_operand:
                raise FormulaError("'(' must follow an operator or '('")
            if len(self.frames) > MAX_DEPTH:
                raise FormulaError(f"parentheses nested deeper than {MAX_DEPTH}")
            return ParseState(self.frames + (Frame(),), True)
        if self.expect_operand:
            raise FormulaError(f"{token!r} where a number or '(' is expected")
        if token in ADD_OPS:
            total = top.value()
            return ParseState(self.frames[:-1] + (Frame(total, token, None, None),), True)
        if token in MUL_OPS:
            return ParseState(self.frames[:-1] + (top._replace(mul_op=token),), True)
        if token == ")":
            if len(self.frames) == 1:
                raise FormulaError("')' without a matching '('")
            return ParseState(self.frames[:-1], True)._operand(top.value())
        raise FormulaError(f"unknown token {token!r}")

    def _operand(self, v: Fraction) -> "ParseState":
        top = self.frames[-1]
        term = v if top.term is None else _apply(top.mul_op or "*", top.term, v)
        return ParseState(self.frames[:-1] + (top._replace(term=term, mul_op=None),), False)

    @property
    def complete(self) -> bool:
        return not self.expect_operand and len(self.frames) == 1

    def value(self) -> Fraction:
        if not self.complete:
            raise FormulaError("incomplete formula")
        return self.frames[0].value()

    def fresh_parens(self) -> int:
        """How many innermost '(' still wait for their first number."""
        n = 0
        for f in reversed(self.frames[1:]):
            if f.total is not None or f.term is not None:
                break
            n += 1
        return n


def parse_prefix(tokens: Iterable[str | int]) -> ParseState:
    """The state after a formula prefix (blanks ignored); FormulaError if no formula starts so."""
    state = ParseState()
    for tok in tokenize(tokens):
        state = state.feed(tok)
    return state


def complete(
    prefix: Iterable[str | int],
    numbers: Sequence[int],
    target: int = 24,
    operators: str = "+-*/",
    parens: bool = True,
    max_tokens: int | None = None,
) -> tuple[str, ...] | None:
    """The shortest token continuation that makes ``prefix + continuation`` a formula equal to
    ``target`` using each of ``numbers`` (the unused card values) exactly once, at most
    ``max_tokens`` long; None if there is none (or the prefix starts no formula).

    Ties are broken by a fixed token order (larger numbers first, then + - * / ( )), so the answer
    is deterministic. The continuation excludes the final "=".
    """
    try:
        tokens = tokenize(prefix)
        state = parse_prefix(tokens)
    except FormulaError:
        return None
    remaining = tuple(sorted(int(n) for n in numbers))
    # Every complete formula is a binary tree over all the numbers, so an unsolvable deal needs no search.
    used = [int(t) for t in tokens if is_number(t)]
    if remaining and not is_solvable(used + list(remaining), target):
        return None
    lo = _min_len(state, len(remaining))
    # one useful paren pair per internal node of the continuation's numbers at most
    hi = lo + 2 * max(len(remaining) - 1, 0)
    if max_tokens is not None:
        hi = min(hi, max_tokens)
    goal = Fraction(target)
    # iterative deepening: the first budget that succeeds gives a shortest continuation
    for budget in range(lo, hi + 1):
        found = _first(state, remaining, goal, operators, parens, budget)
        if found is not None:
            return found
    return None


def _min_len(state: ParseState, n_numbers: int) -> int:
    """Fewest tokens that can finish ``state`` with ``n_numbers`` more numbers."""
    closes = len(state.frames) - 1
    if state.expect_operand:
        return 2 * n_numbers - 1 + closes if n_numbers else 1 << 30
    return 2 * n_numbers + closes


@lru_cache(maxsize=1 << 18)
def _first(
    state: ParseState, remaining: tuple[int, ...], target: Fraction, operators: str, parens: bool, budget: int
) -> tuple[str, ...] | None:
    """The first continuation, in token order, of at most ``budget`` tokens (None if none)."""
    if _min_len(state, len(remaining)) > budget:
        return None
    if not remaining and state.complete:
        return () if state.value() == target else None
    if len(state.frames) == 1 and remaining and not _could_reach(state, remaining, target):
        return None
    candidates: list[str] = []
    if state.expect_operand:
        candidates += [str(n) for n in sorted(set(remaining), reverse=True)]
        # a '(' only helps around two or more numbers; this also bounds the search
        if parens and state.fresh_parens() + 1 < len(remaining):
            candidates.append("(")
    else:
        if remaining:
            candidates += list(operators)
        if len(state.frames) > 1:
            candidates.append(")")
    for tok in candidates:
        try:
            nxt = state.feed(tok)
        except FormulaError:  # division by zero: this branch can never evaluate
            continue
        rest = remaining
        if is_number(tok):
            i = rest.index(int(tok))
            rest = rest[:i] + rest[i + 1:]
        tail = _first(nxt, rest, target, operators, parens, budget - 1)
        if tail is not None:
            return (tok,) + tail
    return None


@lru_cache(maxsize=1 << 16)
def _could_reach(state: ParseState, remaining: tuple[int, ...], target: Fraction) -> bool:
    """A quick necessary test for a state with no open '(': can any continuation reach ``target``?

    At the top level the continuation is ``total add_op (term mul_op a) +- b``, where a is any value
    of some of the remaining numbers (chains like ``*x/y`` are ``*(x/y)``) and b any value of the
    others; anything the token search can build has this form, so a False here prunes safely.
    """
    (frame,) = state.frames
    n = len(remaining)
    for mask in range(1 << n):
        s1 = tuple(remaining[k] for k in range(n) if mask >> k & 1)
        s2 = tuple(remaining[k] for k in range(n) if not mask >> k & 1)
        if len(s1) > 3:  # big value sets are slow to build; such states are rare (no number used yet)
            return True
        if frame.term is None:  # a new term starts: it is some a, so s1 must be non-empty
            if not s1:
                continue
            heads = _values(s1)
        elif state.expect_operand:  # term mul_op <a>
            if not s1:
                continue
            op = frame.mul_op or "*"
            heads = [_apply(op, frame.term, a) for a in _values(s1) if a or op != "/"]
        elif s1:  # term (* or /) a
            heads = [frame.term * a for a in _values(s1)] + [frame.term / a for a in _values(s1) if a]
        else:  # the term ends here
            heads = [frame.term]
        tails = _values(s2) if s2 else None
        for h in heads:
            c = h if frame.total is None else _apply(frame.add_op or "+", frame.total, h)
            if tails is None:
                if c == target:
                    return True
            elif target - c in tails or c - target in tails:
                return True
    return False


# --- the 24-point solver ---------------------------------------------------------------------------
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


class _Expr(NamedTuple):
    value: Fraction
    text: str
    prec: int  # 3 for a number, else the operator's precedence


def _combine(op: str, a: _Expr, b: _Expr) -> _Expr | None:
    if op == "/" and b.value == 0:
        return None
    p = _PREC[op]
    left = a.text if a.prec >= p else f"({a.text})"
    # the right operand of - and / needs parentheses at equal precedence: a-(b+c), a/(b*c)
    right = b.text if b.prec > p or (b.prec == p and op in "+*") else f"({b.text})"
    return _Expr(_apply(op, a.value, b.value), f"{left}{op}{right}", p)


def _search(items: list[_Expr], target: Fraction, found: set[str]) -> None:
    if len(items) == 1:
        if items[0].value == target:
            found.add(items[0].text)
        return
    for i, j in itertools.combinations(range(len(items)), 2):
        rest = [e for k, e in enumerate(items) if k not in (i, j)]
        a, b = items[i], items[j]
        for op, x, y in (("+", a, b), ("*", a, b), ("-", a, b), ("-", b, a), ("/", a, b), ("/", b, a)):
            e = _combine(op, x, y)
            if e is not None:
                _search(rest + [e], target, found)


@lru_cache(maxsize=4096)
def _solve_sorted(numbers: tuple[int, ...], target: Fraction) -> tuple[str, ...]:
    found: set[str] = set()
    _search([_Expr(Fraction(n), str(n), 3) for n in numbers], target, found)
    return tuple(sorted(found, key=lambda s: (len(s), s)))


def solve(numbers: Sequence[int], target: int = 24) -> list[str]:
    """Every distinct formula (minimal parentheses) that uses each number once and equals ``target``,
    shortest first; [] when the deal has no solution. Cached by the sorted numbers."""
    return list(_solve_sorted(tuple(sorted(int(n) for n in numbers)), Fraction(target)))


@lru_cache(maxsize=8192)
def _values(numbers: tuple[int, ...]) -> frozenset[Fraction]:
    """Every value reachable from the (sorted) numbers, each used once."""
    if len(numbers) == 1:
        return frozenset((Fraction(numbers[0]),))
    out: set[Fraction] = set()
    n = len(numbers)
    for mask in range(1, (1 << n) - 1):
        if mask & 1 == 0:  # each split once: the first number always goes left
            continue
        left = tuple(numbers[k] for k in range(n) if mask >> k & 1)
        right = tuple(numbers[k] for k in range(n) if not mask >> k & 1)
        for a in _values(left):
            for b in _values(right):
                out.update((a + b, a - b, b - a, a * b))
                if b:
                    out.add(a / b)
                if a:
                    out.add(b / a)
    return frozenset(out)


@lru_cache(maxsize=1 << 14)
def _makes(numbers: tuple[int, ...], goal: Fraction) -> bool:
    """Whether ``goal`` is a value of the (sorted) numbers: like ``goal in _values(numbers)``, but the
    top operation is inverted instead of enumerated, so only the smaller parts' value sets are built."""
    if len(numbers) == 1:
        return numbers[0] == goal
    n = len(numbers)
    for mask in range(1, (1 << n) - 1):
        if mask & 1 == 0:  # each split once; - and / are tried both ways below
            continue
        left = _values(tuple(numbers[k] for k in range(n) if mask >> k & 1))
        right = _values(tuple(numbers[k] for k in range(n) if not mask >> k & 1))
        if len(left) > len(right):
            left, right = right, left
        for a in left:
            # a+b, a-b, b-a, a*b, a/b, b/a == goal, solved for b
            if goal - a in right or a - goal in right or goal + a in right:
                return True
            if a == 0:
                if goal == 0:  # 0*b, 0/b
                    return True
                continue
            if goal / a in right or goal * a in right:  # a*b, b/a
                return True
            if goal != 0 and a / goal in right:  # a/b
                return True
    return False


def is_solvable(numbers: Sequence[int], target: int = 24) -> bool:
    """Whether + - * / and parentheses can make ``target`` from each number used once."""
    if not numbers:
        return False
    return _makes(tuple(sorted(int(n) for n in numbers)), Fraction(target))


__all__ = [
    "FormulaError",
    "ParseState",
    "complete",
    "evaluate",
    "is_solvable",
    "parse_prefix",
    "solve",
    "tokenize",
]
