"""ZERO (Farina, Franchi, Iacca, Mancini and Ricci, "Frustratingly Easy Test-Time Adaptation of
Vision-Language Models", NeurIPS 2024; code: FarinaMatteo/zero, ``ttas/zero.py``).

Episodic and backpropagation-free. Each image is seen through 64 views (the original and 63 random
crops with flips, for every dataset); the ``int(0.3 V)`` views with the lowest entropy at the model's
temperature are kept; then the temperature is set to (almost) zero, so every kept view casts a
one-hot vote for its argmax class, and the class with most votes wins. A tie between classes is
broken by walking the *remaining* views in increasing entropy and taking the first whose argmax is
a tied class.

Reference behaviour reproduced by default, with the options that change it:

* "zero temperature" is ``softmax(cos / eps)`` with eps the float32 machine epsilon, summed over the
  kept views (``vote="eps_softmax"``): a one-hot vote unless two classes' cosines are within a few
  eps of each other, where the vote is shared; ``vote="argmax"`` casts strict one-hot votes;
* when no remaining view predicts a tied class, the reference falls back to the argmax of the first
  remaining view's cosines after masking the classes ``C - 1 - t`` for each tied class ``t`` (it
  writes ``logit[~ties]`` with integer ties, a bitwise not) — so the fallback may pick an untied
  class (``tie_fallback="reference"``); ``tie_fallback="tied_only"`` takes that view's best tied
  class. With no remaining view at all (``gamma = 1``; the reference fails there) the lowest tied
  class index wins;
* views are ranked by ``-sum p log p`` of ``softmax(cos / T)`` as written: when a probability
  underflows to exactly 0 (a logit gap above ~100, which real CLIP cosines at scale 100 never reach
  in fp32) that entropy is NaN and the view ranks *last* (``underflow_ranks_last=True``);
  ``underflow_ranks_last=False`` counts ``0 log 0`` as 0, so such a very confident view ranks first;
* the winner of a tie gets one extra vote, and the output is the vote vector: here ``probs`` are the
  votes divided by their sum (the reference's output ``p_bar`` normalised) and ``score`` the winner's
  share. The reference runs in the model's dtype (fp16 on a GPU, where probabilities underflow far
  sooner); here everything is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MethodOptionError
from ..views import ViewSet
from .base import Method, Prediction, register_method
from .common import (
    blockwise,
    check_choice,
    check_int,
    check_view_features,
    gather_views,
    n_confident,
    prob_entropy,
    probs_to_logits,
)

VOTES = ("eps_softmax", "argmax")
TIE_FALLBACKS = ("reference", "tied_only")


@dataclass
class ZeroConfig:
    n_views: int = 64  # ttas/zero.py set_hyperparams: num_views = 64 (the original + 63 views)
    gamma: float = 0.3  # ttas/zero.py set_hyperparams: gamma = 0.3, keeps int(0.3 V) views
    view_recipe: str = "crop_flip"  # data/augs.py MultiViewCropAndFlip: RandomResizedCrop + flip, all datasets
    view_seed: int = 0  # seed of the random views
    vote: str = "eps_softmax"  # "eps_softmax": softmax(cos / float32 eps) summed (reference); "argmax": one-hot
    tie_fallback: str = "reference"  # "reference": utils/tools.py break_sample_tie as written; "tied_only"
    underflow_ranks_last: bool = True  # ttas/base.py confidence_filter: NaN entropy (0 log 0) sorts last

    def __post_init__(self) -> None:
        check_int("n_views", self.n_views, 1)
        if not 0 < self.gamma <= 1:
            raise MethodOptionError(f"gamma must be in (0, 1]; got {self.gamma}")
        n_confident(self.n_views, self.gamma)  # raises when no view would be kept
        check_choice("vote", self.vote, VOTES)
        check_choice("tie_fallback", self.tie_fallback, TIE_FALLBACKS)
        ViewSet(self.view_recipe if self.n_views > 1 else "original", self.n_views, self.view_seed)  # validates


@register_method("zero")
class Zero(Method):
    """ZERO: majority vote of the most confident augmented views at zero temperature."""

    config_class = ZeroConfig
    episodic = True

    def view_set(self) -> ViewSet:
        cfg = self.config
        return ViewSet(cfg.view_recipe if cfg.n_views > 1 else "original", cfg.n_views, cfg.view_seed)

    def predict_batch(self, features: torch.Tensor) -> list[Prediction]:
        features = check_view_features(features, self.config.n_views, self.name)
        cos = features @ self.ctx.class_features.T  # N x V x C, the reference's unscaled logits
        votes = blockwise(self.votes, cos, per_image=cos.shape[1] * cos.shape[2])  # exact, cache-sized blocks
        shares = votes / votes.sum(-1, keepdim=True)
        logits = probs_to_logits(votes)
        top = shares.max(-1).values.tolist()
        return [Prediction(logits[i], top[i]) for i in range(len(features))]

    def predict_features(self, features: torch.Tensor) -> Prediction:
        return self.predict_batch(features.unsqueeze(0))[0]

    def votes(self, cos: torch.Tensor) -> torch.Tensor:
        """Votes per class (N x C) of images' view cosines (N x V x C): rank the views by entropy at
        the model's temperature, let the ``int(gamma V)`` most confident vote, break ties."""
        probs = (cos / (1.0 / self.ctx.logit_scale)).softmax(-1)  # at the model's temperature
        ent = -(probs * probs.log()).sum(-1) if self.config.underflow_ranks_last else prob_entropy(probs)
        order = torch.argsort(ent, dim=-1, stable=True)  # most confident view first (NaN last)
        k = n_confident(cos.shape[1], self.config.gamma)
        return self.break_ties(self.vote(gather_views(cos, order[:, :k])), cos, order[:, k:])

    def vote(self, kept: torch.Tensor) -> torch.Tensor:
        """Votes per class (N x C) of the kept views' cosines (N x k x C)."""
        if self.config.vote == "argmax":
            return torch.nn.functional.one_hot(kept.argmax(-1), kept.shape[-1]).sum(1).to(kept.dtype)
        return (kept / torch.finfo(kept.dtype).eps).softmax(-1).sum(1)

    def break_ties(self, votes: torch.Tensor, cos: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """Give one more vote to the tie-breaker of every image whose top vote count is shared.
        ``cos``: the views' cosines (N x V x C); ``rest``: the indices of the views that were not kept,
        most confident first (N x (V-k))."""
        tied = votes == votes.max(-1, keepdim=True).values
        rows = (tied.sum(-1) > 1).nonzero().squeeze(1)
        if len(rows) == 0:
            return votes
        tied, rest = tied[rows], rest[rows]  # R x C, R x (V-k)
        if rest.shape[1] == 0:  # no view left to ask (gamma = 1): the lowest tied class
            winner = tied.int().argmax(-1)
        else:
            # each remaining view's class (R x (V-k)): the argmax of every view (max().indices: the same
            # first maximal index as argmax, ~2x faster on the CPU), then the remaining views'
            every = cos.max(-1).indices[rows] if 2 * len(rows) >= len(cos) else cos[rows].max(-1).indices
            pred = every.gather(1, rest)
            hit = tied.gather(1, pred)  # does it name a tied class?
            winner = pred.gather(1, hit.int().argmax(1, keepdim=True)).squeeze(1)  # the first that does
            masked = tied.flip(-1) if self.config.tie_fallback == "reference" else ~tied
            first = cos[rows, rest[:, 0]]  # R x C: the cosines of the first remaining view
            fallback = first.masked_fill(masked, float("-inf")).argmax(-1)
            winner = torch.where(hit.any(1), winner, fallback)
        votes = votes.clone()
        votes[rows, winner] += 1
        return votes
