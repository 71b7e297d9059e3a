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
* :func:`blockwise` — per-image work over a batch in cache-sized blocks of images (the same bits,
  several times faster than one pass over an ``N x V x C`` tensor that does not fit in a core's cache);
* :func:`check_view_features` — the N x V x D input check every feature-level method shares;
  :func:`check_choice`, :func:`check_int`, :func:`check_number` — option checks for config classes;
* :class:`KeyStore` — keys written one at a time by an online method, read by a batch of queries in
  one matrix product (TDA's caches, DMN's memory);
* :func:`marginal_entropy` — entropy of the averaged probability of a set of views, computed in log
  space exactly as TPT's ``avg_entropy`` (log-mean-exp of the log-softmax, clamped at the dtype's
  minimum), the loss of TPT, DiffTPT and STS;
* :func:`resolve_preset` — per-dataset settings kept as data and selected by a dataset name;
* :func:`otsu_threshold` and :class:`OtsuQueue` — Otsu's threshold over a grid on a queue of recent
  scores (ZS-NTTA's adaptive threshold, used by AdaND and the benchmark's noisy-TTA baselines).

Everything works on leading batch dimensions, so episodic methods can treat many images as
independent problems in one call. (Adam and AdamW are element-wise, so one optimizer over a
parameter stacked along a batch dimension is exactly one independent optimizer per image, as long
as the loss is the *sum* of the per-image losses.)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
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
    """Rows ``index`` (``... x k``) of ``x`` (``... x V x F``) along the view dimension -> ``... x k x F``.

    A contiguous ``x`` is read with one ``index_select`` of whole rows (a copy, so the same values as
    ``torch.gather``, ~5x faster on the CPU)."""
    *lead, v, f = x.shape
    if x.is_contiguous() and tuple(lead) == tuple(index.shape[:-1]):
        offsets = torch.arange(0, math.prod(lead) * v, v, device=x.device).view(*lead, 1)
        return x.view(-1, f).index_select(0, (index + offsets).flatten()).view(*index.shape, f)
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


#: Elements (fp32) of per-image work that :func:`blockwise` hands over at once: 2^18 = 1 MiB, which
#: stays in a core's L2 cache through a chain of element-wise operations and row reductions.
BLOCK_ELEMENTS = 1 << 18


def blockwise(fn: Callable[..., Any], *tensors: torch.Tensor, per_image: int, elements: int | None = None) -> Any:
    """``fn(*tensors)`` computed on blocks of images and concatenated: an exact speed-up for work
    that treats every image (the first dimension) on its own, as the per-view softmax, entropies,
    view selection and votes of the feature-level methods do.

    The operations in such a chain give the same bits for a row whatever the number of rows, so
    the result is identical to one call on the whole batch; but over a whole ``N x V x C`` batch
    (64 images x 64 views x 1,000 classes = 16 MiB) every operation streams through main memory,
    while a block of ``elements // per_image`` images stays in the cache (3-4x faster on the CPU).
    ``per_image``: the elements of the largest per-image intermediate (e.g. ``V * C``).
    ``fn`` returns a tensor, a tuple of tensors or a dict of tensors (concatenated along dim 0).
    """
    n = len(tensors[0])
    step = max(1, (BLOCK_ELEMENTS if elements is None else elements) // max(1, per_image))
    if step >= n or tensors[0].device.type != "cpu":
        return fn(*tensors)
    outs = [fn(*(t[s : s + step] for t in tensors)) for s in range(0, n, step)]
    if isinstance(outs[0], dict):
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


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

    A method whose writes do not depend on what it reads (TDA: the caches are written from the
    zero-shot summaries) can instead make all of a batch's writes first and read every query at once:
    ``begin(queries, versions=True)``, then each write with :attr:`clock` set to the image's index in
    the batch, then :meth:`versions` gives every query's similarities with every version of every
    row and which versions each query sees (those written up to its own index, or before it), so the
    read-out is a few batched products instead of a loop over the images.

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
        #: the index in the batch of the image whose writes come next (``begin(..., versions=True)``)
        self.clock = 0
        self._written: dict[int, int] | None = None  # row -> clock of its current version's write
        self._old: list[tuple[int, torch.Tensor, torch.Tensor | None, int, int]] = []  # row, key, value, from, until

    def add(self, key: torch.Tensor, tag: int, value: torch.Tensor | None = None) -> int:
        """Append a row; returns its index."""
        self._reserve(self.n + 1)
        row = self.n
        self.n += 1
        self.tags[row] = tag
        if self._written is not None:
            self._written[row] = self.clock
        self.keys[row] = key
        if value is not None:
            self.values[row] = value
        if self._queries is not None and self._written is None:
            self._dirty.append(row)
            self._dirty_index = None
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
        if self._written is not None:  # keep the version being replaced for the queries before the clock
            old_value = self.values[row].clone() if self.values is not None else None
            self._old.append((row, self.keys[row].clone(), old_value, self._written.get(row, -1), self.clock))
            self._written[row] = self.clock
        self.keys[row] = key
        if value is not None:
            self.values[row] = value
        if self._queries is not None and self._written is None and row not in self._dirty:
            self._dirty.append(row)
            self._dirty_index = None

    def begin(self, queries: torch.Tensor, versions: bool = False) -> None:
        """Start reading a batch of queries (``N x D``): one matrix product with the current rows, read
        with :meth:`similarities`; or (``versions=True``) record the writes to read them with :meth:`versions`."""
        self._queries = queries
        self._n0 = self.n
        self._sims = queries @ self.keys[: self.n].T if not versions else torch.zeros(0, 0)
        self._dirty = []
        self._dirty_index = None
        self._written = {} if versions else None
        self._old = []
        self.clock = 0

    def versions(self, inclusive: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every query's view of the store after a batch of writes (``begin(..., versions=True)``).

        Returns ``(sims, rows, visible, values)`` over ``m`` columns, one per version of a row (the
        current rows first, then the replaced versions): ``sims`` (N x m) the queries' dot products
        with each version's key, ``rows`` (m) the row of each version (for its tag), ``visible``
        (N x m, bool) whether query ``i`` sees it (written at a clock ``<= i`` when ``inclusive``, else
        ``< i``, and not yet replaced), and ``values`` (m x value_dim) each version's value. Summing
        over the visible columns of query ``i`` is summing over the rows as they were when image ``i``
        was read in a loop (up to the order of the additions).
        """
        if self._written is None or self._queries is None:
            raise RuntimeError("KeyStore.versions() needs begin(queries, versions=True) before the writes")
        n, shift = self.n, 0 if inclusive else 1
        first = torch.full((n,), -1, dtype=torch.long)  # clock of each current version's write (-1: before)
        if self._written:
            first[torch.tensor(list(self._written))] = torch.tensor(list(self._written.values()))
        last = torch.full((n,), len(self._queries), dtype=torch.long)  # current versions are never replaced
        keys, values, rows = self.keys[:n], self.values[:n] if self.values is not None else None, torch.arange(n)
        if self._old:
            old_rows, old_keys, old_values, old_first, old_last = zip(*self._old)
            keys = torch.cat([keys, torch.stack(old_keys)])
            if values is not None:
                values = torch.cat([values, torch.stack(old_values)])
            rows = torch.cat([rows, torch.tensor(old_rows)])
            first = torch.cat([first, torch.tensor(old_first)])
            last = torch.cat([last, torch.tensor(old_last)])
        i = torch.arange(len(self._queries)).unsqueeze(1)
        visible = (i >= first + shift) & (i < last + shift)
        return self._queries @ keys.T, rows, visible, values

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


#: ZS-NTTA's threshold grid, ``np.arange(0, 1, 0.01)``: 0, 0.01, ..., 0.99 (``i * 0.01`` in float64).
OTSU_GRID = torch.arange(100, dtype=torch.float64) * 0.01


def otsu_threshold(
    scores: torch.Tensor | np.ndarray | Sequence[float], grid: torch.Tensor | None = None, no_split: float | None = None
) -> float:
    """Otsu's threshold of 1-D ``scores``: the grid value minimising the weighted within-group
    variance ``w0 var0 + w1 var1`` of the groups ``{s < th}`` and ``{s >= th}``.

    This is ZS-NTTA's ``compute_os_variance`` search (from OWTTT, ICCV 2023) over
    :data:`OTSU_GRID` (population variances in float64): a threshold that leaves a group empty is
    not a candidate, ties keep the smallest threshold, and when no threshold splits the scores (one
    score, or all equal, or an empty queue) the result is the first grid value, 0.0 (``no_split``
    replaces that value, e.g. ``math.inf`` to flag nothing). Callers flag ``s > threshold`` (strictly
    greater, as the reference does) as noisy / out-of-distribution.
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    if not np.isfinite(s).all():
        raise ValueError("otsu_threshold: the scores contain NaN or infinite values")
    g = (OTSU_GRID if grid is None else torch.as_tensor(grid, dtype=torch.float64)).numpy().reshape(-1)
    if len(g) == 0:
        raise ValueError("otsu_threshold: the threshold grid is empty")
    n = len(s)
    if n == 0:
        return float(g[0]) if no_split is None else no_split
    # Group 0 = {s < th}: its size is a searchsorted count on the sorted scores, its sums prefix sums
    # of the scores centred on their mean (variance = E[c^2] - E[c]^2, accurate once centred).
    c = s - s.mean()
    s1 = np.concatenate([[0.0], np.cumsum(c)])
    s2 = np.concatenate([[0.0], np.cumsum(c * c)])
    n0 = np.searchsorted(s, g, side="left")
    n1 = n - n0
    d0, d1 = np.maximum(n0, 1), np.maximum(n1, 1)
    var0 = s2[n0] / d0 - (s1[n0] / d0) ** 2
    var1 = (s2[n] - s2[n0]) / d1 - ((s1[n] - s1[n0]) / d1) ** 2
    w1 = n1 / n
    criteria = (1 - w1) * var0 + w1 * var1  # the reference's weights: w1 = n1 / n, w0 = 1 - w1
    criteria[(n0 == 0) | (n1 == 0)] = np.inf
    best = int(np.argmin(criteria))  # the first of equal minima
    return no_split if no_split is not None and np.isinf(criteria[best]) else float(g[best])


class OtsuQueue:
    """The last ``length`` scores of a stream and Otsu's threshold over them (ZS-NTTA keeps one for
    the zero-shot OOD scores and one for its detector's, each 512 long). ``fixed`` replaces Otsu's
    threshold by a constant (ZS-NTTA's ``threshold_type="fixed"``)."""

    def __init__(self, length: int, fixed: float | None = None) -> None:
        if length < 1:
            raise ValueError(f"queue length must be >= 1; got {length}")
        self.length = length
        self.fixed = fixed
        self.scores = np.zeros(0, dtype=np.float64)

    def push(self, scores: torch.Tensor | np.ndarray) -> None:
        """Append scores (oldest first) and keep the last ``length``."""
        if isinstance(scores, torch.Tensor):
            scores = scores.detach().cpu().numpy()
        new = np.asarray(scores, dtype=np.float64).reshape(-1)
        self.scores = np.concatenate([self.scores, new])[-self.length :]

    def threshold(self, no_split: float | None = None) -> float:
        """The fixed threshold, or Otsu's over the queue (``no_split``: see :func:`otsu_threshold`)."""
        return float(self.fixed) if self.fixed is not None else otsu_threshold(self.scores, no_split=no_split)

    def __len__(self) -> int:
        return len(self.scores)
