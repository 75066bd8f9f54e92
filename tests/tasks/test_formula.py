import itertools
import random
import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmrl.tasks import formula
from vlmrl.tasks.formula import (
    MAX_CHARS,
    MAX_DEPTH,
    FormulaError,
    complete,
    evaluate,
    is_solvable,
    parse_prefix,
    solve,
    tokenize,
)

TOKENS = [str(i) for i in range(1, 14)] + ["0", "+", "-", "*", "/", "(", ")", " "]


# --- evaluate --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, value",
    [
        ("3+9", 12),
        ("2*3+4*5", 26),  # precedence
        ("8-4-2", 2),  # left-associative
        ("8/4/2", 1),
        ("2*(3+4)", 14),
        ("((10))", 10),
        ("10 - 2 * 3", 4),
        ("1/3+2/3", 1),
        ("12×2", 24),
        ("48÷2", 24),
    ],
)
def test_evaluate_values(text, value):
    assert evaluate(text) == value


def test_exact_rational_division():
    v = evaluate("8/(3-8/3)")
    assert isinstance(v, Fraction) and v == 24
    assert evaluate(["8", "/", "(", "3", "-", "8", "/", "3", ")"]) == 24
    assert evaluate("1/3") == Fraction(1, 3)  # exact, not 0.333...


def test_blanks_are_whitespace_and_tokens_stay_separate():
    assert evaluate(["3", "+", " ", "9"]) == 12
    assert tokenize(["1", "0"]) == ["1", "0"]  # two numbers, never "10"
    assert tokenize("10+ 3") == ["10", "+", "3"]
    with pytest.raises(FormulaError):
        evaluate(["2", "4"])  # the paper's eval() read this as 24


@pytest.mark.parametrize(
    "bad",
    ["", "   ", "3+", "(3", "3)", "()", "2 4", "3**3", "3//3", "-3+27", "+3", "3 x 8", "1/0", "1/(3-3)",
     "2^3", "a", "1.5", "²"],
)
def test_malformed_or_undefined_formulas_raise_formula_error(bad):
    with pytest.raises(FormulaError):
        evaluate(bad)


def test_input_is_bounded():
    with pytest.raises(FormulaError, match="longer"):
        evaluate("1+" * MAX_CHARS + "1")
    deep = "(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1)
    with pytest.raises(FormulaError, match="deeper"):
        evaluate(deep)
    ok = "(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH
    assert evaluate(ok) == 1
    with pytest.raises(FormulaError):
        evaluate([1.5])  # not a token


@settings(max_examples=400, deadline=200)
@given(st.text(max_size=300))
def test_evaluate_never_raises_anything_else_on_any_text(text):
    t = time.perf_counter()
    try:
        v = evaluate(text)
    except FormulaError:
        pass
    else:
        assert isinstance(v, Fraction)
    assert time.perf_counter() - t < 0.1


@settings(max_examples=400, deadline=200)
@given(st.lists(st.sampled_from(TOKENS), max_size=25))
def test_recursive_descent_agrees_with_the_incremental_parser(tokens):
    """Two independent implementations of the grammar give the same value or both reject."""
    try:
        expected = evaluate(tokens)
    except FormulaError:
        expected = None
    try:
        got = parse_prefix(tokens).value()
    except FormulaError:
        got = None
    assert got == expected


# --- solver ----------------------------------------------------------------------------------------
def test_solve_known_deals():
    assert solve([8, 8, 3, 3]) == ["8/(3-8/3)"]
    assert solve([3, 3, 8, 8]) == ["8/(3-8/3)"]  # cached by the sorted numbers
    assert solve([1, 1, 1, 1]) == [] and not is_solvable([1, 1, 1, 1])
    assert is_solvable([8, 8, 3, 3]) and is_solvable([10, 10, 4, 4])  # (10*10-4)/4
    assert "1+4+9" in solve([1, 9, 4], target=14)


@pytest.mark.parametrize("numbers", [(4, 6, 1, 1), (10, 10, 4, 4), (5, 5, 5, 1), (1, 2, 3, 4), (12, 13, 11, 1)])
def test_every_solution_is_exact_and_uses_each_number_once(numbers):
    sols = solve(numbers)
    assert sols, numbers
    for s in sols:
        assert evaluate(s) == 24
        assert sorted(int(t) for t in tokenize(s) if t.isdigit()) == sorted(numbers)


def test_is_solvable_agrees_with_solve_on_a_sample():
    rng = random.Random(0)
    deals = [tuple(rng.randint(1, 13) for _ in range(4)) for _ in range(25)]
    for d in deals:
        assert is_solvable(d) == bool(solve(d)), d


# --- completing a partial formula ------------------------------------------------------------------
def test_complete_simple_cases():
    assert complete(["3", "+"], [9], 12, "+*", parens=False) == ("9",)
    assert complete([], [8, 8, 3, 3]) == tuple("8/(3-8/3)".replace("", " ").split())
    assert complete(["3", "+", "9"], [], 12) == ()  # finished: only "=" is left
    assert complete([], [1, 1, 1, 1]) is None  # no solution
    assert complete(["3", "3"], [8, 8]) is None  # not a formula prefix
    assert complete(["8", "/", "(", "3", "-", "3"], [8]) is None  # division by zero ahead
    assert complete([], [8, 8, 3, 3], max_tokens=8) is None  # needs 9 tokens
    # the continuation uses only the operators given
    assert complete(["3"], [4], 12, "+", parens=False) is None
    assert complete(["3"], [4], 12, "+*", parens=False) == ("*", "4")


def test_complete_is_the_shortest_and_consistent_along_its_own_plan():
    numbers = [4, 10, 9, 5]
    plan = complete([], numbers)
    assert evaluate(plan) == 24 and len(plan) == 9  # 4*(10+5-9) style: no 7-token solution exists
    for k in range(len(plan)):
        rest = [n for n in numbers]
        for t in plan[:k]:
            if t.isdigit():
                rest.remove(int(t))
        assert complete(plan[:k], rest) == plan[k:]


@pytest.mark.parametrize("numbers", [(8, 8, 3, 3), (1, 5, 5, 5), (2, 3, 10, 10), (6, 6, 1, 7)])
def test_every_prefix_of_every_solution_can_be_completed(numbers):
    for sol in solve(numbers)[:40]:
        toks = tokenize(sol)
        for k in range(len(toks) + 1):
            rest = list(numbers)
            for t in toks[:k]:
                if t.isdigit():
                    rest.remove(int(t))
            cont = complete(toks[:k], rest)
            assert cont is not None, (sol, toks[:k])
            full = toks[:k] + list(cont)
            assert evaluate(full) == 24
            assert sorted(int(t) for t in full if t.isdigit()) == sorted(numbers)


def test_pruning_never_changes_the_answer(monkeypatch):
    """The value-set shortcut only skips dead branches: same answers with it switched off."""
    rng = random.Random(1)
    cases = []
    words = [str(i) for i in range(1, 11)] + list("+-*/()")
    for _ in range(40):
        nums = [rng.randint(1, 10) for _ in range(4)]
        prefix, rest = [], list(nums)
        for _ in range(rng.randint(0, 4)):
            w = rng.choice(words)
            if w.isdigit():
                if int(w) not in rest:
                    continue
                rest.remove(int(w))
            prefix.append(w)
        cases.append((tuple(prefix), tuple(rest)))
    formula._first.cache_clear()
    with_pruning = [complete(p, r) for p, r in cases]
    monkeypatch.setattr(formula, "_could_reach", lambda *a: True)
    formula._first.cache_clear()
    try:
        without = [complete(p, r) for p, r in cases]
    finally:
        formula._first.cache_clear()
    assert with_pruning == without
    assert sum(c is not None for c in with_pruning) >= 10  # the sample exercises both outcomes
    assert sum(c is None for c in with_pruning) >= 10


def test_complete_is_fast_on_a_fresh_cache():
    formula._first.cache_clear()
    t = time.perf_counter()
    for nums in itertools.islice(itertools.combinations_with_replacement(range(1, 11), 4), 0, 715, 25):
        complete([], nums)
    assert time.perf_counter() - t < 5.0  # ~29 deals; typically well under a second


def test_is_solvable_matches_the_full_value_set_including_zeros_and_odd_targets():
    rng = random.Random(0)
    for _ in range(150):
        nums = tuple(sorted(rng.randint(0, 13) for _ in range(rng.randint(1, 4))))
        goal = rng.choice([0, 1, 24, -3, 5, Fraction(1, 2)])
        assert is_solvable(nums, goal) == (Fraction(goal) in formula._values(nums)), (nums, goal)


def test_known_count_of_solvable_deals():
    # the classic figure: 1362 of the 1820 multisets of four ranks 1..13 make 24
    deals = list(itertools.combinations_with_replacement(range(1, 14), 4))
    assert sum(is_solvable(d) for d in deals) == 1362
