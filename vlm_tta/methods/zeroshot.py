"""Zero-shot classification (Radford et al., "Learning Transferable Visual Models From Natural
Language Supervision", ICML 2021): the original view's embedding against the class embeddings,
with the model's own logit scale (and SigLIP's bias). Single prompts and prompt ensembles differ
only in the class embeddings (``templates=`` of :func:`vlm_tta.classify`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MethodOptionError
from .base import Method, Prediction, register_method

SCORES = ("msp", "mcm", "max_logit", "energy", "none")


@dataclass
class ZeroShotConfig:
    #: the per-image in-distribution score: ``msp`` max softmax probability of the model's logits;
    #: ``mcm`` max softmax of cosine / ``mcm_temperature`` (MCM, Ming et al., NeurIPS 2022, T = 1);
    #: ``max_logit``; ``energy`` = logsumexp of the logits; ``none`` for no score.
    score: str = "msp"
    mcm_temperature: float = 1.0  # MCM's default (Ming et al. 2022, section 4)

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise MethodOptionError(f"score must be one of {', '.join(SCORES)}; got {self.score!r}")
        if not self.mcm_temperature > 0:
            raise MethodOptionError(f"mcm_temperature must be > 0; got {self.mcm_temperature}")


def id_scores(logits: torch.Tensor, cosines: torch.Tensor, score: str, temperature: float = 1.0) -> torch.Tensor | None:
    """Per-row in-distribution scores (higher = more in-distribution) for N x C logits."""
    if score == "msp":
        return logits.softmax(-1).max(-1).values
    if score == "mcm":
        return (cosines / temperature).softmax(-1).max(-1).values
    if score == "max_logit":
        return logits.max(-1).values
    if score == "energy":
        return torch.logsumexp(logits, dim=-1)
    return None


@register_method("zeroshot", "zero-shot", "zs", "clip")
class ZeroShot(Method):
    """CLIP/SigLIP zero-shot prediction on the original view (no adaptation)."""

    config_class = ZeroShotConfig
    episodic = True

    def predict_batch(self, features: torch.Tensor) -> list[Prediction]:
        image = features[:, 0] if features.ndim == 3 else features
        cosines = image @ self.ctx.class_features.T
        logits = self.ctx.logits(image)
        scores = id_scores(logits, cosines, self.config.score, self.config.mcm_temperature)
        return [Prediction(logits[i], None if scores is None else float(scores[i])) for i in range(len(image))]

    def predict_features(self, features: torch.Tensor) -> Prediction:
        return self.predict_batch(features.unsqueeze(0))[0]
