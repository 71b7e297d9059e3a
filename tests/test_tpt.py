"""TPT (vlm_tta.methods.tpt): the reference's behaviour on hand-made cases, and every speed-up's exactness."""

import math

import numpy as np
import pytest
import torch
from tiny_models import CLASSNAMES, build_tiny_hf_siglip, build_tiny_openclip

import vlm_tta
from vlm_tta.cache import EmbeddingCache
from vlm_tta.errors import MethodOptionError
from vlm_tta.features import encoder_call_counter
from vlm_tta.methods import create_method
from vlm_tta.methods.common import confident_views, gather_views, marginal_entropy
from vlm_tta.methods.tpt import PromptTuner
from vlm_tta.models.prompting import PromptLearner

NAMES = list(CLASSNAMES)


@pytest.fixture(scope="module")
def model():
    return build_tiny_openclip()


def _views(n_images: int, n_views: int, seed: int = 0) -> torch.Tensor:
    """Caller-given preprocessed views (N x V x 3 x 32 x 32) for the tiny models."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_images, n_views, 3, 32, 32, generator=g)


def _features(model, views: torch.Tensor) -> torch.Tensor:
    return model.encode_images(views.flatten(0, 1)).view(*views.shape[:2], -1)


# ------------------------------------------------------------------------------ the reference's behaviour
def test_selection_keeps_6_of_64_lowest_entropy_views_original_competing(model):
    learner = PromptLearner(model, NAMES)
    feats = _features(model, _views(2, 64))
    feats[1, 0] = feats[1, 5]  # image 1's original equals one of its views: both or neither are selected
    tuner = PromptTuner(learner, model.logit_scale)
    result = tuner.tune(feats)
    assert result.selected.shape == (2, 6)
    text = tuner.text_features(learner.ctx_init.expand(2, -1, -1))
    expected = confident_views(tuner.logits(feats, text), 0.1)
    assert torch.equal(result.selected, expected)
    assert (0 in result.selected[1].tolist()) == (5 in result.selected[1].tolist())
    assert result.logits.shape == (2, len(NAMES)) and result.ctx.shape == (2, 4, 32)


def test_marginal_entropy_loss_on_a_hand_made_example():
    # two views over two classes: p = (1/2, 1/2) and (3/4, 1/4); mean (5/8, 3/8)
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    expected = -(5 / 8 * math.log(5 / 8) + 3 / 8 * math.log(3 / 8))
    assert marginal_entropy(logits).item() == pytest.approx(expected, abs=1e-6)
    # not the mean of the per-view entropies
    per_view = (math.log(2) + -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))) / 2
    assert abs(expected - per_view) > 1e-3


def test_first_adamw_step_is_lr_sign_plus_decoupled_decay(model):
    learner = PromptLearner(model, NAMES)
    feats = _features(model, _views(1, 64))
    tuner = PromptTuner(learner, model.logit_scale, lr=5e-3)
    result = tuner.tune(feats)
    # the gradient of the step-1 loss, by hand
    ctx = learner.ctx_init.clone().requires_grad_(True)
    logits = tuner.logits(feats, learner.text_features(ctx).unsqueeze(0))
    loss = marginal_entropy(gather_views(logits, result.selected)).sum()
    (g,) = torch.autograd.grad(loss, ctx)
    assert result.losses.shape == (1, 1) and result.losses[0, 0].item() == pytest.approx(loss.item(), abs=1e-6)
    expected = learner.ctx_init * (1 - 5e-3 * 0.01) - 5e-3 * g / (g.abs() + 1e-8)
    torch.testing.assert_close(result.ctx[0], expected, atol=1e-6, rtol=0)
    moved = (result.ctx[0] - learner.ctx_init * (1 - 5e-3 * 0.01)).abs()
    big = g.abs() > 1e-5
    torch.testing.assert_close(moved[big], torch.full_like(moved[big], 5e-3), atol=1e-5, rtol=0)
    # the prediction is the original view's logits with the tuned context
    tuned = tuner.logits(feats[:, :1], learner.text_features(result.ctx[0]).unsqueeze(0))[0, 0]
    torch.testing.assert_close(result.logits[0], tuned.detach(), atol=1e-5, rtol=0)


def test_selection_is_fixed_after_step_one(model):
    learner = PromptLearner(model, NAMES)
    calls = []

    def select(logits):
        calls.append(1)
        return confident_views(logits, 0.1)

    result = PromptTuner(learner, model.logit_scale, steps=3, select=select).tune(_features(model, _views(1, 64)))
    assert len(calls) == 1 and result.losses.shape == (3, 1)
    assert result.losses[2, 0] < result.losses[0, 0]  # the loss of the kept views goes down


def test_nothing_is_carried_between_images(model):
    views = _views(1, 16)
    twice = torch.cat([views, views])
    opts = dict(n_views=16, selection_p=0.25, cache=False, model=model)
    res = vlm_tta.classify(twice, NAMES, method="tpt", image_batch=1, **opts)
    np.testing.assert_array_equal(res.logits[0], res.logits[1])
    again = vlm_tta.classify(views, NAMES, method="tpt", **opts)
    np.testing.assert_array_equal(again.logits[0], res.logits[0])
    zs = vlm_tta.classify(views, NAMES, model=model, cache=False)
    assert np.abs(res.logits[0] - zs.logits[0]).max() > 1e-4  # the prompt was tuned


def test_presets_and_option_errors():
    assert create_method("tpt").view_set().recipe == "crop_flip"
    assert create_method("tpt", preset="dtd").view_set().recipe == "augmix"
    assert create_method("tpt", preset="imagenet_a").view_set().recipe == "crop_flip"
    assert create_method("tpt", preset="dtd", view_recipe="crop_flip").view_set().recipe == "crop_flip"
    assert create_method("tpt").view_set().n_views == 64
    bad = [
        dict(selection_p=0.01),  # int(64 x 0.01) = 0 views
        dict(selection_p=0.0),
        dict(tta_steps=0),
        dict(lr=-1.0),
        dict(ctx_init=None),  # a random context needs n_ctx
        dict(ctx_init="  "),
        dict(preset="no_such_dataset"),
        dict(reference_compute=True, class_chunk=10),
        dict(image_batch=0),
        dict(class_chunk=0),
        dict(view_recipe="no_such_recipe"),
        dict(n_ctx=0),
    ]
    for options in bad:
        with pytest.raises((MethodOptionError, ValueError)):
            create_method("tpt", **options)
    with pytest.raises(MethodOptionError, match="n_ctx=3"):
        vlm_tta.classify(
            _views(1, 8),
            NAMES,
            method="tpt",
            model=build_tiny_openclip(),
            n_ctx=3,
            n_views=8,
            selection_p=0.5,
            cache=False,
        )


def test_siglip_uses_its_bias_and_runs(tmp_path):
    from vlm_tta.models import from_hf

    model = from_hf(*build_tiny_hf_siglip(tmp_path))
    views = _views(2, 8)
    opts = dict(n_views=8, selection_p=0.25, cache=False, model=model)
    fast = vlm_tta.classify(views, NAMES, method="tpt", **opts)
    ref = vlm_tta.classify(views, NAMES, method="tpt", reference_compute=True, **opts)
    np.testing.assert_allclose(fast.logits, ref.logits, atol=1e-5)
    learner = PromptLearner(model, NAMES)
    feats = _features(model, views[:1])
    plain = PromptTuner(learner, model.logit_scale).logits(feats, learner.text_features(learner.ctx_init)[None])
    biased = PromptTuner(learner, model.logit_scale, model.logit_bias).logits(
        feats, learner.text_features(learner.ctx_init)[None]
    )
    torch.testing.assert_close(biased - plain, torch.full_like(plain, model.logit_bias))


# ------------------------------------------------------------------------------ exact speed-ups
def test_fast_path_equals_reference_computation(model):
    views = _views(3, 16, seed=1)
    opts = dict(n_views=16, selection_p=0.25, cache=False, model=model, tta_steps=2)
    ref = vlm_tta.classify(views, NAMES, method="tpt", reference_compute=True, **opts)
    fast = vlm_tta.classify(views, NAMES, method="tpt", **opts)
    np.testing.assert_allclose(fast.logits, ref.logits, atol=1e-5)
    assert list(fast.indices) == list(ref.indices)


def test_batched_images_and_chunked_classes_equal_one_at_a_time(model):
    views = _views(4, 16, seed=2)
    opts = dict(n_views=16, selection_p=0.25, cache=False, model=model, tta_steps=2)
    one = vlm_tta.classify(views, NAMES, method="tpt", image_batch=1, **opts)
    batched = vlm_tta.classify(views, NAMES, method="tpt", image_batch=4, **opts)
    chunked = vlm_tta.classify(views, NAMES, method="tpt", image_batch=3, class_chunk=3, **opts)
    np.testing.assert_allclose(batched.logits, one.logits, atol=1e-5)
    np.testing.assert_allclose(chunked.logits, one.logits, atol=1e-5)
    assert list(batched.indices) == list(one.indices) == list(chunked.indices)


def test_second_run_encodes_no_image(tmp_path):
    model = build_tiny_openclip()
    cache = EmbeddingCache(tmp_path / "cache")
    images = [np.random.RandomState(i).randint(0, 255, (40, 48, 3)).astype(np.uint8) for i in range(2)]
    opts = dict(n_views=16, selection_p=0.25, model=model, cache=cache)
    first = vlm_tta.classify(images, NAMES, method="tpt", **opts)
    assert first.info["cache"]["view_misses"] == 32
    count = encoder_call_counter(model)
    second = vlm_tta.classify(images, NAMES, method="tpt", **opts)
    assert count()["images"] == 0
    assert second.info["cache"]["view_misses"] == 0 and second.info["cache"]["view_hits"] == 32
    np.testing.assert_array_equal(second.logits, first.logits)
    ref = vlm_tta.classify(images, NAMES, method="tpt", reference_compute=True, **opts)
    np.testing.assert_allclose(ref.logits, first.logits, atol=1e-5)


def test_hf_clip_fast_path_equals_reference_computation():
    from tiny_models import build_tiny_hf_clip

    from vlm_tta.models import from_hf

    model = from_hf(*build_tiny_hf_clip())
    views = _views(2, 8, seed=3)
    opts = dict(n_views=8, selection_p=0.25, cache=False, model=model)
    ref = vlm_tta.classify(views, NAMES, method="tpt", reference_compute=True, **opts)
    fast = vlm_tta.classify(views, NAMES, method="tpt", class_chunk=5, **opts)
    np.testing.assert_allclose(fast.logits, ref.logits, atol=1e-5)


def test_augmix_preset_runs_on_images(model):
    images = [np.random.RandomState(7).randint(0, 255, (40, 48, 3)).astype(np.uint8)]
    res = vlm_tta.classify(
        images, NAMES, method="tpt", preset="dtd", n_views=16, selection_p=0.25, model=model, cache=False
    )
    assert "augmix" in res.info["view_set"] and res.info["tpt"]["images"] == 1
