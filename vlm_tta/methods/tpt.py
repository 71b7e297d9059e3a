"""TPT: Test-time Prompt Tuning (Shu, Nie, Huang, Yu, Goldstein, Anandkumar, Xiao, "Test-Time Prompt
Tuning for Zero-Shot Generalization in Vision-Language Models", NeurIPS 2022; code: azshue/TPT).

Episodic, one image at a time, on every backbone (:mod:`vlm_tta.models.prompting`). Per image: the
original and 63 random views (``crop_flip`` for the ImageNet family, ``augmix`` for the fine-grained sets:
``preset="<dataset>"`` or ``view_recipe``); logits of all 64 views with the model's own scale (and SigLIP's
bias) against the class prompts ``[SOS] ctx_1..ctx_4 <name> . [EOS]`` with the context initialised from
``"a photo of a"``; the ``int(0.1 V) = 6`` lowest-entropy views are kept (the original competes; with
``tta_steps > 1`` the step-1 choice is kept); loss = entropy of their averaged probability computed in
log space (:func:`~vlm_tta.methods.common.marginal_entropy`); one AdamW step (lr 5e-3, torch's defaults:
betas (0.9, 0.999), eps 1e-8, weight decay 0.01); the prediction is the original view's logits with the
tuned context. Context and optimizer state start afresh for every image. On CUDA with fp16 autocast the
loss goes through a ``GradScaler(init_scale=1000)`` as in the reference (a fresh one per image; the
reference keeps one across images, whose scale only matters on fp16 overflow; with several images per
forward an overflow in one skips the step of all of them). Logits and the loss are computed in fp32 from
the encoders' (autocast) outputs.

The reference's computation is kept as ``reference_compute=True`` (every forward re-encodes all views,
full-length text sequences, one image at a time). By default the same numbers come faster (each with a
test that no prediction changes):

* the views' image embeddings are computed once per image, through the shared cache
  (:class:`~vlm_tta.features.FeatureStore`): the prompt does not change them, and a second run encodes
  no image at all;
* CLIP's class prompts are grouped by length and each group stops after its longest EOS position (causal
  mask, absolute positions; not SigLIP);
* open_clip CLIP: the prefix ``[SOS] ctx_1..ctx_n``, the same in every class prompt and, under the causal
  mask, blind to what follows, is run once per image; each class runs only its own tokens, attending to the
  prefix's keys and values (about half the text tokens for ImageNet's names);
* ``image_batch`` images are adapted at once as independent problems (one context and one Adam state per
  image in one batched forward; Adam(W) is element-wise and the loss is the sum of the images' losses);
* ``class_chunk`` encodes the classes in chunks with gradient accumulation (exact: the loss's gradient
  with respect to the text features is taken once, then pushed back through each chunk), so 1000 classes
  fit in little memory for one more text forward per step.

The tuning itself is :class:`PromptTuner` (view embeddings in, tuned logits of view 0 out, with a
pluggable view selection), which DiffTPT reuses.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..errors import MethodOptionError
from ..models.prompting import DEFAULT_PHRASE, PromptLearner
from ..views import ViewSet
from .base import Method, MethodContext, Prediction, register_method
from .common import (
    check_int,
    check_number,
    confident_views,
    gather_views,
    marginal_entropy,
    n_confident,
    resolve_preset,
)

if TYPE_CHECKING:
    from ..features import Sample

# Views per dataset: azshue/TPT tpt_classification.py uses AugMix iff the dataset id is longer than one
# character, i.e. plain crops and flips for ImageNet and its variants (I/A/V/R/K) and AugMix for the
# 10 fine-grained sets. No other hyper-parameter differs between datasets.
_CROP_FLIP = {"views": "crop_flip"}
_AUGMIX = {"views": "augmix"}
PRESETS: dict[str, dict] = {
    **{name: _CROP_FLIP for name in ("imagenet", "imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch")},
    **{
        name: _AUGMIX
        for name in (
            "flowers102",
            "dtd",
            "oxford_pets",
            "stanford_cars",
            "ucf101",
            "caltech101",
            "food101",
            "sun397",
            "fgvc_aircraft",
            "eurosat",
        )
    },
}
DEFAULT_PRESET = "imagenet"
GRAD_SCALER_INIT = 1000.0  # tpt_classification.py: torch.cuda.amp.GradScaler(init_scale=1000)

#: A view selection: ``B x V x C`` logits -> ``B x k`` view indices (the loss's views).
Selector = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- the reusable tuning core
@dataclass
class TuneResult:
    """What :meth:`PromptTuner.tune` returns for ``B`` images."""

    logits: torch.Tensor  # B x C: the original view's logits with the tuned context
    selected: torch.Tensor  # B x k: the views of the loss (chosen at step 1, kept after)
    ctx: torch.Tensor  # B x n x W: the tuned contexts
    losses: torch.Tensor  # steps x B: each step's loss, before its update


class PromptTuner:
    """TPT's test-time prompt tuning of a :class:`~vlm_tta.models.prompting.PromptLearner`, on view
    embeddings (Shu et al., NeurIPS 2022, section 3; DiffTPT, Feng et al., ICCV 2023, tunes the same way).

    :meth:`tune` takes the L2-normalised embeddings of ``B`` images' views (``B x V x D``, view 0 the
    original) or a function returning them (called at every forward: the reference's recomputation), and
    for every image independently: a fresh context (``learner.ctx_init``) and a fresh AdamW; ``steps``
    times: logits of all views, the views of ``select`` (at the first step; kept after), the marginal
    entropy of those views, one AdamW step; then the original view's logits with the tuned context.

    ``select`` defaults to TPT's confidence selection (``int(selection_p * V)`` lowest-entropy views);
    DiffTPT passes its cosine + entropy selection. ``class_chunk`` encodes the classes that many at a time
    with exact gradient accumulation. ``weight_decay``, ``betas`` and ``eps`` are AdamW's (torch defaults).
    """

    def __init__(
        self,
        learner: PromptLearner,
        logit_scale: float,
        logit_bias: float | None = None,
        *,
        steps: int = 1,
        lr: float = 5e-3,
        selection_p: float = 0.1,
        select: Selector | None = None,
        class_chunk: int | None = None,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        autocast: Callable[[], Any] | None = None,
    ) -> None:
        check_int("steps", steps, 1)
        check_number("lr", lr)
        if class_chunk is not None:
            check_int("class_chunk", class_chunk, 1)
        self.learner = learner
        self.logit_scale = float(logit_scale)
        self.logit_bias = None if logit_bias is None else float(logit_bias)
        self.steps = steps
        self.lr = lr
        self.selection_p = selection_p
        self.select = select if select is not None else (lambda logits: confident_views(logits, selection_p))
        self.class_chunk = class_chunk
        self.adam = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self.autocast = autocast if autocast is not None else (lambda: nullcontext())

    # -- pieces
    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """``B x V x C`` logits of image features (B x V x D) against per-image class features (B x C x D)."""
        out = self.logit_scale * torch.einsum("bvd,bcd->bvc", image_features, text_features)
        return out + self.logit_bias if self.logit_bias is not None else out

    def _chunks(self) -> list[torch.Tensor | None]:
        return self.learner.class_chunks(self.class_chunk)

    @torch.no_grad()
    def text_features(self, ctx: torch.Tensor) -> torch.Tensor:
        """``B x C x D`` class features for contexts ``B x n x W``, without gradients (in chunks)."""
        chunks = self._chunks()
        with self.autocast():
            if chunks[0] is None:
                return self.learner.text_features(ctx).float()
            out = torch.empty(ctx.shape[0], self.learner.num_classes, 0)
            for s in chunks:
                part = self.learner.text_features(ctx, s).float()
                if out.shape[-1] == 0:
                    out = part.new_empty(ctx.shape[0], self.learner.num_classes, part.shape[-1])
                out[:, s.to(out.device)] = part
            return out

    def _scaler(self, ctx: torch.Tensor):
        if ctx.device.type != "cuda":
            return None
        with self.autocast():
            probe = torch.zeros(1, 1, device=ctx.device) @ torch.zeros(1, 1, device=ctx.device)
        if probe.dtype != torch.float16:
            return None
        return torch.amp.GradScaler("cuda", init_scale=GRAD_SCALER_INIT)

    # -- the tuning
    def tune(
        self, features: torch.Tensor | Callable[[bool], torch.Tensor], ctx_init: torch.Tensor | None = None
    ) -> TuneResult:
        """Tune one context per image and return the original view's tuned logits (see the class doc).

        ``features``: ``B x V x D`` L2-normalised view embeddings, or a function ``f(original_only)``
        returning them (all views, or view 0 only as ``B x 1 x D``), called at every forward.
        ``ctx_init``: the starting context (``n x W``), default the learner's.
        """
        get = features if callable(features) else (lambda original_only: features[:, :1] if original_only else features)
        first = get(False)
        b = first.shape[0]
        device = self.learner.ctx_init.device
        start = self.learner.ctx_init if ctx_init is None else ctx_init.to(device, torch.float32)
        ctx = torch.nn.Parameter(start.detach().unsqueeze(0).repeat(b, 1, 1).clone())
        optimizer = torch.optim.AdamW([ctx], **self.adam)
        scaler = self._scaler(ctx)
        selected = None
        losses = []
        for step in range(self.steps):
            img = (first if step == 0 else get(False)).to(device, torch.float32)
            optimizer.zero_grad(set_to_none=True)
            chunks = self._chunks()
            if chunks[0] is None:
                with self.autocast():
                    text = self.learner.text_features(ctx)
                logits = self.logits(img, text.float())
                if selected is None:
                    selected = self.select(logits.detach())
                loss = marginal_entropy(gather_views(logits, selected)).sum()
                (scaler.scale(loss) if scaler is not None else loss).backward()
            else:  # exact gradient accumulation: dL/dtext once, then back through each chunk
                text = self.text_features(ctx.detach()).float().requires_grad_(True)
                logits = self.logits(img, text)
                if selected is None:
                    selected = self.select(logits.detach())
                loss = marginal_entropy(gather_views(logits, selected)).sum()
                (grad_text,) = torch.autograd.grad(scaler.scale(loss) if scaler is not None else loss, text)
                for s in chunks:
                    with self.autocast():
                        part = self.learner.text_features(ctx, s)
                    (part.float() * grad_text[:, s.to(grad_text.device)]).sum().backward()
            losses.append(_per_image(logits, selected))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        original = get(True)[:, :1].to(device, torch.float32)
        tuned = self.logits(original, self.text_features(ctx.detach()).float())[:, 0]
        return TuneResult(tuned.detach(), selected, ctx.detach(), torch.stack(losses))


def _per_image(logits: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return marginal_entropy(gather_views(logits.detach(), selected))


@dataclass
class PromptTuningConfig:
    """The options TPT and DiffTPT share: views, the tuning, the context, how it is computed."""

    #: dataset whose view recipe to use (``crop_flip`` for the ImageNet family, ``augmix`` for the
    #: fine-grained sets; a vlm_tta.data name or alias); None = ImageNet's
    preset: str | None = None
    view_recipe: str | None = None  # None: the preset's
    view_seed: int = 0  # seed of the random views
    tta_steps: int = 1  # TPT: --tta_steps 1
    lr: float = 5e-3  # --lr 5e-3 (AdamW, torch defaults otherwise)
    weight_decay: float = 0.01  # torch's AdamW default, as the reference uses it
    ctx_init: str | None = DEFAULT_PHRASE  # --ctx_init a_photo_of_a; None: a random context of n_ctx vectors
    n_ctx: int | None = None  # context length; set by ctx_init's tokens (or the CoOp file) when not given
    coop_ctx: str | None = None  # a CoOp context file (TPT + CoOp), see vlm_tta.models.prompting
    ctx_seed: int = 0  # seed of a random context (ctx_init=None)
    #: the reference's computation: every forward re-encodes every view, full-length text, one image at a time
    reference_compute: bool = False
    #: images adapted at once (independent problems in one forward); None: as many as keep the text batch
    #: (images x classes) within 1024 prompts
    image_batch: int | None = None
    class_chunk: int | None = None  # classes per text forward (exact gradient accumulation); None: all at once

    def __post_init__(self) -> None:
        check_int("tta_steps", self.tta_steps, 1)
        check_number("lr", self.lr)
        check_number("weight_decay", self.weight_decay)
        if self.n_ctx is not None:
            check_int("n_ctx", self.n_ctx, 1)
        if self.ctx_init is None and self.coop_ctx is None and self.n_ctx is None:
            raise MethodOptionError("ctx_init=None (a random context) needs n_ctx, the number of context vectors")
        if self.ctx_init is not None and not str(self.ctx_init).replace("_", " ").strip():
            raise MethodOptionError("ctx_init must be a phrase such as 'a photo of a' (or None for a random context)")
        for name in ("image_batch", "class_chunk"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.reference_compute and (self.image_batch not in (None, 1) or self.class_chunk is not None):
            raise MethodOptionError(
                "reference_compute=True runs the reference's computation (one image at a time, all classes at "
                "once): leave image_batch and class_chunk unset"
            )

    def recipe(self, what: str) -> str:
        """The view recipe: ``view_recipe``, else the preset's."""
        return self.view_recipe or resolve_preset(PRESETS, self.preset, DEFAULT_PRESET, what)["views"]


# --------------------------------------------------------------------------- the method
@dataclass
class TPTConfig(PromptTuningConfig):
    n_views: int = 64  # tpt_classification.py: -b 64 = the original + 63 views
    selection_p: float = 0.1  # --selection_p 0.1: int(0.1 V) lowest-entropy views

    def __post_init__(self) -> None:
        check_int("n_views", self.n_views, 1)
        if not (isinstance(self.selection_p, (int, float)) and 0 < self.selection_p <= 1):
            raise MethodOptionError(f"selection_p must be in (0, 1]; got {self.selection_p!r}")
        n_confident(self.n_views, self.selection_p)
        super().__post_init__()
        self.views()  # validates the preset and the recipe

    def views(self) -> ViewSet:
        return ViewSet(self.recipe("TPT") if self.n_views > 1 else "original", self.n_views, self.view_seed)


@register_method("tpt")
class TPT(Method):
    """TPT: per-image prompt tuning by marginal-entropy minimisation over confident views."""

    config_class = TPTConfig
    episodic = True
    needs_pixels = True
    suite_view_option = "view_recipe"

    def view_set(self) -> ViewSet:
        return self.config.views()

    def setup(self, ctx: MethodContext) -> None:
        self.setup_learner(ctx)
        self.tuner = self.make_tuner(selection_p=self.config.selection_p)

    def setup_learner(self, ctx: MethodContext) -> None:
        """The prompt learner over the class names (the context from the phrase or the CoOp file)."""
        self.ctx = ctx
        cfg = self.config
        if ctx.model is None:
            raise MethodOptionError("TPT tunes the text encoder's prompt: it needs the model (use classify on images)")
        if not ctx.classnames:
            raise MethodOptionError("TPT builds its own class prompts: it needs the class names")
        model = ctx.model
        self.learner = PromptLearner(
            model,
            ctx.classnames,
            phrase=cfg.ctx_init if cfg.coop_ctx is None else None,
            ctx_vectors=cfg.coop_ctx,
            n_ctx=cfg.n_ctx,
            truncate=not cfg.reference_compute,
            share_prefix=not cfg.reference_compute,
            seed=cfg.ctx_seed,
        )
        self.images_tuned = 0

    def make_tuner(self, **selection: Any) -> PromptTuner:
        """The tuner over this method's prompt learner with the configured steps and AdamW settings;
        ``selection``: ``selection_p=`` (TPT's rule) or ``select=`` (another rule, e.g. DiffTPT's)."""
        cfg, model = self.config, self.ctx.model
        return PromptTuner(
            self.learner,
            model.logit_scale,
            model.logit_bias,
            steps=cfg.tta_steps,
            lr=cfg.lr,
            class_chunk=cfg.class_chunk,
            weight_decay=cfg.weight_decay,
            autocast=model.autocast,
            **selection,
        )

    def image_batch(self) -> int:
        if self.config.reference_compute:
            return 1
        if self.config.image_batch is not None:
            return self.config.image_batch
        return max(1, 1024 // self.learner.num_classes)

    def predict_sample(self, sample: "Sample") -> Prediction:
        return self.predict_samples([sample])[0]

    def predict_samples(self, samples: "Sequence[Sample]") -> list[Prediction]:
        out: list[Prediction] = []
        if self.config.reference_compute:
            for sample in samples:
                out.extend(self._predict(self.tuner.tune(self._reference_features(sample))))
            return out
        from ..features import batch_view_features

        step = self.image_batch()
        for start in range(0, len(samples), step):
            feats = batch_view_features(samples[start : start + step], self.view_set())
            out.extend(self._predict(self.tuner.tune(feats)))
        return out

    def _reference_features(self, sample: "Sample") -> Callable[[bool], torch.Tensor]:
        """The reference's image path: every call runs the image encoder on the views' pixels."""
        model = self.ctx.model
        pixels = sample.views(self.view_set())

        def encode(original_only: bool) -> torch.Tensor:
            return model.encode_images(pixels[:1] if original_only else pixels, normalize=True).unsqueeze(0)

        return encode

    def _predict(self, result: TuneResult) -> list[Prediction]:
        self.images_tuned += len(result.logits)
        logits = result.logits.float().cpu()
        top = logits.softmax(-1).max(-1).values.tolist()
        return [Prediction(logits[i], top[i]) for i in range(len(logits))]

    def run_info(self) -> dict:
        return {"tpt": {"images": getattr(self, "images_tuned", 0), "reference_compute": self.config.reference_compute}}


__all__ = ["PRESETS", "PromptTuner", "PromptTuningConfig", "Selector", "TPT", "TPTConfig", "TuneResult"]
