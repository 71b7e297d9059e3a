"""Small pieces of mathematics that several methods share, written once.

* :func:`entropy` — Shannon entropy (nats) of ``softmax(logits)`` along the last dimension;
* :func:`confident_views` — indices of the ``int(fraction * V)`` lowest-entropy views (TPT's
  confidence selection, reused by DiffTPT, STS, TDA, DMN, ZERO); :func:`lowest` for any other
  per-view score (DMN and ZERO rank views by :func:`prob_entropy`);
* :func:`prob_entropy` — entropy of given probabilities with the reference codes' ``log(p + eps)``;
* :func:`affinity` — Tip-Adapter's sharpened similarity ``exp(-beta (1 - s))`` (TDA's caches, DMN's
  memory read-out);
* :func:`probs_to_logits` — logits whose softmax is a given (unnormalised) probability vector, for
  methods whose output is a sum of probabilities or a vote count (DMN, ZERO);
* :func:`check_view_features` — the N x V x D input check every feature-level method shares;
  :func:`check_choice`, :func:`check_int`, :func:`check_number` — option checks for config classes;
* :class:`KeyStore` — keys written one at a time by an online method, read by a batch of queries in
  one matrix product (TDA's caches, DMN's memory);
* :func:`marginal_entropy` — entropy of the averaged probability of a set of views, computed in log
  space exactly as TPT's ``avg_entropy`` (log-mean-exp of the log-softmax, clamped at the dtype's
  minimum), the loss of TPT, DiffTPT and STS;
* :func:`resolve_preset` — per-dataset settings kept as data and selected by a dataset name.

Everything works on leading batch dimensions, so episodic methods can treat many images as
independent problems in one call. (Adam and AdamW are element-wise, so one optimizer over a
parameter stacked along a batch dimension is exactly one independent optimizer per image, as long
as the loss is the *sum* of the per-image losses.)
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ..errors import FeatureError, MethodOptionError


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of ``softmax(logits)`` over the last dimension (``... x C -> ...``), computed as
    the reference codes do (TPT's and TDA's ``-(softmax * log_softmax).sum``), so views rank alike."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def prob_entropy(probs: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Entropy in nats of probabilities over the last dimension, ``-sum(p * log(p + eps))`` (DMN adds
    ``eps`` = 1e-6 to rank views and 1e-8 for its memory; ZERO adds none). With ``eps = 0`` a zero
    probability contributes 0 (``xlogy``), where ``p * log(p)`` would give NaN."""
    if eps == 0.0:
        return -torch.special.xlogy(probs, probs).sum(-1)
    return -(probs * torch.log(probs + eps)).sum(-1)


def n_confident(n_views: int, fraction: float) -> int:
    """How many views a selection keeps: ``int(n_views * fraction)`` (TPT's rounding down).

    Raises a clear error when that is zero: the selection would be empty.
    """
    k = int(n_views * fraction)
    if k < 1:
        need = math.ceil(1.0 / fraction) if fraction > 0 else float("inf")
        raise MethodOptionError(
            f"keeping a fraction {fraction} of {n_views} view(s) keeps none (int({n_views} x {fraction}) = 0); "
            f"use at least {need} views or a larger selection fraction"
        )
    return k


def confident_views(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (``... x k``) of the ``k = int(V * fraction)`` lowest-entropy views of ``... x V x C``
    logits, most confident first. Ties keep the lower view index (a stable sort)."""
    return lowest(entropy(logits), fraction)


def lowest(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (``... x k``) of the ``k = int(V * fraction)`` smallest of ``... x V`` scores, smallest
    first; ties keep the lower index (a stable sort). A clear error when ``k`` is 0."""
    k = n_confident(scores.shape[-1], fraction)
    return torch.argsort(scores, dim=-1, stable=True)[..., :k]


def gather_views(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (``... x k``) of ``x`` (``... x V x F``) along the view dimension -> ``... x k x F``."""
    return torch.gather(x, -2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean probability over views (``... x V x C -> ...``), TPT's ``avg_entropy``:
    ``log p_bar = logsumexp_v(log_softmax(logits_v)) - log V``, clamped at the dtype's minimum,
    then ``-sum(p_bar * log p_bar)``. Not the mean of the per-view entropies."""
    logp = logits - logits.logsumexp(-1, keepdim=True)
    avg = logp.logsumexp(-2) - math.log(logits.shape[-2])
    avg = avg.clamp(min=torch.finfo(avg.dtype).min)
    return -(avg * avg.exp()).sum(-1)


def affinity(similarity: torch.Tensor, beta: float) -> torch.Tensor:
    """Tip-Adapter's affinity ``exp(-beta (1 - s))`` of similarities ``s`` (Zhang et al., ECCV 2022):
    1 for a perfect match, decaying with ``beta``. TDA weighs its cache entries and DMN its memory
    slots with it."""
    return torch.exp(-beta * (1.0 - similarity))


def probs_to_logits(probs: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax is ``probs / probs.sum(-1)``: the log of the normalised vector, with zeros
    mapped to the most negative finite value (so results stay finite and JSON-friendly). For methods
    whose output is a sum of probabilities (DMN) or of votes (ZERO); the argmax is unchanged."""
    p = probs / probs.sum(-1, keepdim=True)
    return torch.log(p).clamp(min=torch.finfo(p.dtype).min)


def check_view_features(features: torch.Tensor, n_views: int, method: str) -> torch.Tensor:
    """The first ``n_views`` views of ``N x V x D`` features, after checking the shape and that every
    value is finite; errors say what the method needs."""
    if features.ndim != 3:
        raise FeatureError(f"method {method!r} takes N x V x D view features; got shape {tuple(features.shape)}")
    if features.shape[1] < n_views:
        raise FeatureError(
            f"method {method!r} reads {n_views} views per image but got {features.shape[1]}; pass more views "
            f"or set n_views={features.shape[1]}"
        )
    features = features[:, :n_views]
    if not torch.isfinite(features.sum()) and not torch.isfinite(features).all():  # one cheap pass first
        bad = int((~torch.isfinite(features)).any(-1).any(-1).sum())
        raise FeatureError(f"method {method!r}: {bad} image(s) have NaN or infinite embeddings; check the encoder")
    return features


def check_choice(option: str, value: object, choices: Sequence[str]) -> None:
    """A :class:`MethodOptionError` naming ``option`` and its allowed values unless ``value`` is one."""
    if value not in choices:
        raise MethodOptionError(f"{option} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_int(option: str, value: object, minimum: int) -> None:
    """A :class:`MethodOptionError` unless ``value`` is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MethodOptionError(f"{option} must be an integer >= {minimum}; got {value!r}")


def check_number(option: str, value: float, minimum: float = 0.0) -> None:
    """A :class:`MethodOptionError` unless ``value`` is a finite number >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise MethodOptionError(f"{option} must be a finite number >= {minimum}; got {value!r}")


class KeyStore:
    """Keys that an online method writes one row at a time and reads with a batch of queries.

    :meth:`begin` computes every query's dot product with every row in one matrix product; then
    :meth:`similarities` ``(i)`` gives query ``i``'s dot products with the rows *as they are at that
    moment*, recomputing only the rows written since :meth:`begin`. So a batch is read exactly as a
    loop over its images would read it (each value is the dot product of the query with the row's
    current key), for the price of one matrix product plus a few dot products per image.

    Each row has an integer tag (``tags``: TDA stores the class, DMN the memory slot) and optionally a
    value vector (``values``, ``value_dim`` wide). Rows are never removed: a slot that an online
    method replaces is overwritten with :meth:`set`.
    """

    def __init__(self, dim: int, value_dim: int = 0, capacity: int = 256) -> None:
        capacity = max(1, capacity)
        self.keys = torch.zeros(capacity, dim)
        self.tags = torch.zeros(capacity, dtype=torch.long)
        self.values = torch.zeros(capacity, value_dim) if value_dim else None
        self.n = 0
        self._queries: torch.Tensor | None = None
        self._sims = torch.zeros(0, 0)
        self._n0 = 0
        self._dirty: list[int] = []
        self._dirty_index: torch.Tensor | None = None

    def add(self, key: torch.Tensor, tag: int, value: torch.Tensor | None = None) -> int:
        """Append a row; returns its index."""
        self._reserve(self.n + 1)
        row = self.n
        self.n += 1
        self.tags[row] = tag
        self.set(row, key, value)
        return row

    def extend(self, keys: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        """Append ``len(keys)`` rows at once; returns their indices."""
        self._reserve(self.n + len(keys))
        rows = torch.arange(self.n, self.n + len(keys))
        self.keys[rows], self.tags[rows] = keys, tags
        self.n += len(keys)
        if self._queries is not None:
            self._dirty.extend(rows.tolist())
            self._dirty_index = None
        return rows

    def _reserve(self, size: int) -> None:
        capacity = len(self.keys)
        if size <= capacity:
            return
        while capacity < size:  # grow by doubling
            capacity *= 2

        def grown(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros((capacity - len(t), *t.shape[1:]))])

        self.keys, self.tags = grown(self.keys), grown(self.tags)
        if self.values is not None:
            self.values = grown(self.values)

    def set(self, row: int, key: torch.Tensor, value: torch.Tensor | None = None) -> None:
        """Overwrite row ``row``'s key (and value)."""
        self.keys[row] = key
        if value is not None:
            self.values[row] = value
        if self._queries is not None and row not in self._dirty:
            self._dirty.append(row)
            self._dirty_index = None

    def begin(self, queries: torch.Tensor) -> None:
        """Start reading a batch of queries (``N x D``): one matrix product with the current rows."""
        self._queries = queries
        self._n0 = self.n
        self._sims = queries @ self.keys[: self.n].T
        self._dirty = []
        self._dirty_index = None

    def similarities(self, i: int) -> torch.Tensor:
        """Dot products of query ``i`` (of the last :meth:`begin`) with the current ``n`` rows."""
        if not self._dirty:
            return self._sims[i]
        if self._dirty_index is None:
            self._dirty_index = torch.tensor(self._dirty, dtype=torch.long)
        out = torch.empty(self.n)
        out[: self._n0] = self._sims[i]
        out[self._dirty_index] = self.keys[self._dirty_index] @ self._queries[i]
        return out


def resolve_preset(presets: Mapping[str, Mapping], name: str | None, default: str, what: str) -> Mapping:
    """The settings ``presets[name]`` (``name`` a :mod:`vlm_tta.data` dataset name or alias; None
    gives ``default``), with a clear error naming the known presets."""
    if name is None:
        return presets[default]
    key = str(name).lower()
    if key not in presets:
        try:
            from ..data import resolve_name

            key = resolve_name(name)
        except Exception:  # noqa: BLE001 - an unknown name is reported below
            pass
    if key not in presets:
        raise MethodOptionError(f"unknown {what} preset {name!r}; known presets: {', '.join(sorted(presets))}")
    return presets[key]
