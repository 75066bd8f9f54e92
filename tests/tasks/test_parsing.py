import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmrl.tasks.parsing import action_value, find_action, parse_action

EZ = [str(i) for i in range(1, 11)] + ["+", "*", "="]
P24 = [str(i) for i in range(1, 11)] + ["+", "-", "*", "/", "(", ")", "="]


def parse(text, words=EZ, seed=0):
    return parse_action(text, words, np.random.default_rng(seed))


def test_exact_word_after_the_action_key():
    assert parse('{"cards": "5, 7", "thoughts": "5+7=12", "action": "+"}') == (10, True, '{"cards": "5, 7", "thoughts": "5+7=12", ')


def test_ten_is_not_read_as_one():
    assert parse('{"action": "10"}').action == 9
    assert parse('{"action": "1"}').action == 0
    assert parse('"action": "use 10"').action == 9


def test_only_the_last_action_key_counts():
    assert parse('{"action": "+", "thoughts": "no", "action": "*"}').action == 11


def test_none_or_several_words_draw_a_random_action_from_the_given_rng():
    for text in ['{"action": "2 or 3"}', '{"thoughts": "+"}', "", '"action": ""', '"action": "11"']:
        a, b = parse(text, seed=7), parse(text, seed=7)
        assert not a.valid and a.action == b.action and 0 <= a.action < len(EZ)
    draws = {parse('{"action": "?"}', seed=s).action for s in range(200)}
    assert draws == set(range(len(EZ)))  # uniform over legal actions, not a fixed fallback


def test_unquoted_value_stops_at_comma_or_brace():
    assert parse('"action": *, "x": "+"}').action == 11
    assert parse('"action": =}').action == 12
    assert action_value('no key here') is None
    assert action_value('"action":   "un') == "un"


def test_symbols_match_inside_text_and_words_match_whole():
    assert find_action("(", P24) == P24.index("(")
    assert find_action("put 8 now", P24) == 7
    assert find_action("8 and 9", P24) is None
    assert find_action("+ + +", P24) == P24.index("+")  # one distinct word, named three times


def test_longer_commands_shadow_the_words_they_contain():
    words = ["look", "look at bowl 1", "go to cabinet 1", "go to cabinet 12"]
    assert find_action("please look at bowl 1", words) == 1
    assert find_action("Go to cabinet 12.", words) == 3
    assert find_action("go to cabinet 1", words) == 2
    assert find_action("look", words) == 0


@settings(max_examples=300, deadline=None)
@given(st.text(), st.integers(0, 2**32 - 1))
def test_never_raises_and_always_returns_a_legal_index(text, seed):
    for words in (EZ, P24, ["-", "+"], ["stand", "hit"], ["go to desk 1", "look"]):
        p = parse_action(text, words, np.random.default_rng(seed))
        assert 0 <= p.action < len(words)
        assert isinstance(p.valid, bool)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='"action: {},+*=-0123456789 ', max_size=60), st.integers(0, 10))
def test_json_like_noise_never_raises(text, seed):
    p = parse_action(text, P24, np.random.default_rng(seed))
    assert 0 <= p.action < len(P24)


@given(st.sampled_from(P24), st.text(alphabet="abc xyz.,\n", max_size=30))
def test_a_well_formed_answer_always_parses_to_its_word(word, thoughts):
    import json

    text = json.dumps({"thoughts": thoughts, "action": word})
    p = parse(text, P24)
    assert p.valid and P24[p.action] == word
