"""The one stream loop (vlm_tta.engine): chunking by the method's own batch, finish() on errors,
caller-given view tensors, raw features, per-stream extras, default templates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

import vlm_tta
from vlm_tta.errors import FeatureError, ImageError
from vlm_tta.features import encoder_call_counter
from vlm_tta.methods import Method, Prediction, register_method
from vlm_tta.methods.base import _REGISTRY
from vlm_tta.views import ViewSet

CLASSES = ["cat", "dog", "bird"]


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)) for _ in range(n)]


@dataclass
class _ChunkConfig:
    batch: int = 3
    fail_at: int = -1


class _Recorder(Method):
    """Feature-level online method with its own batch size that records what it was given."""

    config_class = _ChunkConfig
    episodic = False

    def reset(self):
        self.chunks, self.finished = [], 0

    def stream_batch_size(self):
        return self.config.batch

    def predict_batch(self, features):
        self.chunks.append(len(features))
        if len(self.chunks) == self.config.fail_at:
            raise RuntimeError("boom")
        self.last_norms = features.norm(dim=-1)
        return [Prediction(self.ctx.logits(f[0])) for f in features]

    def finish(self):
        self.finished += 1


@pytest.fixture
def recorder():
    cls = register_method("_recorder")(_Recorder)
    yield cls
    _REGISTRY.pop("_recorder")


def test_chunks_follow_the_methods_batch_not_the_callers(tiny_openclip, recorder):
    imgs = _images(7)
    for batch_size in (1, 2, 5, 64):
        m = recorder()
        vlm_tta.classify(imgs, CLASSES, method=m, model=tiny_openclip, cache=False, batch_size=batch_size)
        assert m.chunks == [3, 3, 1] and m.finished == 1
    m = recorder()
    vlm_tta.classify_features(
        np.random.rand(7, 4).astype(np.float32), np.eye(3, 4, dtype=np.float32), method=m, batch_size=2
    )
    assert m.chunks == [3, 3, 1]


def test_skipped_images_do_not_shorten_a_batch(tiny_openclip, recorder, tmp_path):
    paths = []
    for i, img in enumerate(_images(6)):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths.insert(1, str(tmp_path / "bad.png"))
    m = recorder()
    with pytest.warns(UserWarning, match="skipped 1"):
        res = vlm_tta.classify(
            paths, CLASSES, method=m, model=tiny_openclip, cache=False, on_error="skip", batch_size=2
        )
    assert m.chunks == [3, 3] and list(res.positions) == [0, 2, 3, 4, 5, 6]


def test_finish_runs_after_an_error(tiny_openclip, recorder):
    m = recorder(fail_at=2)
    with pytest.raises(RuntimeError, match="boom"):
        vlm_tta.classify(_images(7), CLASSES, method=m, model=tiny_openclip, cache=False)
    assert m.finished == 1


def test_raw_feature_methods_get_unnormalised_embeddings(tiny_openclip, recorder):
    class Raw(recorder):
        raw_features = True

    m = Raw(batch=4)
    feats = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32) * 7
    vlm_tta.classify_features(feats, np.eye(3, 8, dtype=np.float32), method=m)
    torch.testing.assert_close(m.last_norms[:, 0], torch.from_numpy(feats).norm(dim=-1))
    m = recorder(batch=4)
    vlm_tta.classify_features(feats, np.eye(3, 8, dtype=np.float32), method=m)
    torch.testing.assert_close(m.last_norms[:, 0], torch.ones(4))
    raw = Raw(batch=2)
    vlm_tta.classify(_images(2), CLASSES, method=raw, model=tiny_openclip, cache=False)
    assert (raw.last_norms - 1).abs().max() > 1e-3  # the image encoder's raw output


def test_extras_reach_the_method_and_are_checked():
    seen = {}

    class Extras(Method):
        def setup(self, ctx):
            super().setup(ctx)
            seen.update(ctx.extras)

        def predict_batch(self, features):
            return [Prediction(self.ctx.logits(f[0])) for f in features]

    feats, cls = np.random.rand(4, 6).astype(np.float32), np.eye(3, 6, dtype=np.float32)
    vlm_tta.classify_features(
        feats, cls, method=Extras(), noise_features=np.random.rand(2, 6).astype(np.float32),
        injected_noise=[True, False, False, True], support_features=np.random.rand(5, 6).astype(np.float32),
        support_labels=[0, 1, 2, 0, 1],
    )  # fmt: skip
    assert seen["noise_features"].shape == (2, 6) and seen["injected_noise"].tolist() == [True, False, False, True]
    assert seen["support_labels"].dtype == torch.long and seen["support_features"].shape == (5, 6)
    for bad in (
        dict(injected_noise=[True]),
        dict(noise_features=np.random.rand(2, 5).astype(np.float32)),
        dict(support_features=np.random.rand(2, 6).astype(np.float32)),
        dict(support_features=np.random.rand(2, 6).astype(np.float32), support_labels=[0, 3]),
    ):
        with pytest.raises(FeatureError):
            vlm_tta.classify_features(feats, cls, method=Extras(), **bad)


def test_method_default_templates_are_used(tiny_openclip):
    class Seven(Method):
        default_templates = "clip7"

        def predict_batch(self, features):
            return [Prediction(self.ctx.logits(f[0])) for f in features]

    res = vlm_tta.classify(_images(1), CLASSES, method=Seven(), model=tiny_openclip, cache=False)
    assert res.info["templates"] == vlm_tta.templates.template_set_id("clip7")
    ref = vlm_tta.classify(_images(1), CLASSES, model=tiny_openclip, cache=False, templates="clip7")
    np.testing.assert_allclose(res.logits, ref.logits, rtol=1e-6)


# --------------------------------------------------------------------------- caller-given views
def _view_tensor(model, imgs, view_set):
    return torch.stack([view_set.make(img, model.preprocess_cfg, original=model.preprocess) for img in imgs])


def test_given_views_are_used_as_given(tiny_openclip, tmp_path):
    imgs = _images(3)
    views = _view_tensor(tiny_openclip, imgs, ViewSet("crop_flip", 5))
    calls = encoder_call_counter(tiny_openclip)
    res = vlm_tta.classify(views, CLASSES, model=tiny_openclip, cache_dir=tmp_path)
    ref = vlm_tta.classify(imgs, CLASSES, model=tiny_openclip, cache=False)
    np.testing.assert_allclose(res.logits, ref.logits, rtol=1e-5, atol=1e-5)  # view 0 is the original
    before = calls()["images"]
    again = vlm_tta.classify(views.numpy(), CLASSES, model=tiny_openclip, cache_dir=tmp_path)
    assert calls()["images"] == before and again.info["cache"]["view_misses"] == 0
    # a model-level method reads the same tensors through the Sample API; raw pixels are not there
    got = {}

    class Peek(Method):
        needs_pixels = True

        def predict_sample(self, sample):
            got["views"] = sample.views(ViewSet("augmix", 5))
            got["feats"] = sample.view_features(ViewSet("augmix", 5))
            got["has_image"] = sample.has_image
            with pytest.raises(ImageError, match="only preprocessed views were given"):
                _ = sample.image
            return Prediction(self.ctx.logits(got["feats"][0]))

    vlm_tta.classify(views[:1], CLASSES, method=Peek(), model=tiny_openclip, cache_dir=tmp_path)
    torch.testing.assert_close(got["views"], views[0])
    assert got["has_image"] is False
    expected = torch.nn.functional.normalize(tiny_openclip.encode_images(views[0]), dim=-1)
    torch.testing.assert_close(got["feats"], expected, rtol=1e-5, atol=1e-6)


def test_given_views_are_checked(tiny_openclip):
    class FourViews(Method):
        def view_set(self):
            return ViewSet("crop_flip", 4)

        def predict_batch(self, features):
            return [Prediction(self.ctx.logits(f[0])) for f in features]

    views = _view_tensor(tiny_openclip, _images(1), ViewSet("crop_flip", 2))
    with pytest.raises(ImageError, match="reads 4 views per image but 2 were given"):
        vlm_tta.classify(views, CLASSES, method=FourViews(), model=tiny_openclip, cache=False)
    with pytest.raises(ImageError, match="model takes"):
        vlm_tta.classify(torch.zeros(1, 1, 3, 8, 8), CLASSES, model=tiny_openclip, cache=False)
    with pytest.raises(ImageError, match="NaN"):
        vlm_tta.classify(torch.full((1, 1, 3, 32, 32), float("nan")), CLASSES, model=tiny_openclip, cache=False)


# --------------------------------------------------------------------------- view blocks in the cache
def test_view_blocks_cover_the_views_once():
    from vlm_tta.views import VIEW_BLOCK, view_blocks

    assert VIEW_BLOCK == 16
    assert view_blocks(1) == [(0, 1)]
    assert view_blocks(2) == [(0, 1), (1, 1)]
    assert view_blocks(64) == [(0, 1), (1, 16), (17, 16), (33, 16), (49, 15)]
    assert view_blocks(32) == [(0, 1), (1, 16), (17, 15)]
    for n in range(1, 70):
        covered = [i for s, c in view_blocks(n) for i in range(s, s + c)]
        assert covered == list(range(n))


def test_views_are_stored_as_blocks_and_read_back_unchanged(tiny_openclip, tmp_path):
    """An image's views are cached as a few rows (the original, then blocks of 16); a warm read gives
    the cold values, the values are each view's own embedding, and hits/misses count views."""
    from vlm_tta.cache import EmbeddingCache
    from vlm_tta.features import FeatureStore

    imgs = _images(3, seed=4)
    vs = ViewSet("crop_flip", 20, seed=2)
    cache = EmbeddingCache(tmp_path / "c")
    cold_store = FeatureStore(tiny_openclip, cache, encode_batch_size=7)
    cold = cold_store.view_features(imgs + imgs[:1], vs)  # a repeated image is encoded once
    assert cold_store.stats["view_misses"] == 3 * 20 and cold_store.stats["view_hits"] == 20
    assert cache.info()["entries"] == 3 * 3  # per image: the original, views 1-16, views 17-19
    pixels = torch.stack(
        [vs.make(img, tiny_openclip.preprocess_cfg, original=tiny_openclip.preprocess) for img in imgs]
    )
    direct = torch.nn.functional.normalize(tiny_openclip.encode_images(pixels.flatten(0, 1)), dim=-1).view(3, 20, -1)
    torch.testing.assert_close(cold[:3], direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cold[3], cold[0], rtol=0, atol=0)
    calls = encoder_call_counter(tiny_openclip)
    warm_store = FeatureStore(tiny_openclip, EmbeddingCache(tmp_path / "c"))
    warm = warm_store.view_features(imgs + imgs[:1], vs)
    assert calls()["images"] == 0 and warm_store.stats == {**warm_store.stats, "view_hits": 80, "view_misses": 0}
    torch.testing.assert_close(warm, cold, rtol=0, atol=0)
    # fewer views of the same recipe and seed share the original and the full first block
    fewer = warm_store.view_features(imgs[:1], ViewSet("crop_flip", 17, seed=2))
    assert calls()["images"] == 0
    torch.testing.assert_close(fewer[0], cold[0, :17], rtol=0, atol=0)
