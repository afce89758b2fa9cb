"""A synthetic language whose structure is known, deterministic from a seed.

Vocabulary (64 ids by default): ids ``0 .. n_text - 1`` are *text* tokens, the last
``2 * n_bracket_pairs`` ids are brackets, ``open = n_text + 2k`` and ``close = n_text + 2k + 1``
for pair ``k``.

Every sequence (32 tokens by default) is built from

- one random *segment* of 6-10 uniformly drawn text tokens, written twice, with filler before,
  between and after the two copies;
- *filler*: Markov text, in which every text token has 3 possible successors with fixed
  probabilities ``(0.7, 0.2, 0.1)`` (a transition table drawn once from ``language_seed``; the
  bigram entropy is 0.80 nats), interleaved with *nested brackets*: at a filler position an
  open bracket of a random pair is written with probability ``p_open`` (while the depth is
  below ``max_depth``), else, when a bracket is open, the close bracket matching the innermost
  open one with probability ``p_close``; otherwise a text token. After a bracket (or at the
  start of the sequence) the Markov text restarts from a uniform text token; after a text
  token (also the last token of a segment copy) it continues with a Markov successor.

Every position gets a *type label*, the reason its token is (or is not) predictable from the
tokens before it (``TYPE_NAMES``):

- ``other`` (0): not predictable beyond the unigram rate: the first token, segment tokens of
  the first copy, the first token of the second copy, a text token right after a bracket;
- ``bigram`` (1): a Markov successor of the previous (text) token;
- ``induction`` (2): tokens 2..L of the second copy; ``tokens[p2 + j] == tokens[p1 + j]`` for
  the copies starting at ``p1`` and ``p2``, so once the second copy has started they can be read
  off the first one;
- ``bracket_open`` (3): an open bracket;
- ``bracket_close`` (4): a close bracket; *which* close it is follows from the innermost open
  bracket (whether one comes here does not).

Alignment with per-token losses. ``types[:, s]`` labels the token *at* position ``s``. A
language model's loss at position ``s`` predicts token ``s + 1``
(:func:`observables.token_losses` gives ``[n, 31]`` for ``[n, 32]`` tokens), so its label is
``types[:, s + 1]``: :func:`target_types` returns ``types[:, 1:]`` (shape ``[n, 31]``), aligned
element by element with ``token_losses(model(tokens), tokens)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

TYPE_NAMES: tuple[str, ...] = ("other", "bigram", "induction", "bracket_open", "bracket_close")
OTHER, BIGRAM, INDUCTION, BRACKET_OPEN, BRACKET_CLOSE = range(len(TYPE_NAMES))
SUCCESSOR_PROBS = (0.7, 0.2, 0.1)


@dataclass(frozen=True)
class Dataset:
    """``tokens`` and ``types`` ``[n, seq_len]`` (long); ``type_names[k]`` names label ``k``.

    ``seg_starts`` ``[n, 2]`` and ``seg_len`` ``[n]`` locate the two segment copies.
    """

    tokens: Tensor
    types: Tensor
    type_names: tuple[str, ...]
    seg_starts: Tensor
    seg_len: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def target_types(self) -> Tensor:
        """Labels of the *predicted* tokens, ``[n, seq_len - 1]``: see :func:`target_types`."""
        return target_types(self.types)

    def __getitem__(self, idx) -> Dataset:
        return Dataset(self.tokens[idx], self.types[idx], self.type_names,
                       self.seg_starts[idx], self.seg_len[idx])


def target_types(types: Tensor) -> Tensor:
    """Label of the token each per-token loss predicts: ``types[..., 1:]``.

    ``token_losses(logits, tokens)[i, s]`` is ``-log p(tokens[i, s+1] | tokens[i, :s+1])``; its
    label is ``types[i, s+1]``. Shapes ``[n, 32] -> [n, 31]``.
    """
    return types[..., 1:]


@dataclass(frozen=True)
class Language:
    """The fixed parts of the language: vocabulary layout and transition table."""

    seed: int = 0
    vocab: int = 64
    seq_len: int = 32
    n_bracket_pairs: int = 4
    seg_min: int = 6
    seg_max: int = 10
    p_open: float = 0.08
    p_close: float = 0.25
    max_depth: int = 3

    def __post_init__(self):
        if self.n_text < 3 + self.seg_max:
            raise ValueError("vocabulary too small for the brackets and segments")
        if 2 * self.seg_max + 3 > self.seq_len:
            raise ValueError("seq_len too short for two segment copies and filler")

    @property
    def n_text(self) -> int:
        return self.vocab - 2 * self.n_bracket_pairs

    @property
    def open_ids(self) -> tuple[int, ...]:
        return tuple(self.n_text + 2 * k for k in range(self.n_bracket_pairs))

    @property
    def close_ids(self) -> tuple[int, ...]:
        return tuple(self.n_text + 2 * k + 1 for k in range(self.n_bracket_pairs))

    @cached_property
    def successors(self) -> np.ndarray:
        """``[n_text, 3]``: the 3 distinct successors of each text token, most likely first."""
        rng = np.random.default_rng([self.seed, 0x5EED])
        return np.stack([rng.choice(self.n_text, size=3, replace=False)
                         for _ in range(self.n_text)])

    def transition_matrix(self) -> np.ndarray:
        """``[n_text, n_text]`` bigram probabilities of the Markov text."""
        t = np.zeros((self.n_text, self.n_text))
        for a in range(self.n_text):
            t[a, self.successors[a]] = SUCCESSOR_PROBS
        return t

    def sample(self, n_sequences: int, seed: int) -> Dataset:
        rng = np.random.default_rng([self.seed, seed])
        n, T = n_sequences, self.seq_len
        tokens = np.zeros((n, T), dtype=np.int64)
        types = np.zeros((n, T), dtype=np.int64)
        starts = np.zeros((n, 2), dtype=np.int64)
        lens = np.zeros(n, dtype=np.int64)
        succ = self.successors
        for i in range(n):
            L = int(rng.integers(self.seg_min, self.seg_max + 1))
            # filler lengths: before >= 1, between >= 1, after >= 0, summing to T - 2L
            a, b = np.sort(rng.choice(np.arange(1, T - 2 * L), size=2, replace=False))
            p1 = int(a)
            p2 = int(b) + L
            seg = rng.choice(self.n_text, size=L, replace=False)
            starts[i] = (p1, p2)
            lens[i] = L
            tok, typ = tokens[i], types[i]
            stack: list[int] = []
            text_prev = False  # is the previous token a text token?
            s = 0
            while s < T:
                if s == p1 or s == p2:
                    tok[s:s + L] = seg
                    typ[s:s + L] = OTHER if s == p1 else INDUCTION
                    typ[s] = OTHER
                    s += L
                    text_prev = True
                    continue
                u = rng.random()
                if u < self.p_open and len(stack) < self.max_depth:
                    k = int(rng.integers(self.n_bracket_pairs))
                    stack.append(k)
                    tok[s], typ[s] = self.open_ids[k], BRACKET_OPEN
                    text_prev = False
                elif stack and u < self.p_open + self.p_close:
                    tok[s], typ[s] = self.close_ids[stack.pop()], BRACKET_CLOSE
                    text_prev = False
                elif text_prev:
                    j = rng.choice(3, p=SUCCESSOR_PROBS)
                    tok[s], typ[s] = succ[tok[s - 1], j], BIGRAM
                else:
                    tok[s], typ[s] = rng.integers(self.n_text), OTHER
                    text_prev = True
                s += 1
        return Dataset(torch.from_numpy(tokens), torch.from_numpy(types), TYPE_NAMES,
                       torch.from_numpy(starts), torch.from_numpy(lens))


def make_dataset(n_sequences: int, seed: int, language_seed: int = 0, **language_kw) -> Dataset:
    """``n_sequences`` sequences of the language ``Language(language_seed, **language_kw)``.

    The same ``(language_seed, seed)`` gives the same tokens; different ``seed`` with the same
    ``language_seed`` gives new sequences of the same language (same transition table).
    """
    return Language(seed=language_seed, **language_kw).sample(n_sequences, seed)


def repeated_random(n_sequences: int, half: int = 16, seed: int = 0, n_text: int = 56) -> Tensor:
    """``[n, 2 * half]``: ``half`` distinct uniform text tokens, then the same ``half`` again."""
    g = torch.Generator().manual_seed(seed)
    first = torch.stack([torch.randperm(n_text, generator=g)[:half] for _ in range(n_sequences)])
    return torch.cat([first, first], dim=1)
