"""Per-token log-probs and the chain-of-thought / action split, as pure functions.

RL4VLM scores a response as ``lambda * sum logp(CoT tokens) + sum logp(action tokens)``: the tokens
before the last ``"action"`` key are the chain of thought, the key and everything after it the action.
The split is found in the decoded text and mapped back to tokens through character offsets, so it
works for any tokenizer (byte-level BPE, SentencePiece, ...) and never relies on particular token ids.

Shapes: B = batch, T = response tokens (padded), V = vocabulary.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch
import torch.nn.functional as F

# Same key pattern as tasks/parsing.py: the parser reads the action after the LAST match.
_ACTION_KEY = re.compile(r'"action"\s*:')


def policy_logprobs(logits: torch.Tensor, temperature: float = 1.0, banned: Sequence[int] = ()) -> torch.Tensor:
    """The policy's log-distribution: ``log_softmax(logits / temperature)`` with ``banned`` ids removed.

    logits [..., V] -> [..., V] float32. ``temperature <= 0`` (greedy) is scored at temperature 1.
    Banned ids (image placeholders) get -inf: sampling one would break the next forward pass.
    """
    scaled = logits.float()
    if temperature > 0 and temperature != 1.0:
        scaled = scaled / temperature
    if len(banned):
        scaled = scaled.index_fill(-1, torch.as_tensor(list(banned), device=scaled.device), float("-inf"))
    return F.log_softmax(scaled, dim=-1)


def constrain_logprobs(logp: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Renormalise a log-distribution over the allowed ids only (constrained action decoding).

    logp [..., V] (from ``policy_logprobs``), allowed [..., V] bool -> [..., V] float32, -inf off the
    allowed set. The sampler and the scorer both call this, so they agree to the last bit of the op.
    """
    return F.log_softmax(logp.masked_fill(~allowed, float("-inf")), dim=-1)


def _entropy(logp_all: torch.Tensor) -> torch.Tensor:
    # excluded entries are -inf with probability 0: zero them so 0 * -inf does not give nan
    finite = logp_all.masked_fill(torch.isinf(logp_all), 0.0)
    return -(logp_all.exp() * finite).sum(-1)


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    banned: Sequence[int] = (),
    masked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each token and the entropy of each position under ``policy_logprobs``.

    logits [B, T, V] (position t predicts tokens[:, t]), tokens [B, T] -> (logp [B, T], entropy [B, T]),
    both float32. ``masked = (rows [K], cols [K], allowed [K, V] bool)``: at those K positions the
    distribution is ``constrain_logprobs`` (renormalised over the allowed ids), for the log-prob and
    the entropy alike; only the K rows are renormalised, so no second [B, T, V] tensor is made.
    """
    logp_all = policy_logprobs(logits, temperature, banned)
    logp = logp_all.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    entropy = _entropy(logp_all)
    if masked is not None and masked[0].numel():
        rows, cols, allowed = (m.to(logits.device) for m in masked)
        sub = constrain_logprobs(logp_all[rows, cols], allowed)  # [K, V]
        picked = sub.gather(-1, tokens[rows, cols].long().unsqueeze(-1)).squeeze(-1)
        logp = logp.index_put((rows, cols), picked)
        entropy = entropy.index_put((rows, cols), _entropy(sub))
    return logp, entropy


_THOUGHTS_KEY = re.compile(r'"thoughts"\s*:')


def reading_end(text: str) -> int | None:
    """Character index where the CoT's reading of the state ends: the first ``"thoughts":`` key
    before the last ``"action":`` key (``Task.response`` writes the state fields, then the thoughts,
    then the action). None when there is no such key: the answer then has no reading."""
    action = action_key_start(text)
    m = _THOUGHTS_KEY.search(text)
    if m is None or (action is not None and m.start() > action):
        return None
    return m.start()


def action_key_start(text: str) -> int | None:
    """Character index where the last ``"action":`` key starts in ``text``, or None if there is none."""
    matches = list(_ACTION_KEY.finditer(text))
    return matches[-1].start() if matches else None


def prefix_char_ends(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """``ends[t]`` = number of characters that ``ids[: t + 1]`` decode to (special tokens skipped).

    Decoding every prefix is the tokenizer-independent way to get character offsets for a given id
    sequence (re-tokenizing the text could split it differently from what was sampled). A prefix that
    ends inside a multi-byte character decodes with a replacement char; the running max keeps the
    ends non-decreasing.
    """
    ids = [int(i) for i in ids]
    if not ids:
        return []
    texts = tokenizer.batch_decode(
        [ids[: t + 1] for t in range(len(ids))], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    ends, top = [], 0
    for text in texts:
        top = max(top, len(text))
        ends.append(top)
    return ends


def _decoded_length(tokenizer: Any, ids: Sequence[int]) -> int:
    return len(tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False))


def first_token_past(tokenizer: Any, ids: Sequence[int], pos: int, text: str) -> int:
    """``token_at_char(prefix_char_ends(tokenizer, ids), pos)`` with O(log T) decodes instead of T.

    ``text`` is the decode of all of ``ids``. Binary search needs the decoded prefix length to be
    non-decreasing in the prefix; that holds whenever the text is pure ASCII (no prefix can end
    inside a multi-byte character). Otherwise (e.g. byte-fallback tokens that decode to one
    replacement char per byte, then fewer chars once the character completes) the exact linear scan
    runs, so the result is always the same as the slow path.
    """
    ids = [int(i) for i in ids]
    if not text.isascii() or pos >= len(text):
        return token_at_char(prefix_char_ends(tokenizer, ids), pos)
    lo, hi = 0, len(ids) - 1  # the whole sequence decodes to text, which reaches past pos
    while lo < hi:
        mid = (lo + hi) // 2
        if _decoded_length(tokenizer, ids[: mid + 1]) > pos:
            hi = mid
        else:
            lo = mid + 1
    return lo


def boundary_from_ids(tokenizer: Any, ids: Sequence[int], text: str | None = None) -> int:
    """``action_boundary(text, prefix_char_ends(tokenizer, ids))`` with O(log T) decodes.

    ``text`` defaults to the decode of ``ids`` (special tokens skipped, no clean-up), as in the slow path.
    """
    ids = [int(i) for i in ids]
    if text is None:
        text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    start = action_key_start(text)
    if start is None:
        return len(ids)
    return first_token_past(tokenizer, ids, start, text)


def token_at_char(char_ends: Sequence[int], pos: int) -> int:
    """Index of the first token whose text reaches past character ``pos`` (the token containing it).

    char_ends [T] non-decreasing; returns T when no token does (``pos`` beyond the text).
    """
    for t, end in enumerate(char_ends):
        if end > pos:
            return t
    return len(char_ends)


def action_boundary(text: str, char_ends: Sequence[int]) -> int:
    """Number of leading CoT tokens: tokens before the one holding the last ``"action"`` key.

    A token that straddles the key (e.g. ``, "`` merged with the opening quote) counts as action.
    Without a key (an invalid answer) every token is CoT, so the whole text gets the lambda weight.
    """
    start = action_key_start(text)
    if start is None:
        return len(char_ends)
    return token_at_char(char_ends, start)


def cot_weights(boundaries: torch.Tensor, lengths: torch.Tensor, width: int, thought_weight: float,
                readings: torch.Tensor | None = None, reading_weight: float | None = None) -> torch.Tensor:
    """Per-token weights: ``thought_weight`` before the boundary, 1 from it on, 0 past the length;
    ``reading_weight`` (None: ``thought_weight``) on the first ``readings`` tokens (the state fields).

    boundaries [B], lengths [B], readings [B] or None (left-aligned responses) -> weights [B, width] float32.
    """
    t = torch.arange(width, device=lengths.device).unsqueeze(0)
    inside = t < lengths.unsqueeze(1)
    weights = torch.where(t < boundaries.to(lengths.device).unsqueeze(1), thought_weight, 1.0)
    if readings is not None and reading_weight is not None and reading_weight != thought_weight:
        weights = torch.where(t < readings.to(lengths.device).unsqueeze(1), reading_weight, weights)
    return torch.where(inside, weights, 0.0).float()


def reading_from_ids(tokenizer: Any, ids: Sequence[int], text: str | None = None) -> int:
    """Number of leading tokens that hold the CoT's reading of the state (before the token that holds
    the ``"thoughts"`` key, ``reading_end``); 0 without one. ``text`` as in ``boundary_from_ids``."""
    ids = [int(i) for i in ids]
    if text is None:
        text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    end = reading_end(text)
    return 0 if end is None else first_token_past(tokenizer, ids, end, text)


def right_to_left(x: torch.Tensor, lengths: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Move right-aligned rows to the left: row i's last ``lengths[i]`` entries become its first.

    x [B, W], lengths [B] -> [B, W] with ``fill`` after each row's length.
    """
    width = x.shape[1]
    t = torch.arange(width, device=x.device).unsqueeze(0)
    src = (t + (width - lengths.to(x.device)).unsqueeze(1)).clamp(max=width - 1)
    out = x.gather(1, src)
    return out.masked_fill(t >= lengths.to(x.device).unsqueeze(1), fill)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True/1 entries of mask along the last dim: [B, T], [B, T] -> [B] (0 if empty)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


__all__ = [
    "action_boundary",
    "constrain_logprobs",
    "action_key_start",
    "boundary_from_ids",
    "cot_weights",
    "reading_end",
    "reading_from_ids",
    "first_token_past",
    "masked_mean",
    "policy_logprobs",
    "prefix_char_ends",
    "right_to_left",
    "token_at_char",
    "token_logprobs",
]
