"""DiffTPT (vlm_tta.methods.difftpt.DiffTPT): the pool, the fixed two-stage selection, the tuning
against a hand-written loop, the generation cache, and clear errors. Tiny random models only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import CLASSNAMES, TINY_SD_SIZE, build_tiny_image_variation_pipeline, build_tiny_openclip

import vlm_tta
from vlm_tta.cache import EmbeddingCache
from vlm_tta.diffusion import GenerationsMissingError, ImageVariations
from vlm_tta.errors import MethodOptionError
from vlm_tta.features import encoder_call_counter
from vlm_tta.methods import create_method
from vlm_tta.methods.common import gather_views, marginal_entropy
from vlm_tta.methods.difftpt import DiffTPT, select_views
from vlm_tta.models.prompting import PromptLearner

NAMES = list(CLASSNAMES)
FAST_GEN = dict(n_generated=3, diffusion_steps=2, height=TINY_SD_SIZE, width=TINY_SD_SIZE, jpeg_quality=None,
                store_size=None)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return build_tiny_openclip()


@pytest.fixture(scope="module")
def pipe():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny pipeline's kernels are too small for threads
    yield build_tiny_image_variation_pipeline(seed=0)
    torch.set_num_threads(n)


def _pool(n_images: int, n_views: int = 128, seed: int = 0) -> torch.Tensor:
    """Caller-given preprocessed pools (N x V x 3 x 32 x 32): original, conventional, generated."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_images, n_views, 3, 32, 32, generator=g)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)) for _ in range(n)]


def _by_hand(model, pool: torch.Tensor, steps=4, lr=5e-3, mode="code"):
    """DiffTPT written out for one image: 128 view features, the step-1 selection, `steps` AdamW steps."""
    learner = PromptLearner(model, NAMES, truncate=False)
    feats = torch.nn.functional.normalize(model.encode_images(pool), dim=-1)[None]
    ctx = torch.nn.Parameter(learner.ctx_init.clone()[None])
    opt = torch.optim.AdamW([ctx], lr=lr)
    selected = None
    for _ in range(steps):
        logits = model.logit_scale * feats @ learner.text_features(ctx).transpose(-1, -2)
        if selected is None:
            selected = select_views(logits.detach(), mode=mode, features=feats).selected
        loss = marginal_entropy(gather_views(logits, selected)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = model.logit_scale * feats[:, 0] @ learner.text_features(ctx)[0].T
    return out[0], selected[0]


@pytest.mark.parametrize("mode,k", [("code", 30), ("paper", 34)])
def test_given_pool_matches_the_algorithm_written_out(model, mode, k):
    """128 caller-given views: 101 of 127 pass the cosine filter, the original in front (102), 30 selected
    (code mode); paper mode keeps 64 conventional + 50 generated + the original and selects 34."""
    pool = _pool(1)
    method = create_method("difftpt", filter_mode=mode)
    res = vlm_tta.classify(pool, NAMES, method=method, model=model, cache=False)
    expected, selected = _by_hand(model, pool[0], mode=mode)
    assert method.last_selected.shape == (1, k) and torch.equal(method.last_selected[0], selected)
    torch.testing.assert_close(torch.as_tensor(res.logits[0]), expected, atol=1e-4, rtol=0)
    assert res.info["difftpt"]["filter_mode"] == mode


def test_pool_counts_with_the_defaults(model):
    feats = torch.nn.functional.normalize(torch.randn(2, 128, 8), dim=-1)
    logits = torch.randn(2, 128, 5)
    code = select_views(logits)
    assert code.cosine.shape == (2, 101) and code.kept.shape == (2, 102) and code.selected.shape == (2, 30)
    paper = select_views(logits, mode="paper", features=feats)
    assert paper.cosine.shape == (2, 64 + 50) and paper.selected.shape == (2, 34)
    m = create_method("difftpt")
    assert m.view_set().n_views == 65 and m.config.tta_steps == 4 and m.config.lr == 5e-3


def test_batched_images_and_reference_compute_equal_one_at_a_time(model):
    pool = _pool(3, seed=1)
    one = vlm_tta.classify(pool, NAMES, method=create_method("difftpt", image_batch=1), model=model, cache=False)
    many = vlm_tta.classify(pool, NAMES, method=create_method("difftpt", image_batch=3), model=model, cache=False)
    ref = vlm_tta.classify(pool, NAMES, method=create_method("difftpt", reference_compute=True), model=model,
                           cache=False)  # fmt: skip
    np.testing.assert_allclose(many.logits, one.logits, atol=1e-4, rtol=0)  # 4 Adam steps amplify rounding
    np.testing.assert_allclose(ref.logits, one.logits, atol=1e-4, rtol=0)
    assert (one.logits.argmax(1) == ref.logits.argmax(1)).all()
    # nothing is carried between images: the same image twice gives the same answer
    twice = vlm_tta.classify(torch.cat([pool[:1], pool[:1]]), NAMES, method=create_method("difftpt"), model=model,
                             cache=False)  # fmt: skip
    np.testing.assert_allclose(twice.logits[1], twice.logits[0], atol=1e-6, rtol=0)


def test_generations_are_made_once_and_a_second_run_reads_only_the_cache(model, pipe, tmp_path):
    images = _images(2)
    cache = EmbeddingCache(tmp_path / "cache")
    variations = ImageVariations(pipe, cache=cache, count=3, steps=2, height=TINY_SD_SIZE, width=TINY_SD_SIZE,
                                 jpeg_quality=None, store_size=None)  # fmt: skip
    opts = dict(diffusion=variations, n_conventional=8, cosine_fraction=0.8, entropy_fraction=0.3)
    first = vlm_tta.classify(images, NAMES, method=create_method("difftpt", **opts), model=model, cache_dir=cache)
    assert variations.calls >= 1 and first.info["difftpt"]["generated_images"] == 2
    calls, encodes = variations.calls, encoder_call_counter(model)
    again = vlm_tta.classify(images, NAMES, method=create_method("difftpt", **opts), model=model, cache_dir=cache)
    assert variations.calls == calls and encodes()["images"] == 0  # no generation, no image encoder
    assert again.info["difftpt"]["generated_images"] == 0
    np.testing.assert_array_equal(again.logits, first.logits)


def test_without_weights_it_fails_before_adapting_and_names_what_to_do(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    method = create_method("difftpt", diffusion="nobody/no-such-pipeline", **FAST_GEN)
    with pytest.raises(GenerationsMissingError, match="vlm-tta generate"):
        vlm_tta.classify(_images(1), NAMES, method=method, model=model, cache_dir=tmp_path)
    assert method.images_tuned == 0
    cache_only = create_method("difftpt", generate=False, diffusion=build_tiny_image_variation_pipeline(), **FAST_GEN)
    with pytest.raises(GenerationsMissingError, match="generate=False"):
        vlm_tta.classify(_images(1), NAMES, method=cache_only, model=model, cache_dir=tmp_path)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(filter_mode="both"), "filter mode"),
        (dict(cosine_fraction=0.0), "cosine_fraction"),
        (dict(entropy_fraction=1.5), "entropy_fraction"),
        (dict(n_generated=0), "n_generated"),
        (dict(tta_steps=0), "tta_steps"),
        (dict(view_recipe="nope"), "nope"),
        (dict(preset="nope"), "nope"),
        (dict(reference_compute=True, image_batch=4), "reference_compute"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises((MethodOptionError, vlm_tta.errors.VlmTtaError), match=match):
        create_method("difftpt", **options)


def test_presets_pick_tpt_s_views():
    assert create_method("difftpt").view_set().recipe == "crop_flip"
    assert create_method("difftpt", preset="flowers102").view_set().recipe == "augmix"
    assert isinstance(create_method("difftpt"), DiffTPT)
