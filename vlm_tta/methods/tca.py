"""TCA: Token Condensation as Adaptation (Wang, Gong, Wang, Huang, Luo, "Is Less More? Exploring
Token Condensation as Training-free Test-time Adaptation", ICCV 2025, arXiv 2410.14729).

Online, training-free, one image at a time, no augmentation; the backbone's weights never change.
Inside the CLIP image transformer, after the attention of a few blocks (3, 6, 9), the patch tokens
are ranked by the class token's attention: the top ones are kept, the next band is merged into K
centres (k-center greedy, inverse-distance weights) and the rest is fused into one token weighted
by its attention, so the MLP and the later blocks run on fewer tokens. A domain-aware token
reservoir keeps, per pseudo-class, up to M confident past images (final embedding, entropy, the
class token after every block); once every class holds two entries, the class means of the stored
class tokens ("domain anchors") join the condensation blocks' attention as an extra key/value, and
at the output a layer-weighted class-token similarity to the reservoir adds
``lambda * sum_j exp(-beta (1 - a_j))`` to each class's CLIP logit (logits self-correction).

Defaults follow the authors' code (Jo-wang/TCA @ 0f846d66: ``runner.py``, ``utils.py``,
``clip/model.py``, ``clip/utils.py``, ``configs/*.yaml``); per-dataset settings (M, tau, lambda,
beta) are selected with ``preset="<dataset>"``. The authors build the class embeddings from CLIP's
per-dataset prompt lists: pass ``templates="<dataset>"`` to :func:`vlm_tta.classify` (``"imagenet"``
for the ImageNet variants) to compare with them. Their backbone is CLIP ViT-B/16 (OpenAI weights).

Where the code and the paper differ, or the code has a quirk, the code is the default:

* drop rate: the code's ``r`` (``--token_pruning Ours-<r>``) is ``drop_rate``; the paper's keep ratio
  R is ``keep_ratio`` (R = 0.9 is ``Ours-0.035``, R = 0.7 is ``Ours-0.1``, R = 1 is no condensation:
  the GFLOPs of the paper's Table 1 are these). Default 0.035, the README's documented value and the
  paper's main row; the code's argparse default is ``Ours-0.1`` (and its ``choices`` reject
  ``Ours-0.035`` on the command line).
* merge centres: the code merges the band into K = 4 centres (``coreset_averaging(num_centers=4)``),
  the paper reports K = 2 (its GFLOPs match K = 2): ``merge_centers=2``.
* ranking: the code ranks patches by the head-averaged class attention (it computes the paper's
  cross-head rank consensus but does not use it): ``scoring="rank"`` ranks by the mean rank over heads.
* eviction: entropy + mean similarity (the code's ``--div`` default, which any command-line value
  leaves on) or entropy + w x dissimilarity (``eviction="dissimilarity"``, w = int(range of entropies /
  range of dissimilarities)); where all dissimilarities are equal the code divides by zero, here
  w = 0 (the choice cannot change which entry goes). Similarity is measured on the layer-averaged
  stored class tokens (``--token_sim``), or on the final embeddings with ``eviction_features="embedding"``.
* the k-center start is drawn from a generator seeded with ``seed`` and owned by the method, one
  draw per condensation block and image (the code draws from the global torch RNG seeded with 1,
  which its shuffling DataLoader also draws from before the first image: to compare draw by draw,
  seed the global RNG with ``seed`` right before the code's first image).
* ``drop_rate=0`` crashes the code once anchors exist (``max_token_cls`` unassigned); here it runs
  with no condensation and the anchors still join the attention of the condensation blocks.
* reproduced as in the code: anchors only once *every* class has two entries; the anchor for block l
  is matched on layer l - 1 (block 0 wraps to the last layer); the fused token is not renormalised; a
  merge cluster left empty (duplicate tokens, or a band smaller than K) gives a zero token; the current
  image is written to the reservoir before its correction logits are computed.
* the anchor only adds a key and a value (the code also runs it as a query and drops the output): the
  same numbers, fewer MACs; the code computes in fp16 on CUDA, this runs at the backbone's precision;
  entropies come from the backbone's ``logit_scale`` (the code hard-codes 100, OpenAI CLIP's value).

``run_info()`` reports the mean GMACs per image actually run (:mod:`vlm_tta.models.steppable`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import MethodOptionError, UnsupportedBackboneError
from ..models.steppable import SteppableViT
from ..views import ViewSet
from .base import Method, Prediction, register_method
from .common import entropy, resolve_preset

#: Per-dataset (M = reservoir_size, tau = layer-weight temperature, lambda, beta): the code's
#: ``configs/<dataset>.yaml`` (``reservoir_size``, ``scale``, ``lambd``, ``beta``).
PRESETS: dict[str, dict] = {
    name: dict(reservoir_size=m, tau=tau, lambd=lam, beta=beta)
    for name, (m, tau, lam, beta) in {
        "imagenet": (3, 0.1, 3.0, 5.0),
        "imagenet_a": (3, 0.01, 3.0, 5.0),
        "imagenet_v2": (3, 0.1, 4.0, 9.0),
        "imagenet_r": (3, 0.1, 3.0, 8.0),
        "imagenet_sketch": (3, 0.1, 4.0, 8.0),
        "caltech101": (3, 1.0, 7.0, 6.0),
        "dtd": (3, 1.0, 2.0, 6.0),
        "eurosat": (2, 5.0, 8.0, 7.0),
        "fgvc_aircraft": (3, 0.02, 2.0, 2.0),
        "food101": (3, 0.01, 2.0, 5.0),
        "flowers102": (3, 0.01, 7.0, 7.0),
        "oxford_pets": (3, 5.5, 2.0, 6.0),
        "stanford_cars": (3, 0.1, 1.5, 8.0),
        "sun397": (3, 0.01, 4.0, 3.0),
        "ucf101": (3, 0.01, 6.0, 8.0),
    }.items()
}
DEFAULT_PRESET = "imagenet"
#: The paper's keep ratio R -> the code's drop rate r (matched by the paper's GFLOPs, see README).
KEEP_RATIO_TO_DROP_RATE = {1.0: 0.0, 0.9: 0.035, 0.7: 0.1}
DEFAULT_DROP_RATE = 0.035  # README, `--token_pruning Ours-0.035` (paper R = 0.9)
SCORINGS = ("mean", "rank")
EVICTIONS = ("similarity", "dissimilarity")
EVICTION_FEATURES = ("cls_tokens", "embedding")


@dataclass
class TCAConfig:
    #: dataset whose (reservoir_size, tau, lambd, beta) to use (``configs/<dataset>.yaml``); None: imagenet
    preset: str | None = None
    reservoir_size: int | None = None  # M, entries per class (`reservoir_size`); None: from the preset
    tau: float | None = None  # layer-weight temperature (`scale`); None: from the preset
    lambd: float | None = None  # weight of the correction logits (`lambd`); None: from the preset
    beta: float | None = None  # sharpness of the correction (`beta`); None: from the preset
    #: the code's drop rate r (`--token_pruning Ours-<r>`); None: 0.035 (README), or from keep_ratio
    drop_rate: float | None = None
    #: the paper's keep ratio R (0.9 -> r = 0.035, 0.7 -> r = 0.1, 1.0 -> no condensation)
    keep_ratio: float | None = None
    condense_blocks: tuple[int, ...] = (3, 6, 9)  # code, `self.drop_loc = [3,6,9]` (0-indexed)
    merge_centers: int = 4  # K: code, `coreset_averaging(num_centers=4)`; the paper reports K = 2
    scoring: str = "mean"  # "mean" head-averaged attention (code) | "rank" cross-head rank consensus (paper)
    eviction: str = "similarity"  # code `--div` (default): entropy + mean similarity | "dissimilarity"
    eviction_features: str = "cls_tokens"  # code `--token_sim`: layer-averaged class tokens | "embedding"
    anchors: bool = True  # code `--flag`: domain anchors join the condensation blocks' attention
    seed: int = 1  # code, `seed = 1`; seeds the k-center greedy start

    def __post_init__(self) -> None:
        if self.preset is not None:
            resolve_preset(PRESETS, self.preset, DEFAULT_PRESET, "TCA")
        if self.reservoir_size is not None and (isinstance(self.reservoir_size, bool) or self.reservoir_size < 1):
            raise MethodOptionError(f"reservoir_size must be an integer >= 1; got {self.reservoir_size!r}")
        if self.tau is not None and not self.tau > 0:
            raise MethodOptionError(f"tau must be > 0; got {self.tau}")
        for name in ("lambd", "beta"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise MethodOptionError(f"{name} must be a finite number >= 0; got {value}")
        if self.drop_rate is not None and not 0 <= self.drop_rate < 1:
            raise MethodOptionError(f"drop_rate must be in [0, 1); got {self.drop_rate}")
        if self.keep_ratio is not None:
            known = ", ".join(f"{r} (drop_rate {d})" for r, d in KEEP_RATIO_TO_DROP_RATE.items())
            if float(self.keep_ratio) not in KEEP_RATIO_TO_DROP_RATE:
                raise MethodOptionError(
                    f"keep_ratio must be one of the paper's ratios {known}; got {self.keep_ratio}. "
                    "For other budgets set drop_rate (the code's r) instead"
                )
            if self.drop_rate is not None and self.drop_rate != KEEP_RATIO_TO_DROP_RATE[float(self.keep_ratio)]:
                raise MethodOptionError(
                    f"keep_ratio={self.keep_ratio} means drop_rate={KEEP_RATIO_TO_DROP_RATE[float(self.keep_ratio)]}; "
                    f"got drop_rate={self.drop_rate} as well: set one of them"
                )
        blocks = (self.condense_blocks,) if isinstance(self.condense_blocks, int) else self.condense_blocks
        self.condense_blocks = tuple(int(b) for b in blocks)
        if any(b < 0 for b in self.condense_blocks) or len(set(self.condense_blocks)) != len(self.condense_blocks):
            raise MethodOptionError(
                f"condense_blocks must be distinct block indices >= 0 (0-indexed); got {self.condense_blocks}"
            )
        if isinstance(self.merge_centers, bool) or self.merge_centers < 1:
            raise MethodOptionError(f"merge_centers must be an integer >= 1; got {self.merge_centers!r}")
        for name, allowed in (
            ("scoring", SCORINGS),
            ("eviction", EVICTIONS),
            ("eviction_features", EVICTION_FEATURES),
        ):
            if getattr(self, name) not in allowed:
                raise MethodOptionError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    @property
    def resolved_drop_rate(self) -> float:
        if self.drop_rate is not None:
            return float(self.drop_rate)
        if self.keep_ratio is not None:
            return KEEP_RATIO_TO_DROP_RATE[float(self.keep_ratio)]
        return DEFAULT_DROP_RATE

    def reservoir_settings(self) -> dict:
        """(reservoir_size, tau, lambd, beta): the options given, the preset's for the others."""
        preset = resolve_preset(PRESETS, self.preset, DEFAULT_PRESET, "TCA")
        return {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in preset.items()}


# --------------------------------------------------------------------------- token condensation
def condensed_sizes(num_tokens: int, drop_rate: float) -> tuple[int, int]:
    """(kept patches, merged band) at a block with ``num_tokens`` tokens (class token included):
    k = ceil((1 - r)(N - 1)) patches survive, m = N - k; the top k - 2m are kept, the next 2m are
    merged, the remaining N - 1 - k are fused. ``(N - 1, 0)`` when r = 0 (nothing condensed)."""
    if drop_rate == 0:
        return num_tokens - 1, 0
    k = math.ceil((1 - drop_rate) * (num_tokens - 1))
    m = num_tokens - k
    if k - 2 * m < 0:
        raise MethodOptionError(
            f"drop_rate={drop_rate} is too large for a block with {num_tokens} tokens: it would keep k - 2m = "
            f"{k - 2 * m} patches (k = {k}, m = {m}); use a smaller drop_rate or fewer condense_blocks"
        )
    return k - 2 * m, 2 * m


def planned_tokens(num_tokens: int, num_blocks: int, blocks, drop_rate: float, centers: int) -> list[int]:
    """The sequence length after every block (before any is run): each condensation block leaves
    1 + kept + K + 1 tokens (class token, kept patches, merge centres, fused token)."""
    out, n = [], num_tokens
    for i in range(num_blocks):
        if i in blocks and drop_rate > 0:
            keep, _ = condensed_sizes(n, drop_rate)
            n = 1 + keep + centers + 1
        out.append(n)
    return out


def kcenter_greedy(tokens: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """Indices of k centres among ``tokens`` (n x D): a random first one, then each time the token
    farthest from the centres so far (ties: the first). Indices repeat once every token is a centre."""
    first = int(torch.randint(len(tokens), (1,), generator=generator))
    centers = [first]
    nearest = (tokens - tokens[first]).norm(dim=1)
    for _ in range(k - 1):
        nxt = int(nearest.argmax())
        centers.append(nxt)
        nearest = torch.minimum(nearest, (tokens - tokens[nxt]).norm(dim=1))
    return centers


def merge_coreset(tokens: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``tokens`` (n x D) merged into k tokens: k-center greedy centres, every token assigned to its
    nearest centre, each cluster averaged with weights 1 / distance to its centre (the centre itself,
    at distance 0, weighs 1), normalised per cluster. A cluster with no token gives a zero token."""
    centers = tokens[kcenter_greedy(tokens, k, generator)]
    assign = torch.cdist(tokens.float(), centers.float()).argmin(dim=1)
    dist = (tokens - centers[assign]).norm(dim=1)
    weight = torch.where(dist == 0, torch.ones_like(dist), dist.reciprocal())
    member = F.one_hot(assign, k).to(weight.dtype) * weight[:, None]  # n x k: each token's weight in its cluster
    total = member.sum(dim=0)
    return (member.T @ tokens) / torch.where(total > 0, total, torch.ones_like(total))[:, None]


def rank_consensus(attention: torch.Tensor) -> torch.Tensor:
    """Mean over heads of each patch's rank in its head's attention (H x P -> P; 0 = least
    attended), divided by P: the paper's cross-head consensus score."""
    heads, p = attention.shape
    ranks = torch.empty_like(attention, dtype=torch.float32)
    order = attention.sort(dim=1).indices
    ranks.scatter_(1, order, torch.arange(p, dtype=torch.float32, device=attention.device).expand(heads, p))
    return ranks.mean(dim=0) / p


def condense(
    tokens: torch.Tensor,
    cls_attention: torch.Tensor,
    drop_rate: float,
    centers: int,
    generator: torch.Generator,
    scoring: str = "mean",
) -> torch.Tensor:
    """One image's tokens (N x D, class token first) condensed by its class attention (H x N):
    ``[class token, top k - 2m patches (by decreasing score), K merged centres, one fused token]``.

    The fused token is sum_i a_i x_i over the N - 1 - k least attended patches with a_i their
    head-averaged attention, not renormalised (the attention to them is what they were worth).
    """
    n = tokens.shape[0]
    keep, band = condensed_sizes(n, drop_rate)
    patches, attention = tokens[1:], cls_attention[:, 1:]
    weight = attention.mean(dim=0)
    score = weight if scoring == "mean" else rank_consensus(attention)
    order = torch.topk(score, keep + band).indices
    merged = merge_coreset(patches[order[keep:]], centers, generator)
    rest = torch.ones(n - 1, dtype=torch.bool, device=tokens.device)
    rest[order] = False
    fused = (weight[rest, None].to(patches.dtype) * patches[rest]).sum(dim=0, keepdim=True)
    return torch.cat([tokens[:1], patches[order[:keep]], merged.to(tokens.dtype), fused])


# --------------------------------------------------------------------------- the reservoir
def eviction_scores(entropies: torch.Tensor, features: torch.Tensor, rule: str = "similarity") -> torch.Tensor:
    """Per-entry eviction scores (the highest goes) for one class's entries (n >= 2).

    s_j = mean cosine similarity of entry j's features to the other entries'. ``"similarity"``:
    h_j + s_j (drops the most uncertain or most redundant entry); ``"dissimilarity"``:
    h_j + w (1 - s_j) with w = int((max h - min h) / (max(1 - s) - min(1 - s))), 0 when the
    dissimilarities are all equal (drops uncertain outliers)."""
    n = features.shape[0]
    unit = F.normalize(features.float(), dim=1)
    sim = unit @ unit.T
    mean_sim = ((sim.sum(dim=1) - sim.diagonal()) / (n - 1)).double()
    h = entropies.double()
    if rule == "similarity":
        return h + mean_sim
    dissim = 1 - mean_sim
    spread = float(dissim.max() - dissim.min())
    weight = int(float(h.max() - h.min()) / spread) if spread > 0 else 0
    return h + weight * dissim


def layer_weights(num_layers: int, tau: float) -> torch.Tensor:
    """softmax(linspace(0, 1, L) / tau) in float64: small tau leans on the last layers."""
    return (torch.linspace(0, 1, num_layers, dtype=torch.float64) / tau).softmax(dim=0)


class TokenReservoir:
    """Per-class memory of up to ``capacity`` entries (final embedding, entropy, class token after
    every block), each class's entries kept sorted by increasing entropy."""

    def __init__(self, num_classes: int, capacity: int, num_layers: int, width: int, embed_dim: int, device=None):
        self.capacity = capacity
        self.counts = torch.zeros(num_classes, dtype=torch.long)
        self.tokens = torch.zeros(num_classes, capacity, num_layers, width, device=device)
        self.token_norms = torch.zeros(num_classes, capacity, num_layers, device=device)
        self.embeddings = torch.zeros(num_classes, capacity, embed_dim, device=device)
        self.entropies = torch.zeros(num_classes, capacity, dtype=torch.float64)
        self.class_means = torch.zeros(num_classes, num_layers, width, device=device)

    def add(
        self,
        label: int,
        embedding: torch.Tensor,
        entropy_: float,
        tokens: torch.Tensor,
        eviction: str = "similarity",
        features: str = "cls_tokens",
    ) -> int | None:
        """Append an entry to class ``label``; past capacity, evict the entry with the highest
        :func:`eviction_scores` (possibly the new one). Returns the evicted position among the
        class's entries plus the new one (new = last), or None."""
        n = int(self.counts[label])
        toks = torch.cat([self.tokens[label, :n], tokens[None].to(self.tokens)])
        embs = torch.cat([self.embeddings[label, :n], embedding[None].to(self.embeddings)])
        ents = torch.cat([self.entropies[label, :n], torch.tensor([float(entropy_)], dtype=torch.float64)])
        evicted = None
        if n + 1 > self.capacity:
            feats = toks.mean(dim=1) if features == "cls_tokens" else embs
            evicted = int(eviction_scores(ents, feats, eviction).argmax())
            keep = [j for j in range(n + 1) if j != evicted]
            toks, embs, ents = toks[keep], embs[keep], ents[keep]
        order = torch.sort(ents, stable=True).indices
        toks, embs, ents = toks[order], embs[order], ents[order]
        k = len(ents)
        self.tokens[label, :k] = toks
        self.token_norms[label, :k] = toks.norm(dim=-1)
        self.embeddings[label, :k] = embs
        self.entropies[label, :k] = ents
        self.counts[label] = k
        self.class_means[label] = toks.mean(dim=0)
        return evicted

    def anchors(self) -> torch.Tensor | None:
        """Per-class mean class tokens (C x L x D), once every class holds at least 2 entries."""
        return self.class_means if bool((self.counts >= 2).all()) else None

    def logits(self, tokens: torch.Tensor, weights: torch.Tensor, lambd: float, beta: float) -> torch.Tensor:
        """lambda * sum over class c's entries j of exp(-beta (1 - a_j)), a_j = sum_l w_l cos(tokens_l,
        A_j,l): the correction added to the CLIP logits (C,)."""
        tokens = tokens.to(self.tokens)
        dots = torch.einsum("cmld,ld->cml", self.tokens, tokens)
        cos = dots / (self.token_norms * tokens.norm(dim=-1)).clamp_min(1e-8)
        affinity = (cos.double().cpu() * weights).sum(dim=-1)  # C x M
        valid = torch.arange(self.capacity)[None, :] < self.counts[:, None]
        return lambd * ((-beta * (1 - affinity)).exp() * valid).sum(dim=1).float()


# --------------------------------------------------------------------------- the method
@register_method("tca", "token-condensation")
class TCA(Method):
    """Token condensation inside the image transformer + domain-aware token reservoir (online)."""

    config_class = TCAConfig
    episodic = False
    needs_pixels = True

    def view_set(self) -> ViewSet:
        return ViewSet("original", 1)

    def setup(self, ctx) -> None:
        cfg = self.config
        try:
            self.stepper = SteppableViT(ctx.model)
        except UnsupportedBackboneError as err:
            raise UnsupportedBackboneError(f"TCA ranks a ViT's tokens by its class token's attention: {err}") from err
        blocks = self.stepper.num_blocks
        late = [b for b in cfg.condense_blocks if b >= blocks]
        if late:
            raise MethodOptionError(
                f"condense_blocks {late} do not exist: this image tower has blocks 0..{blocks - 1}; "
                f"pass e.g. condense_blocks=({', '.join(str(b) for b in cfg.condense_blocks if b < blocks)})"
            )
        self.drop_rate = cfg.resolved_drop_rate
        self.settings = cfg.reservoir_settings()
        self.planned = planned_tokens(
            self.stepper.shape.num_tokens, blocks, cfg.condense_blocks, self.drop_rate, cfg.merge_centers
        )  # raises a clear error when drop_rate leaves no patches to keep
        self.weights = layer_weights(blocks, self.settings["tau"])
        super().setup(ctx)

    def reset(self) -> None:
        shape = self.stepper.shape
        self.reservoir = TokenReservoir(
            len(self.ctx.class_features),
            self.settings["reservoir_size"],
            shape.layers,
            shape.width,
            self.ctx.class_features.shape[1],
            device=self.ctx.model.device,
        )
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.images = 0
        self.total_macs = 0
        self.anchors_from: int | None = None
        self.last_tokens: list[int] = []

    # -- the two interventions in the image tower
    def _anchor(self, block: int, tokens: torch.Tensor) -> torch.Tensor | None:
        """The stored class-mean class token (of layer block - 1) closest to the current class token."""
        anchors = self.reservoir.anchors()
        if anchors is None:
            return None
        layer = anchors[:, block - 1].to(tokens)  # C x D; block 0 reads the last layer, as the code's index i - 1
        best = F.cosine_similarity(layer[:, None], tokens[None, :, 0], dim=-1).argmax(dim=0)  # B
        return layer[best][:, None]  # B x 1 x D

    def _condense(self, state) -> torch.Tensor:
        if self.drop_rate == 0:
            return state.tokens
        cfg = self.config
        return torch.stack(
            [
                condense(t, a, self.drop_rate, cfg.merge_centers, self.generator, cfg.scoring)
                for t, a in zip(state.tokens, state.cls_attention)
            ]
        )

    # -- one image
    def predict_sample(self, sample) -> Prediction:
        cfg = self.config
        pixels = sample.views(self.view_set())
        hooked = cfg.condense_blocks if (self.drop_rate > 0 or cfg.anchors) else ()
        out = self.stepper.forward(
            pixels,
            blocks=hooked,
            extra_tokens=self._anchor if cfg.anchors else None,
            after_attention=self._condense,
        )
        if self.anchors_from is None and any(out.extra_tokens):
            self.anchors_from = self.images
        self.images += 1
        self.total_macs += out.macs
        self.last_tokens = out.tokens_after

        embedding = F.normalize(out.embedding[0].cpu(), dim=-1)
        logits = self.ctx.logits(embedding)
        label = int(logits.argmax())
        self.reservoir.add(
            label, embedding, float(entropy(logits)), out.cls_tokens[0], cfg.eviction, cfg.eviction_features
        )
        s = self.settings
        final = logits + self.reservoir.logits(out.cls_tokens[0], self.weights, s["lambd"], s["beta"])
        return Prediction(final, score=float(final.softmax(-1).max()))

    def run_info(self) -> dict:
        return {
            "gmacs_per_image": self.total_macs / self.images / 1e9 if self.images else None,
            "tokens_after_blocks": list(self.last_tokens),
            "anchors_from_image": self.anchors_from,
        }
