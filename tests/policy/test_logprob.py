"""Pure log-prob maths and the CoT / action boundary found from character offsets."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlmrl.policy import logprob as lp
from vlmrl.policy.tiny import train_tokenizer

TEXTS = [
    '{"current": "3", "target": "7", "thoughts": "3 is less than 7, so I move right.", "action": "+"}',
    '{"formula": "10÷2*", "thoughts": "I add the next card.", "action": "10"}',
    '{"action": "stand"}',
    "Answer with one JSON object and nothing else.",
]
_BYTE_TOK = train_tokenizer(TEXTS * 4, vocab_size=400)


@pytest.fixture(scope="module")
def byte_bpe():
    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(TEXTS * 4, vocab_size=400), eos_token="<|im_end|>")


@pytest.fixture(scope="module")
def metaspace_bpe():
    # SentencePiece-like (LLaMA/LLaVA): spaces become "▁" and single-token decodes lose them
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def test_token_logprobs_match_a_hand_computation():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])  # [B=1, T=2, V=3]
    tokens = torch.tensor([[2, 1]])
    logp, ent = lp.token_logprobs(logits, tokens, temperature=2.0)
    z = math.log(sum(math.exp(x / 2) for x in (1.0, 2.0, 3.0)))
    assert logp[0, 0].item() == pytest.approx(1.5 - z, abs=1e-6)
    assert logp[0, 1].item() == pytest.approx(-math.log(3), abs=1e-6)
    assert ent[0, 1].item() == pytest.approx(math.log(3), abs=1e-6)  # uniform: log V
    # greedy (temperature 0) is scored at temperature 1
    g, _ = lp.token_logprobs(logits, tokens, temperature=0.0)
    assert g[0, 0].item() == pytest.approx(3 - math.log(sum(math.exp(x) for x in (1.0, 2.0, 3.0))), abs=1e-6)


def test_banned_tokens_get_no_mass_and_entropy_stays_finite():
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    logp, ent = lp.token_logprobs(logits, torch.tensor([[0]]), banned=[3])
    assert logp.item() == pytest.approx(-math.log(3), abs=1e-6)
    assert ent.item() == pytest.approx(math.log(3), abs=1e-6)
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    "text, start",
    [
        ('{"thoughts": "go", "action": "+"}', 19),
        ('{"action": "a", "thoughts": "x", "action" : "b"}', 33),  # the LAST key counts, spaces allowed
        ('{"thoughts": "no key here", "act": "+"}', None),
        ('the word action without quotes: +', None),
    ],
)
def test_action_key_start(text, start):
    assert lp.action_key_start(text) == start
    if start is not None:
        assert text[start:].startswith('"action"')


def test_boundary_from_handcrafted_offsets():
    pieces = ['{"th', 'oughts": "go', '", ', '"action', '": "+"}']
    text = "".join(pieces)
    ends = [len("".join(pieces[: i + 1])) for i in range(len(pieces))]
    assert lp.action_boundary(text, ends) == 3  # the token that starts with the key's quote
    # a token straddling the key (", \"" merged with the quote) counts as action
    pieces = ['{"a": 1', ', "', 'action": "x"}']
    text = "".join(pieces)
    ends = [len("".join(pieces[: i + 1])) for i in range(len(pieces))]
    assert lp.action_boundary(text, ends) == 1
    # no key: everything is chain of thought
    assert lp.action_boundary("free text", [4, 9]) == 2
    assert lp.token_at_char([2, 5, 5, 9], 5) == 3  # zero-width tokens (EOS) are skipped
    assert lp.token_at_char([2, 5], 9) == 2


@pytest.mark.parametrize("fixture", ["byte_bpe", "metaspace_bpe"])
def test_boundary_from_real_tokenizer_offsets(request, fixture):
    tok = request.getfixturevalue(fixture)
    text = '{"formula": "10÷2", "thoughts": "I add the next card.", "action": "10"}'
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ends = lp.prefix_char_ends(tok, ids)
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded == text
    assert ends == sorted(ends) and ends[-1] == len(text) and len(ends) == len(ids)
    b = lp.action_boundary(decoded, ends)
    key = text.index('"action"')
    # the CoT tokens decode to text that stops before the key; the next token reaches into it
    assert len(tok.decode(ids[:b], skip_special_tokens=True)) <= key
    assert tok.decode(ids[: b + 1], skip_special_tokens=True).find('"') >= 0
    assert ends[b] > key


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet='{}":, abcdefghijklmnopqrstuvwxyz0123456789+-*/÷é', max_size=60))
def test_prefix_ends_cover_any_text(text):
    tok = PreTrainedTokenizerFast(tokenizer_object=_BYTE_TOK)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ends = lp.prefix_char_ends(tok, ids)
    assert len(ends) == len(ids)
    assert ends == sorted(ends)
    assert (ends[-1] if ends else 0) == len(tok.decode(ids))
    b = lp.action_boundary(text, ends)
    assert 0 <= b <= len(ids)



def test_cot_weights_and_alignment():
    w = lp.cot_weights(torch.tensor([2, 0, 3]), torch.tensor([4, 2, 3]), width=4, thought_weight=0.5)
    assert w.tolist() == [[0.5, 0.5, 1, 1], [1, 1, 0, 0], [0.5, 0.5, 0.5, 0]]
    x = torch.tensor([[0.0, 1, 2, 3], [0, 0, 5, 6], [0, 0, 0, 0]])
    assert lp.right_to_left(x, torch.tensor([4, 2, 0])).tolist() == [[0, 1, 2, 3], [5, 6, 0, 0], [0, 0, 0, 0]]
    m = lp.masked_mean(torch.tensor([[1.0, 3.0, 9.0], [2.0, 2.0, 2.0]]), torch.tensor([[1, 1, 0], [0, 0, 0]]))
    assert m.tolist() == [2.0, 0.0]


@pytest.mark.parametrize(
    "text, end",
    [
        ('{"dealer card": "7", "your total": "15", "thoughts": "Hard 15", "action": "hit"}', 41),
        ('{"thoughts": "go", "action": "+"}', 1),  # no state fields: an empty reading
        ('{"dealer card": "7", "action": "hit"}', None),  # no thoughts key
        ('{"action": "hit", "thoughts": "late"}', None),  # thoughts after the action: not a reading
    ],
)
def test_reading_end(text, end):
    assert lp.reading_end(text) == end


def test_cot_weights_with_a_reading_weight():
    # the first `readings` tokens get reading_weight, then lambda up to the boundary, then 1
    w = lp.cot_weights(torch.tensor([3, 2]), torch.tensor([4, 3]), width=4, thought_weight=0.5,
                       readings=torch.tensor([2, 0]), reading_weight=0.0)
    assert w.tolist() == [[0, 0, 0.5, 1], [0.5, 0.5, 1, 0]]
    # unset: the paper's single lambda
    same = lp.cot_weights(torch.tensor([3]), torch.tensor([4]), 4, 0.5, torch.tensor([2]), None)
    assert same.tolist() == [[0.5, 0.5, 0.5, 1]]


@pytest.mark.parametrize("fixture", ["byte_bpe", "metaspace_bpe"])
def test_reading_from_real_tokenizer_offsets(request, fixture):
    tok = request.getfixturevalue(fixture)
    text = '{"current": "3", "target": "7", "thoughts": "3 is less than 7, so I move right.", "action": "+"}'
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    r = lp.reading_from_ids(tok, ids)
    key = text.index('"thoughts"')
    # the reading's tokens stop before the thoughts key; the next token reaches into it
    assert len(tok.decode(ids[:r], skip_special_tokens=True)) <= key < lp.prefix_char_ends(tok, ids)[r]
    assert 0 < r < lp.boundary_from_ids(tok, ids)
    assert lp.reading_from_ids(tok, tok('{"action": "+"}', add_special_tokens=False)["input_ids"]) == 0
