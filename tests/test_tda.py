"""TDA: cache rules, the negative window and mask, multi-view summaries, presets, stream semantics,
and end to end on a tiny model."""

import math

import pytest
import torch
import torch.nn.functional as F
from feature_method_checks import check_cli_lists_options, end_to_end, synthetic_stream

from vlm_tta.errors import FeatureError, MethodOptionError
from vlm_tta.methods import MethodContext, create_method
from vlm_tta.methods.tda import ClassCache

EYE = torch.eye(4)  # class k's embedding is the k-th axis: an image's cosines are its coordinates


def _setup(scale=10.0, classes=EYE, **opts):
    m = create_method("tda", **opts)
    m.setup(MethodContext(classes, scale))
    return m


def _unit(*v):
    return F.normalize(torch.tensor(v, dtype=torch.float32), dim=0)


def test_cache_keeps_the_lowest_entropies_and_replaces_the_worst_only_when_strictly_better():
    cache = ClassCache(dim=2, capacity=3)
    keys = torch.eye(2).repeat(3, 1)
    assert cache.update(0, keys[0], 0.5) and cache.update(0, keys[1], 0.3) and cache.update(0, keys[2], 0.4)
    assert [e for e, _ in cache.items[0]] == [0.3, 0.4, 0.5]
    assert not cache.update(0, torch.tensor([9.0, 9.0]), 0.5)  # full, not lower than the worst: dropped
    worst_row = cache.items[0][-1][1]
    assert cache.update(0, torch.tensor([7.0, 7.0]), 0.2)  # replaces the 0.5 item in its row
    assert [e for e, _ in cache.items[0]] == [0.2, 0.3, 0.4]
    assert cache.items[0][0][1] == worst_row and cache.store.keys[worst_row].tolist() == [7.0, 7.0]
    assert len(cache) == 3 and cache.update(1, keys[0], 9.9) and len(cache) == 4  # classes are separate


def test_first_image_hand_computed_with_both_caches():
    # cosines (0.718, 0.503, 0.431, 0.215) at scale 10: p = (0.848, 0.098, 0.048, 0.0056), entropy
    # 0.543 nats, / log2(4) = 0.271: inside (0.2, 0.5), so both caches take the image.
    q = _unit(1, 0.7, 0.6, 0.3)
    m = _setup()
    pred = m.predict_features(q[None])
    clip = 10 * q
    p = clip.softmax(0)
    assert 0.2 < float(-(p * p.log()).sum()) / 2 < 0.5
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # 0.03 < p < 1
    assert ((p > 0.03) & (p < 1)).float().tolist() == mask.tolist()
    # both caches hold only the image itself: affinity exp(-beta (1 - q.q)) = 1
    expected = clip + 2.0 * torch.tensor([1.0, 0, 0, 0]) - 0.117 * mask
    torch.testing.assert_close(pred.logits, expected)
    assert len(m.pos_cache) == 1 and len(m.neg_cache) == 1


def test_predict_first_scores_the_first_image_with_empty_caches():
    q = _unit(1, 0.7, 0.6, 0.3)
    m = _setup(order="predict_first")
    torch.testing.assert_close(m.predict_features(q[None]).logits, 10 * q)
    assert len(m.pos_cache) == 1  # written after scoring


def test_negative_window_uses_log2_by_default_and_ln_as_an_option():
    q = _unit(1, 0.9, 0.5, 0)  # 0.726 nats: / log2(4) = 0.363 (inside), / ln(4) = 0.524 (outside)
    m = _setup()
    m.predict_features(q[None])
    assert len(m.neg_cache) == 1
    m = _setup(entropy_norm="ln")
    m.predict_features(q[None])
    assert len(m.neg_cache) == 0 and len(m.pos_cache) == 1
    m = _setup()
    m.predict_features(_unit(1, 0.5, 0.45, 0.2)[None])  # confident: 0.076 < 0.2, positive cache only
    assert len(m.neg_cache) == 0 and len(m.pos_cache) == 1


def test_cache_logits_weigh_entries_by_affinity_and_class():
    # image 2 reads image 1 from the positive cache of class 0 with weight exp(-beta (1 - q1.q2))
    q1, q2 = _unit(1, 0.3, 0.2, 0.1), _unit(1, 0.2, 0.25, 0.1)
    m = _setup(negative=False, pos_alpha=3.0, pos_beta=4.0)
    preds = m.predict_batch(torch.stack([q1, q2])[:, None])
    a = math.exp(-4.0 * (1 - float(q1 @ q2)))
    expected = 10 * q2 + 3.0 * torch.tensor([1.0 + a, 0, 0, 0])  # its own entry (1) + image 1's (a)
    torch.testing.assert_close(preds[1].logits, expected)


def test_multi_view_summary_is_the_unnormalised_mean_of_the_confident_views():
    g = torch.Generator().manual_seed(0)
    views = F.normalize(torch.randn(1, 20, 4, generator=g) * 0.3 + torch.tensor([0.2, 0.1, 0, 0]), dim=-1)
    m = _setup(n_views=20)
    s = m.summarize_views(views)
    logits = 10 * views[0] @ EYE.T
    ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    keep = torch.argsort(ent)[:2]  # int(0.1 x 20) = 2 views
    kept = logits[keep]
    feat = views[0, keep].mean(0)
    assert float(feat.norm()) < 1  # not re-normalised (the reference's quirk)
    torch.testing.assert_close(s["feature"][0], feat)
    torch.testing.assert_close(s["logits"][0], kept.mean(0))
    mean_p = kept.softmax(-1).mean(0)
    torch.testing.assert_close(s["entropy"][0], -(mean_p * mean_p.log()).sum())  # entropy of the averaged p
    torch.testing.assert_close(s["prob"][0], mean_p)
    assert int(s["label"][0]) == int(kept.mean(0).argmax())
    renorm = _setup(n_views=20, renormalize=True).summarize_views(views)["feature"][0]
    torch.testing.assert_close(renorm, F.normalize(feat, dim=0))


def _naive_tda(views, classes, scale, alpha, beta, order="write_first"):
    """TDA written plainly from the paper and issue, one image at a time (the test's oracle)."""
    pos, neg, out = {}, {}, []
    c = len(classes)

    def offer(cache, cls, item, cap):
        items = cache.setdefault(cls, [])
        if len(items) < cap:
            items.append(item)
        elif item[1] < items[-1][1]:
            items[-1] = item
        items.sort(key=lambda it: it[1])

    def read(cache, f, a, b, negative):
        total = torch.zeros(c)
        for cls, items in cache.items():
            for key, _, p in items:
                value = ((p > 0.03) & (p < 1)).float() if negative else F.one_hot(torch.tensor(cls), c).float()
                total += a * math.exp(-b * (1 - float(f @ key))) * value
        return total

    for v in views:
        logits = scale * v @ classes.T
        if len(v) > 1:
            ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
            keep = torch.argsort(ent)[: int(len(v) * 0.1)]
            f, lg = v[keep].mean(0), logits[keep].mean(0)
            p = logits[keep].softmax(-1).mean(0)
            h = float(-(p * p.clamp(min=1e-30).log()).sum())
        else:
            f, lg = v[0], logits[0]
            p = lg.softmax(-1)
            h = float(-(p * lg.log_softmax(-1)).sum())
        y = int(lg.argmax())
        item = (f, h, p)
        if order == "write_first":
            offer(pos, y, item, 3)
            if 0.2 < h / math.log2(c) < 0.5:
                offer(neg, y, item, 2)
        out.append(lg + read(pos, f, alpha, beta, False) - read(neg, f, 0.117, 1.0, True))
        if order != "write_first":
            offer(pos, y, item, 3)
            if 0.2 < h / math.log2(c) < 0.5:
                offer(neg, y, item, 2)
    return torch.stack(out)


@pytest.mark.parametrize("v,order", [(1, "write_first"), (20, "write_first"), (1, "predict_first")])
def test_stream_matches_a_plain_per_image_implementation_at_any_batch_size(v, order):
    views, classes, _ = synthetic_stream(60, 5, 16, v, seed=v)
    expected = _naive_tda(views, classes, 100.0, 2.0, 5.0, order)
    for batch in (1, 7, 60):  # the batched cache read must not depend on how the stream is chunked
        m = create_method("tda", n_views=v, order=order)
        m.setup(MethodContext(classes, 100.0))
        got = torch.stack([p.logits for b in views.split(batch) for p in m.predict_batch(b)])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert len(m.pos_cache) == 15 and len(m.neg_cache) > 0  # full positive cache: replacements happened
    m.reset()
    assert len(m.pos_cache) == 0 and len(m.neg_cache) == 0


def test_presets_views_and_options():
    m = create_method("tda", preset="imagenet_a")
    assert m.config.settings["pos_alpha"] == 2.0 and m.config.settings["pos_beta"] == 5.0
    assert (m.view_set().recipe, m.view_set().n_views) == ("augmix", 64)
    dtd = create_method("tda", preset="DTD").config.settings  # aliases resolve through vlm_tta.data
    assert (dtd["pos_alpha"], dtd["pos_beta"], dtd["view_set"].n_views) == (2.0, 3.0, 1)
    assert create_method("tda").config.settings["view_set"].recipe == "original"
    s = create_method("tda", preset="imagenet_sketch", pos_alpha=1.5, n_views=16).config.settings
    assert (s["pos_alpha"], s["pos_beta"], s["view_set"].n_views) == (1.5, 7.45, 16)
    with pytest.raises(MethodOptionError, match="known presets"):
        create_method("tda", preset="nope")
    with pytest.raises(MethodOptionError, match="keeps none"):
        create_method("tda", n_views=5)  # int(0.1 x 5) = 0 views
    with pytest.raises(MethodOptionError, match="entropy_norm"):
        create_method("tda", entropy_norm="log10")
    with pytest.raises(MethodOptionError, match="lower < upper"):
        create_method("tda", neg_entropy_window=(0.5, 0.2))


def test_bad_features_give_clear_errors():
    m = _setup(n_views=10)
    with pytest.raises(FeatureError, match="reads 10 views"):
        m.predict_batch(torch.ones(2, 3, 4))
    bad = torch.ones(2, 10, 4)
    bad[0, 3, 1] = float("nan")
    with pytest.raises(FeatureError, match="NaN"):
        m.predict_batch(bad)


def test_end_to_end_on_a_tiny_model(tiny_openclip, tmp_path):
    result = end_to_end(tiny_openclip, tmp_path, "tda", n_views=10)
    assert result.info["tda_cache_entries"]["positive"] >= 1  # the caches' sizes, from run_info()


def test_cli_lists_every_option_with_its_default(capsys):
    check_cli_lists_options("tda", capsys)


@pytest.mark.parametrize("v", [1, 64])
def test_cache_sized_blocks_give_the_bits_of_one_pass(monkeypatch, v):
    """The exact speed-up: the view summaries in blocks of images (common.blockwise) equal one pass."""
    import vlm_tta.methods.common as common

    views, classes, _ = synthetic_stream(24, 50, 16, v, seed=3)
    m = create_method("tda", n_views=v)
    m.setup(MethodContext(classes, 100.0))
    monkeypatch.setattr(common, "BLOCK_ELEMENTS", 10**12)  # the straightforward computation: one block
    whole = m.summarize_views(views)
    monkeypatch.setattr(common, "BLOCK_ELEMENTS", v * 50 * 5)  # blocks of 5 images
    blocked = m.summarize_views(views)
    assert blocked.keys() == whole.keys() and all(torch.equal(blocked[k], whole[k]) for k in whole)
