"""Constrained action decoding: once a response has written ``"action": "``, only legal words follow.

The chain of thought stays free. From the first point where the decoded response text contains the
action prefix (the key ``"action"``, a colon, optional whitespace, an opening quote: what
``tasks/parsing.py`` reads and what ``Task.response`` writes through ``json.dumps``), the rest of the
response is forced to be one of this step's legal words, then the closing ``"}``, then the stop
token -- the very ending ``Task.response`` gives SFT demonstrations. Nothing can follow, so the parser
(which reads after the LAST ``"action":``) always finds exactly that word: ``valid=True``.

The words are enforced through a ``TokenTrie`` over token sequences: for each legal word ``w`` the
string still to be written, ``(w + '"}')`` minus what the response already wrote after the quote
(a BPE token can merge the opening quote with the start of the word, e.g. ``' "+'``), is tokenised
canonically (``tokenizer.encode``, no special tokens) and the stop token appended. A tokenisation is
used only if it decodes, right after the response's last token, to exactly that string; otherwise a
couple of anchored encodings are tried (SentencePiece tokenizers add a leading "▁" to a standalone
encode), and a word with none is left out of the trie.

Sampling and scoring agree exactly because both walk the same ``RowConstraint`` state machine over the
response token ids: ``generate`` pushes each drawn token and masks the next distribution; the PPO
forward pass calls ``constraint_masks`` on the stored ids and gets the same positions and allowed sets.
At a constrained position the policy distribution is ``log_softmax`` over the allowed ids only
(``logprob.constrain_logprobs``); a position with one allowed id has log-prob 0 and entropy 0.

Cost: the prefix can only appear when a token containing a double quote is appended, so the row's
text is decoded (in full, so the check is exact) only at those steps; tries are cached per (last
token, written text, words), so a word list is tokenised once per distinct context.

Limits (by design, kept simple): rows that never write the prefix are not constrained; if one token
runs past the opening quote into text no legal word starts with, that prefix is skipped and the next
one counts; a word containing a double quote cannot be written inside the JSON string the parser
reads, and is refused.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import torch

from vlmrl.errors import UserError
from vlmrl.policy.input_cache import LRU

#: The action prefix: the parser's key pattern (``"action"\s*:``) followed by the value's opening quote.
ACTION_PREFIX = re.compile(r'"action"\s*:\s*"')
#: What follows the word: the closing quote and the JSON's closing brace (``json.dumps`` puts the
#: action last, as ``Task.response`` does); then the stop token ends the response.
CLOSING = '"}'
#: Tokens of context before a continuation, used to check that its tokens decode in place. One is
#: enough for the usual decoders (byte-level, Metaspace/SentencePiece, WordPiece): how a token
#: decodes depends at most on whether it starts the text, and the check decodes both sides alike.
_TAIL = 1

Node = dict  # a trie node: token id -> child node; an empty dict ends a sequence


class TokenTrie:
    """A trie over token-id sequences (prefix-free: each ends with the stop token).

    ``allowed(node)`` lists the ids that may come next; ``child(node, id)`` steps down (None if the id
    is not allowed); an empty node means the sequence is complete.
    """

    def __init__(self, sequences: Iterable[Sequence[int]]):
        self.root: Node = {}
        self.sequences: list[tuple[int, ...]] = []
        for seq in sequences:
            seq = tuple(int(t) for t in seq)
            if not seq or seq in self.sequences:
                continue
            node = self.root
            for tok in seq:
                node = node.setdefault(tok, {})
            self.sequences.append(seq)
        for seq in self.sequences:  # each must end at a leaf: no sequence is a prefix of another
            node = self.root
            for tok in seq:
                node = node[tok]
            if node:
                raise ValueError(f"token sequence {seq} is a prefix of another sequence of the trie")

    def __len__(self) -> int:
        return len(self.sequences)

    @staticmethod
    def allowed(node: Node) -> tuple[int, ...]:
        return tuple(sorted(node))

    @staticmethod
    def child(node: Node, token: int) -> Node | None:
        return node.get(int(token))


class ConstraintMasks(NamedTuple):
    """Where a batch of responses was constrained, and to what (K = number of constrained positions).

    rows [K] long: the response (batch row); cols [K] long: the token index in that response
    (left-aligned, 0 = first response token); allowed: K tuples of the token ids allowed there.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    allowed: tuple[tuple[int, ...], ...]


def allowed_matrix(allowed: Sequence[Sequence[int]], vocab_size: int, device: Any = None) -> torch.Tensor:
    """K allowed-id lists -> a [K, V] bool mask (True where the id may be drawn)."""
    mask = torch.zeros(len(allowed), vocab_size, dtype=torch.bool)
    rows = [k for k, ids in enumerate(allowed) for _ in ids]
    if rows:
        mask[rows, [t for ids in allowed for t in ids]] = True
    return mask.to(device) if device is not None else mask


def _check_words(words: Sequence[str]) -> tuple[str, ...]:
    if isinstance(words, str):
        raise UserError(f"legal actions must be a list of words per row, got the string {words!r}")
    words = tuple(str(w) for w in words)
    bad = [w for w in words if '"' in w]
    if bad:
        raise UserError(
            f"legal action {bad[0]!r} contains a double quote: it cannot be written inside the JSON "
            "string the parser reads, so constrained decoding cannot force it"
        )
    return tuple(dict.fromkeys(w for w in words if w))  # distinct, order kept, empty words dropped


class ActionConstraints:
    """Per-tokenizer machinery (the quote-bearing ids, tokenisation and trie caches) shared by the
    sampler and the scorer; ``row(words)`` starts the state machine of one response."""

    def __init__(self, tokenizer: Any, stop_id: int, cache_entries: int = 4096):
        self.tokenizer = tokenizer
        self.stop_id = int(stop_id)
        self._quotes: dict[int, bool] = {}
        self._tries = LRU(max_entries=cache_entries, max_bytes=1 << 62)
        self._continuations = LRU(max_entries=cache_entries * 8, max_bytes=1 << 62)

    # --- tokenizer helpers ---------------------------------------------------------------------
    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def has_quote(self, token: int) -> bool:
        """Whether the token's text contains a double quote: only such a token can complete the
        action prefix. Decoded once per id, on first sight (no pass over the whole vocabulary)."""
        known = self._quotes.get(token)
        if known is None:
            known = self._quotes[token] = '"' in self.decode([token])
        return known

    def continuation(self, tail: Sequence[int], text: str) -> tuple[int, ...] | None:
        """Token ids that write ``text`` right after the ids ``tail``: the canonical encoding if it
        decodes in place to exactly ``text``, else an anchored one (encode ``anchor + text`` and drop
        the leading tokens); None if no candidate does."""
        if not text:
            return ()
        tail = tuple(int(t) for t in tail)
        key = (tail, text)
        cached = self._continuations.get(key)
        if cached is not None:
            return cached or None
        before = self.decode(tail)
        encode = lambda s: [int(t) for t in self.tokenizer.encode(s, add_special_tokens=False)]  # noqa: E731

        def candidates() -> Iterator[list[int]]:  # lazily: the canonical one almost always fits
            yield encode(text)
            for anchor in dict.fromkeys([before[-1:] or " ", "\n"]):
                full = encode(anchor + text)
                yield from (full[k:] for k in range(1, len(full)))

        found: tuple[int, ...] = ()
        for ids in candidates():
            if ids and self.decode(tail + tuple(ids)) == before + text:
                found = tuple(ids)
                break
        self._continuations.put(key, found)
        return found or None

    def trie(self, tail: Sequence[int], written: str, words: tuple[str, ...]) -> TokenTrie | None:
        """The trie of what may follow once the prefix is written and then ``written`` (the text after
        the opening quote so far), for legal ``words``; None when no word can follow."""
        tail = tuple(int(t) for t in tail)
        key = (tail, written, words)
        cached = self._tries.get(key)
        if cached is not None:
            return cached or None
        sequences = []
        for word in words:
            full = word + CLOSING
            if not full.startswith(written):
                continue
            ids = self.continuation(tail, full[len(written):])
            if ids is not None:
                sequences.append(ids + (self.stop_id,))
        trie = TokenTrie(sequences) if sequences else None
        self._tries.put(key, trie or ())
        return trie

    # --- per row and per batch ----------------------------------------------------------------
    def row(self, words: Sequence[str]) -> "RowConstraint":
        return RowConstraint(self, _check_words(words))

    def masks(self, response_ids: Sequence[Sequence[int]], legal_actions: Sequence[Sequence[str]]) -> ConstraintMasks:
        """``constraint_masks`` with this object's caches."""
        if len(response_ids) != len(legal_actions):
            raise UserError(f"got legal actions for {len(legal_actions)} rows and {len(response_ids)} responses")
        rows, cols, allowed = [], [], []
        for b, (ids, words) in enumerate(zip(response_ids, legal_actions)):
            state = self.row(words)
            for t, tok in enumerate(ids):
                tok = int(tok)
                here = state.allowed
                if here is not None:
                    if tok not in here:
                        raise UserError(
                            f"response {b} has token {tok} at position {t} where only {list(here)} were "
                            "allowed: it was not sampled with these legal actions (pass the words given "
                            "to generate, or none for an unconstrained response)"
                        )
                    rows.append(b)
                    cols.append(t)
                    allowed.append(here)
                state.push(tok)
        return ConstraintMasks(
            torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long), tuple(allowed)
        )


class RowConstraint:
    """The state of one response: free, constrained (at a trie node), or done.

    ``allowed`` is what the NEXT token may be (None: unconstrained); ``push(id)`` appends a token.
    """

    def __init__(self, owner: ActionConstraints, words: tuple[str, ...]):
        self.owner, self.words = owner, words
        self.ids: list[int] = []
        self.node: Node | None = None
        self.done = not words  # no legal word: nothing to enforce
        self._search_from = 0  # character offset for the next prefix search (after a skipped one)

    @property
    def allowed(self) -> tuple[int, ...] | None:
        return TokenTrie.allowed(self.node) if self.node is not None else None

    @property
    def constrained(self) -> bool:
        return self.node is not None

    def push(self, token: int) -> None:
        token = int(token)
        self.ids.append(token)
        if self.done:
            return
        if self.node is not None:
            child = TokenTrie.child(self.node, token)
            if child is None:
                raise ValueError(f"token {token} is not allowed here: allowed {self.allowed}")
            self.node = child if child else None
            self.done = not child  # the stop token ends the trie
            return
        if token == self.owner.stop_id:
            self.done = True
            return
        if not self.owner.has_quote(token):
            return
        text = self.owner.decode(self.ids)
        while True:
            match = ACTION_PREFIX.search(text, self._search_from)
            if match is None:
                return
            self._search_from = match.start() + 1
            trie = self.owner.trie(self.ids[-_TAIL:], text[match.end():], self.words)
            if trie is not None:
                self.node = trie.root
                return


class ConstrainedBatch:
    """The sampler's view: one ``RowConstraint`` per row, the masks for the next step, and ``push``."""

    def __init__(self, owner: ActionConstraints, legal_actions: Sequence[Sequence[str]], stop_ids: Sequence[int]):
        self.rows = [owner.row(words) for words in legal_actions]
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.finished = [False] * len(self.rows)

    def step_masks(self, vocab_size: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [K] long, allowed [K, V] bool) for the rows constrained at this step."""
        active = [i for i, r in enumerate(self.rows) if r.node is not None and not self.finished[i]]
        rows = torch.tensor(active, dtype=torch.long, device=device)
        if not active:
            return rows, torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        return rows, allowed_matrix([self.rows[i].allowed for i in active], vocab_size, device)

    def push(self, tokens: Sequence[int]) -> None:
        """Append the drawn token of every row (rows past their stop token are left alone)."""
        for i, tok in enumerate(tokens):
            if self.finished[i]:
                continue
            self.rows[i].push(int(tok))
            self.finished[i] = int(tok) in self.stop_ids


def constraint_masks(
    tokenizer: Any,
    response_ids: Sequence[Sequence[int]],
    legal_actions: Sequence[Sequence[str]],
    stop_id: int,
    constraints: ActionConstraints | None = None,
) -> ConstraintMasks:
    """Which response positions were constrained, and to which ids -- the same as during sampling.

    response_ids: B lists of token ids (unpadded, as sampled, stop token included); legal_actions: B
    lists of words. Returns ``ConstraintMasks(rows [K], cols [K], allowed)``. Pass ``constraints``
    (an ``ActionConstraints`` for this tokenizer and stop id) to reuse its caches. Raises ``UserError``
    when a response has a token outside the allowed set (it was not sampled under these words).
    """
    owner = constraints if constraints is not None else ActionConstraints(tokenizer, stop_id)
    return owner.masks(response_ids, legal_actions)


__all__ = [
    "ACTION_PREFIX",
    "CLOSING",
    "ActionConstraints",
    "ConstrainedBatch",
    "ConstraintMasks",
    "RowConstraint",
    "TokenTrie",
    "allowed_matrix",
    "constraint_masks",
]
