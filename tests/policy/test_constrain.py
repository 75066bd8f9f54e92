"""Constrained action decoding: the token trie, the row state machine, the masks, and the policy
sampling and scoring under them on real tiny Hugging Face VLMs (random weights)."""

import contextlib
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlmrl.errors import UserError
from vlmrl.policy import logprob as lp
from vlmrl.policy.constrain import ActionConstraints, TokenTrie, allowed_matrix, constraint_masks
from vlmrl.policy.model import PolicyConfig, VLMPolicy
from vlmrl.policy.tiny import train_tokenizer
from vlmrl.tasks.parsing import parse_action

TEXTS = [
    '{"current": "3", "target": "7", "thoughts": "3 is less than 7, so I move right.", "action": "+"}',
    '{"cards": [1, 2, 10, 13], "thoughts": "I add the next card.", "action": "10"}',
    '{"thoughts": "the mug is in the cabinet.", "action": "go to cabinet 1"}',
    '{"action": "stand"}',
    "You are playing NumberLine. Answer with one JSON object and nothing else, in this format:",
]
CABINETS = ["go to cabinet 1", "go to cabinet 10", "go to cabinet 2", "open cabinet 1", "1", "10", "+", "-"]
EOS = "<|im_end|>"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tiny model is overhead-bound, and the test machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- tokenizers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tok():
    """The tiny model's tokenizer: byte-level BPE, `"action": "` one token, digits one by one."""
    return PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(TEXTS * 4, vocab_size=400), eos_token=EOS)


@pytest.fixture(scope="module")
def merged_tok():
    """A plain byte-level BPE whose merges cross the quotes: whole answers become single tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    answers = ['{"thoughts": "x", "action": "+"}', '{"action": "go to cabinet 1"}', '{"action": "10"}']
    tok.train_from_iterator(answers * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


@pytest.fixture(scope="module")
def metaspace_tok():
    """SentencePiece-like (LLaMA/LLaVA): "▁" marks spaces, a standalone encode gets a leading "▁",
    and `▁"go` merges the opening quote with the word."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", EOS], show_progress=False)
    tok.train_from_iterator(TEXTS * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token="<unk>")


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def paths(node, prefix=()):
    """Every complete token path of a trie node."""
    if not node:
        yield prefix
    for tok, child in node.items():
        yield from paths(child, prefix + (tok,))


# --- the trie on its own ---------------------------------------------------------------------


def test_token_trie_shares_prefixes_and_refuses_a_prefix_sequence():
    trie = TokenTrie([(5, 1, 9), (5, 1, 0, 9), (7, 9), (5, 1, 9)])  # a duplicate counts once
    assert len(trie) == 3 and trie.allowed(trie.root) == (5, 7)
    node = trie.child(trie.root, 5)
    assert trie.allowed(node) == (1,)  # shared
    node = trie.child(node, 1)
    assert trie.allowed(node) == (0, 9)  # "1" then its end, or "10"
    assert trie.child(node, 4) is None
    assert trie.child(trie.child(node, 9), 0) is None and not trie.child(node, 9)  # the end
    with pytest.raises(ValueError, match="prefix"):
        TokenTrie([(1, 2), (1, 2, 3)])


def test_trie_over_legal_words_forces_the_closing_quote_and_the_stop_token(tiny_tok):
    eos = tiny_tok.eos_token_id
    ac = ActionConstraints(tiny_tok, eos)
    tail = enc(tiny_tok, '{"thoughts": "x", "action": "')
    assert tiny_tok.decode(tail[-1:]) == '"action": "'  # this tokenizer writes the key as one token
    trie = ac.trie(tail, "", tuple(CABINETS))
    texts = {}
    for path in paths(trie.root):
        assert path[-1] == eos and eos not in path[:-1]
        texts[tiny_tok.decode(tail + list(path), skip_special_tokens=True)] = path
    # every legal word is reachable, each exactly as word + '"}' then the stop token
    assert sorted(texts) == sorted('{"thoughts": "x", "action": "' + w + '"}' for w in CABINETS)
    # "1" and "10" share their first token; after it the choice is "0" or the closing quote
    one = trie.child(trie.root, enc(tiny_tok, "1")[0])
    assert set(trie.allowed(one)) == {enc(tiny_tok, "0")[0], enc(tiny_tok, '"}')[0]}
    # the three "go to cabinet ..." words share one path until their digits
    go = [w for w in CABINETS if w.startswith("go to")]
    firsts = {enc(tiny_tok, w + '"}')[0] for w in go}
    assert len(firsts) == 1 and firsts <= set(trie.allowed(trie.root))
    # after a whole word only the closing `"}` may follow, then only the stop token
    node = trie.root
    for t in enc(tiny_tok, "open cabinet 1"):
        node = trie.child(node, t)
    assert trie.allowed(node) == (enc(tiny_tok, '"}')[0],)
    assert trie.allowed(trie.child(node, enc(tiny_tok, '"}')[0])) == (eos,)


def test_trie_continues_a_word_already_started_in_the_quote_token(metaspace_tok, merged_tok):
    # SentencePiece: `▁"go` holds the opening quote and the word's start; the rest must decode in
    # place (a standalone encode of " to cabinet 1" would add a second "▁")
    eos = metaspace_tok.eos_token_id
    ids = enc(metaspace_tok, '{"action": "go')
    assert metaspace_tok.convert_ids_to_tokens(ids)[-1] == '▁"go'
    ac = ActionConstraints(metaspace_tok, eos)
    trie = ac.trie(ids[-1:], "go", tuple(CABINETS))
    got = sorted(metaspace_tok.decode(ids + list(p), skip_special_tokens=True) for p in paths(trie.root))
    assert got == sorted('{"action": "' + w + '"}' for w in CABINETS if w.startswith("go"))
    # a merged tokenizer can write the prefix, the word and the close in ONE token: only the stop follows
    eos = merged_tok.eos_token_id
    whole = enc(merged_tok, '{"action": "go to cabinet 1"}')
    assert len(whole) == 1
    masks = constraint_masks(merged_tok, [whole + [eos]], [["go to cabinet 1", "+"]], eos)
    assert masks.rows.tolist() == [0] and masks.cols.tolist() == [1] and masks.allowed == ((eos,),)
    # a token that ran past the quote into text no legal word starts with: that prefix is skipped
    # (left free) and a later prefix counts
    ac = ActionConstraints(merged_tok, eos)
    again = whole + enc(merged_tok, ' {"action": "')
    rest = ac.continuation(again[-1:], '+"}')
    assert rest is not None
    masks = ac.masks([again + list(rest) + [eos]], [["+"]])
    assert masks.cols.tolist() == list(range(len(again), len(again) + len(rest) + 1))


# --- the masks from response ids --------------------------------------------------------------


def test_constraint_masks_follow_the_response(tiny_tok):
    eos = tiny_tok.eos_token_id
    ac = ActionConstraints(tiny_tok, eos)
    head = enc(tiny_tok, '{"target": "7", "thoughts": "x", "action": "')
    word = enc(tiny_tok, "go to cabinet 10")
    close = enc(tiny_tok, '"}')
    free = enc(tiny_tok, '{"target": "7", "thoughts": "no key here"}') + [eos]
    full = head + word + close + [eos]
    cut = head + word[:1]  # max_new_tokens ran out inside the word
    legal = [CABINETS, ["go to cabinet 10", "stand"], CABINETS]
    m = ac.masks([free, full, cut], legal)
    by_row = {b: [(c, a) for r, c, a in zip(m.rows.tolist(), m.cols.tolist(), m.allowed) if r == b] for b in range(3)}
    assert by_row[0] == []  # never wrote the prefix ("target": " does not count): nothing constrained
    # constrained from the first token after the prefix to the stop token; every sampled token allowed
    assert [c for c, _ in by_row[1]] == list(range(len(head), len(full)))
    assert all(tok in a for (c, a), tok in zip(by_row[1], full[len(head):]))
    assert by_row[1][-2][1] == tuple(close) and by_row[1][-1][1] == (eos,)
    assert [c for c, _ in by_row[2]] == [len(head)]
    pure = constraint_masks(tiny_tok, [free, full, cut], legal, eos)  # the pure function, fresh caches
    assert torch.equal(pure.rows, m.rows) and torch.equal(pure.cols, m.cols) and pure.allowed == m.allowed
    # a token outside the allowed set: not sampled under these words
    with pytest.raises(UserError, match="not sampled with these legal actions"):
        ac.masks([full], [["stand"]])
    with pytest.raises(UserError, match="double quote"):
        ac.masks([full], [['say "hi"']])


def test_constrained_logprobs_renormalise_over_the_allowed_ids():
    logits = torch.tensor([[[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0]]], requires_grad=True)  # [B=1, T=2, V=4]
    tokens = torch.tensor([[1, 3]])
    masked = (torch.tensor([0, 0]), torch.tensor([0, 1]), allowed_matrix([(1, 2), (3,)], 4))
    logp, ent = lp.token_logprobs(logits, tokens, temperature=2.0, masked=masked)
    z = math.log(math.exp(0.5) + math.exp(1.0))
    assert logp[0, 0].item() == pytest.approx(0.5 - z, abs=1e-6)
    p = math.exp(0.5 - z)
    assert ent[0, 0].item() == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)), abs=1e-6)
    assert logp[0, 1].item() == 0.0 and ent[0, 1].item() == 0.0  # a forced token: certain, no entropy
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0, [0, 3]].abs().sum() == 0
    free, _ = lp.token_logprobs(logits, tokens, temperature=2.0)
    assert torch.equal(lp.token_logprobs(logits, tokens, 2.0, masked=None)[0], free)


# --- the policy ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_by_arch):
    """arch -> folder of a tiny VLM whose tokenizer knows this module's TEXTS (conftest.py)."""
    return tiny_by_arch


def load(path: str, **kw) -> VLMPolicy:
    return VLMPolicy.load(path, PolicyConfig(device="cpu", finetune="none", **kw))


@contextlib.contextmanager
def keen_on_the_key(policy: VLMPolicy, bias: float):
    """A model that writes `"action": "` often: ``bias`` added to that token's logit (in generate and
    evaluate alike, so it is simply another model). Its random weights then write junk words."""
    key = enc(policy.tokenizer, '"action": "')
    assert len(key) == 1
    add = torch.zeros(policy.hf_model.get_output_embeddings().out_features)
    add[key[0]] = bias
    handle = policy.hf_model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: out + add)
    try:
        yield
    finally:
        handle.remove()


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)) for _ in range(n)]


def row_words(n: int) -> list[list[str]]:
    """Legal words that differ per row: multi-token words, shared prefixes ("1"/"10"), symbols."""
    out = []
    for i in range(n):
        words = [f"go to cabinet {i % 7 + 1}", f"go to cabinet {i % 7 + 10}", "1", "10", "+", "-"]
        out.append(words[i % 3 :] + [f"open drawer {i}"])
    return out


def valid_fraction(texts, legal) -> float:
    rng = np.random.default_rng(0)
    return float(np.mean([parse_action(t, w, rng).valid for t, w in zip(texts, legal)]))


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_recomputed_logprobs_match_the_sampled_ones_under_the_mask(tiny, arch):
    policy = load(tiny(arch))
    n = 24
    ims, prompts, legal = images(n), [f"Step {i}: act." for i in range(n)], row_words(n)
    with keen_on_the_key(policy, 3.0):
        free = policy.generate(ims, prompts, temperature=1.0, max_new_tokens=32, seed=0)
        gen = policy.generate(ims, prompts, temperature=1.0, max_new_tokens=32, seed=0, legal_actions=legal,
                              constrained=True)
        ids = [gen.response_ids[i, : int(k)].tolist() for i, k in enumerate(gen.lengths)]
        with torch.no_grad():
            ev = policy.score(ims, prompts, ids, legal_actions=gen.legal_actions, constrained=True)
            unmasked = policy.score(ims, prompts, ids)
    assert valid_fraction(free.texts, legal) < 0.5  # left free, the random model writes junk words
    assert gen.constrained.any(1).float().mean() > 0.5 and gen.legal_actions == legal
    width = gen.logprobs.shape[1]
    assert (ev.token_logprobs[:, :width] - gen.logprobs).abs().max().item() < 1e-4
    assert (ev.action_logprob - policy.action_logprob(ids, gen.logprobs)).abs().max().item() < 1e-4
    assert (ev.values - gen.values).abs().max().item() < 1e-4
    # the mask matters: scored freely, the constrained tokens are less likely; elsewhere identical
    c = gen.constrained
    assert (unmasked.token_logprobs[:, :width][c] < gen.logprobs[c] - 1e-6).any()
    assert (unmasked.token_logprobs[:, :width][~c] - ev.token_logprobs[:, :width][~c]).abs().max() < 1e-6
    # forced tokens (one allowed id) are certain under the mask
    masks = policy.constraint_masks(ids, legal)
    forced = [(r, col) for r, col, a in zip(masks.rows.tolist(), masks.cols.tolist(), masks.allowed) if len(a) == 1]
    assert forced and all(gen.logprobs[r, col].item() == 0.0 for r, col in forced)
    # the sampler's constrained positions are exactly the ones the scorer rebuilds from the ids
    assert sorted(map(tuple, c.nonzero().tolist())) == sorted(zip(masks.rows.tolist(), masks.cols.tolist()))


def test_top_p_cuts_within_the_allowed_set(tiny):
    policy = load(tiny("qwen2_vl"), constrained_actions=True)  # the config switch, no argument
    n = 8
    ims, prompts, legal = images(n, 1), [f"p{i}" for i in range(n)], row_words(n)
    with keen_on_the_key(policy, 3.0):
        gen = policy.generate(ims, prompts, temperature=0.7, top_p=0.8, max_new_tokens=32, seed=2, legal_actions=legal)
        ids = [gen.response_ids[i, : int(k)].tolist() for i, k in enumerate(gen.lengths)]
        with torch.no_grad():
            ev = policy.score(ims, prompts, ids, temperature=0.7, legal_actions=legal)
    assert gen.constrained.any()
    assert (gen.sample_logprobs >= gen.logprobs - 1e-6).all()
    assert (ev.token_logprobs[:, : gen.logprobs.shape[1]] - gen.logprobs).abs().max().item() < 1e-4
    # greedy: the most likely allowed id, scored at temperature 1 like unconstrained greedy
    with keen_on_the_key(policy, 3.0):
        greedy = policy.generate(ims, prompts, temperature=0.0, max_new_tokens=32, legal_actions=legal)
        ids = [greedy.response_ids[i, : int(k)].tolist() for i, k in enumerate(greedy.lengths)]
        with torch.no_grad():
            ev = policy.score(ims, prompts, ids, temperature=0.0, legal_actions=legal)
    assert (ev.token_logprobs[:, : greedy.logprobs.shape[1]] - greedy.logprobs).abs().max().item() < 1e-4


def test_every_constrained_response_parses_to_a_legal_action(tiny):
    policy = load(tiny("qwen2_vl"))
    n = 64
    ims, prompts, legal = images(n, 2), [f"Observation {i}." for i in range(n)], row_words(n)
    with keen_on_the_key(policy, 8.0):  # every row writes the prefix well within 48 tokens
        free = policy.generate(ims, prompts, temperature=1.0, max_new_tokens=48, seed=3)
        gen = policy.generate(ims, prompts, temperature=1.0, max_new_tokens=48, seed=3, legal_actions=legal,
                              constrained=True)
    assert valid_fraction(free.texts, legal) < 0.5
    rng = np.random.default_rng(0)
    chosen = set()
    for text, words in zip(gen.texts, legal):
        parsed = parse_action(text, words, rng)
        assert parsed.valid, text
        assert text.endswith('"action": "' + words[parsed.action] + '"}')
        chosen.add(words[parsed.action])
    assert (gen.response_ids.gather(1, (gen.lengths - 1)[:, None]) == policy.stop_token_ids[0]).all()
    assert len(chosen) > 5  # many different words, short and long, were drawn
    assert {"1", "10"} & chosen and any(w.startswith("go to cabinet") for w in chosen)


def test_no_prefix_means_no_constraint_and_a_cut_word_stays_consistent(tiny):
    policy = load(tiny("qwen2_vl"))
    n = 12
    ims, prompts, legal = images(n, 3), [f"q{i}" for i in range(n)], row_words(n)
    # the plain random model rarely writes the key: those rows are sampled and scored freely
    gen = policy.generate(ims, prompts, max_new_tokens=16, seed=4, legal_actions=legal, constrained=True)
    free_rows = [i for i, t in enumerate(gen.texts) if '"action": "' not in t]
    assert free_rows and not gen.constrained[free_rows].any()
    ids = [gen.response_ids[i, : int(k)].tolist() for i, k in enumerate(gen.lengths)]
    with torch.no_grad():
        ev = policy.score(ims, prompts, ids, legal_actions=legal, constrained=True)
        plain = policy.score(ims, prompts, ids)
    assert torch.allclose(ev.token_logprobs[free_rows], plain.token_logprobs[free_rows], atol=0, rtol=0)
    # max_new_tokens ends inside the word: the response is cut, its log-probs still agree
    with keen_on_the_key(policy, 40.0):  # the key is the first token of every row
        gen = policy.generate(ims, prompts, max_new_tokens=3, seed=5, legal_actions=[["go to cabinet 12"]] * n,
                              constrained=True)
        ids = [gen.response_ids[i, : int(k)].tolist() for i, k in enumerate(gen.lengths)]
        with torch.no_grad():
            ev = policy.score(ims, prompts, ids, legal_actions=gen.legal_actions, constrained=True)
    assert (gen.lengths == 3).all() and all(t.startswith('"action": "go to cabinet') for t in gen.texts)
    assert gen.constrained[:, 1:].all() and not gen.constrained[:, 0].any()
    assert (ev.token_logprobs[:, :3] - gen.logprobs).abs().max().item() < 1e-4
    # scored against other words, the stored responses are refused rather than scored wrongly
    with pytest.raises(UserError, match="not sampled with these legal actions"):
        policy.score(ims, prompts, ids, legal_actions=[["stand"]] * n, constrained=True)


def test_constraint_switch_and_bad_arguments(tiny):
    policy = load(tiny("qwen2_vl"))
    ims, prompts = images(2), ["a", "b"]
    with pytest.raises(UserError, match="needs legal_actions"):
        policy.generate(ims, prompts, max_new_tokens=2, constrained=True)
    with pytest.raises(UserError, match="one list of legal words per prompt"):
        policy.generate(ims, prompts, max_new_tokens=2, legal_actions=[["+"]], constrained=True)
    gen = policy.generate(ims, prompts, max_new_tokens=2, seed=0, legal_actions=[["+"], ["-"]])  # config off
    assert gen.constrained is None and gen.legal_actions is None
