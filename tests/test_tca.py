"""TCA: token counts and MACs of the condensation, merging and fusing on hand-made tokens, the
reservoir's eviction rules, domain anchors, the correction logits, options, and end-to-end runs."""

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from PIL import Image
from tiny_models import tower_backbone, vit_b16_shape

import vlm_tta
from vlm_tta.errors import MethodOptionError, UnsupportedBackboneError
from vlm_tta.features import FeatureStore, Sample
from vlm_tta.methods import MethodContext, create_method
from vlm_tta.methods.tca import (
    TCAConfig,
    TokenReservoir,
    condense,
    condensed_sizes,
    eviction_scores,
    kcenter_greedy,
    layer_weights,
    merge_coreset,
    planned_tokens,
    rank_consensus,
)

CLASSES = ["cat", "dog", "bird"]


def _images(n, seed=0, size=32):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _first_draw(n, seed):
    return int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))


# --------------------------------------------------------------------------- token counts and MACs
@pytest.mark.parametrize(
    "drop_rate, centers, expected",
    [(0.035, 2, [180, 163, 149]), (0.1, 2, [141, 100, 74]), (0.035, 4, [182, 167, 155]), (0.1, 4, [143, 104, 77])],
)
def test_token_counts_from_197(drop_rate, centers, expected):
    planned = planned_tokens(197, 12, (3, 6, 9), drop_rate, centers)
    assert [planned[i] for i in (3, 6, 9)] == expected
    assert planned[:3] == [197] * 3 and planned[3:6] == [expected[0]] * 3 and planned[9:] == [expected[2]] * 3
    assert condensed_sizes(197, drop_rate) == ((176, 14) if drop_rate == 0.035 else (137, 40))


def test_paper_gmacs_with_two_centres():
    shape = vit_b16_shape()

    def gmacs(r, k):
        return shape.macs(planned_tokens(197, 12, (3, 6, 9), r, k)) / 1e9

    assert gmacs(0.0, 2) == pytest.approx(17.56, rel=0.01)
    assert gmacs(0.035, 2) == pytest.approx(15.45, rel=0.005)  # paper, TCA R = 0.9
    assert gmacs(0.1, 2) == pytest.approx(11.69, rel=0.005)  # paper, TCA R = 0.7
    assert gmacs(0.0, 2) > gmacs(0.035, 4) > gmacs(0.035, 2) > gmacs(0.1, 4) > gmacs(0.1, 2)


@pytest.fixture(scope="module")
def vit_b16_tower():
    """A ViT-B/16-shaped image tower (224 px, patch 16: 197 tokens) of tiny width, random weights."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return tower_backbone(VisionTransformer(224, 16, 32, 10, 2, 2.0, output_dim=16))


def _tca_on(backbone, classes=2, **options):
    method = create_method("tca", **options)
    class_features = F.normalize(torch.randn(classes, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    method.setup(MethodContext(class_features, 100.0, None, [str(c) for c in range(classes)], backbone))
    return method


@pytest.mark.parametrize("drop_rate, centers", [(0.035, 2), (0.1, 2), (0.1, 4)])
def test_condensation_runs_the_planned_token_counts_and_macs(vit_b16_tower, drop_rate, centers):
    method = _tca_on(vit_b16_tower, drop_rate=drop_rate, merge_centers=centers)
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    method.predict_sample(types.SimpleNamespace(views=lambda view_set, indices=None: pixels))
    info = method.run_info()
    assert info["tokens_after_blocks"] == planned_tokens(197, 10, (3, 6, 9), drop_rate, centers)
    assert info["gmacs_per_image"] * 1e9 == pytest.approx(method.stepper.shape.macs(info["tokens_after_blocks"]))
    assert info["gmacs_per_image"] * 1e9 < method.stepper.shape.macs()


# --------------------------------------------------------------------------- merging and fusing
@pytest.mark.parametrize("seed", range(8))
def test_kcenter_merge_on_hand_made_tokens(seed):
    tokens = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [12.0, 0.0]])
    first = _first_draw(4, seed)
    # farthest-point centres from each start, then inverse-distance weighted cluster means
    centers = {0: [0, 3], 1: [1, 3], 2: [2, 0], 3: [3, 0]}[first]
    assert kcenter_greedy(tokens, 2, torch.Generator().manual_seed(seed)) == centers
    near, far = [0.5, 0.0], [(12 * 1 + 10 * 0.5) / 1.5, 0.0]  # centre weighs 1, a token at distance d weighs 1/d
    c_far = [(10 * 1 + 12 * 0.5) / 1.5, 0.0]
    expected = {0: [near, far], 1: [near, far], 2: [c_far, near], 3: [far, near]}[first]
    merged = merge_coreset(tokens, 2, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(merged, torch.tensor(expected))


def test_an_empty_cluster_gives_a_zero_token():
    tokens = torch.tensor([[1.0, 1.0], [1.0, 1.0], [5.0, 0.0]])  # two copies: the third centre repeats one
    for seed in range(4):
        merged = merge_coreset(tokens, 3, torch.Generator().manual_seed(seed))
        assert merged[-1].abs().sum() == 0
        assert sorted(map(tuple, merged[:2].tolist())) == [(1.0, 1.0), (5.0, 0.0)]


def test_condense_keeps_merges_and_fuses_by_attention():
    tokens = torch.randn(11, 4, generator=torch.Generator().manual_seed(0))
    patch_attn = torch.tensor([0.01, 0.2, 0.05, 0.15, 0.03, 0.1, 0.02, 0.12, 0.08, 0.04])
    delta = torch.tensor([0.01, -0.05, 0.02, 0.1, 0.0, -0.04, 0.01, 0.02, -0.03, 0.01])
    cls_attention = torch.stack([torch.cat([torch.tensor([0.2]), patch_attn + s * delta]) for s in (1, -1)])
    # N = 11, r = 0.2: k = ceil(0.8 * 10) = 8, m = 3 -> keep 2, merge 6 into K, fuse 2
    out = condense(tokens, cls_attention, 0.2, 2, torch.Generator().manual_seed(5))
    patch = tokens[1:]
    assert out.shape == (1 + 2 + 2 + 1, 4)
    torch.testing.assert_close(out[0], tokens[0])
    torch.testing.assert_close(out[1:3], patch[[1, 3]])  # by decreasing head-averaged attention
    band = patch[[7, 5, 8, 2, 9, 4]]
    torch.testing.assert_close(out[3:5], merge_coreset(band, 2, torch.Generator().manual_seed(5)))
    torch.testing.assert_close(out[5], 0.02 * patch[6] + 0.01 * patch[0])  # attention-weighted, not renormalised


def test_rank_consensus_can_disagree_with_the_mean():
    attention = torch.tensor([[0.17, 0.16, 0.19, 0.03], [0.18, 0.14, 0.07, 0.05]])  # mean: p0 > p1 > p2 > p3
    # ranks (0 = least attended) per head: (2, 1, 3, 0) and (3, 2, 1, 0); mean / 4 patches
    torch.testing.assert_close(rank_consensus(attention), torch.tensor([2.5, 1.5, 2.0, 0.0]) / 4)
    tokens = torch.arange(10.0).view(5, 2)
    cls_attn = torch.cat([torch.full((2, 1), 0.1), attention], dim=1)
    # N = 5, r = 0.1: k = ceil(3.6) = 4, m = 1 -> keep 2, merge 2 into 2 centres, fuse none (a zero token)
    by_mean = condense(tokens, cls_attn, 0.1, 2, torch.Generator().manual_seed(0), "mean")
    by_rank = condense(tokens, cls_attn, 0.1, 2, torch.Generator().manual_seed(0), "rank")
    patches = tokens[1:]
    torch.testing.assert_close(by_mean[1:3], patches[[0, 1]])
    torch.testing.assert_close(by_rank[1:3], patches[[0, 2]])
    assert sorted(map(tuple, by_rank[3:5].tolist())) == sorted(map(tuple, patches[[1, 3]].tolist()))
    torch.testing.assert_close(by_mean[-1], torch.zeros(2))


def test_too_large_a_drop_rate_is_a_clear_error():
    with pytest.raises(MethodOptionError, match="drop_rate=0.3 is too large"):
        planned_tokens(197, 12, (3, 6, 9), 0.3, 4)


# --------------------------------------------------------------------------- the reservoir
def _entry(h, vec):
    vec = torch.tensor(vec)
    return dict(embedding=vec, entropy_=h, tokens=torch.stack([vec, vec]))  # 2 layers; layer mean = vec


def test_eviction_scores_by_hand():
    h = torch.tensor([0.1, 0.5, 1.2])
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # mean similarity to the others: A (0 + 1) / 2, B 0, C (1 + 0) / 2
    torch.testing.assert_close(eviction_scores(h, feats), torch.tensor([0.6, 0.5, 1.7], dtype=torch.float64))
    # dissimilarity 1 - s = (.5, 1, .5); w = int((1.2 - .1) / (1 - .5)) = 2
    torch.testing.assert_close(
        eviction_scores(h, feats, "dissimilarity"), torch.tensor([1.1, 2.5, 2.2], dtype=torch.float64)
    )
    # equal dissimilarities (the code divides by zero): w = 0, the most uncertain goes
    two = eviction_scores(torch.tensor([0.1, 0.5]), feats[:2], "dissimilarity")
    torch.testing.assert_close(two, torch.tensor([0.1, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("features", ["embedding", "cls_tokens"])
@pytest.mark.parametrize(
    "rule, h_new, evicted, kept",
    [
        ("similarity", 0.2, 2, [0.1, 0.5]),  # the new entry duplicates A: redundant, it goes
        ("dissimilarity", 0.2, 1, [0.1, 0.2]),  # w = int(0.4 / 0.5) = 0: the most uncertain (B) goes
        ("similarity", 1.2, 2, [0.1, 0.5]),
        ("dissimilarity", 1.2, 1, [0.1, 1.2]),  # w = 2: B, the dissimilar and uncertain one, goes
    ],
)
def test_reservoir_eviction_sequence(features, rule, h_new, evicted, kept):
    res = TokenReservoir(num_classes=2, capacity=2, num_layers=2, width=2, embed_dim=2)
    assert res.add(0, **_entry(0.5, [0.0, 1.0]), eviction=rule, features=features) is None  # B
    assert res.add(0, **_entry(0.1, [1.0, 0.0]), eviction=rule, features=features) is None  # A
    assert res.entropies[0, :2].tolist() == [0.1, 0.5]  # sorted by entropy
    assert res.add(0, **_entry(h_new, [1.0, 0.0]), eviction=rule, features=features) == evicted
    assert res.entropies[0, :2].tolist() == kept and int(res.counts[0]) == 2


def test_anchors_only_once_every_class_has_two_entries():
    res = TokenReservoir(num_classes=3, capacity=3, num_layers=2, width=2, embed_dim=2)
    adds = [(0, [1.0, 0.0]), (1, [0.0, 1.0]), (0, [3.0, 0.0]), (2, [1.0, 1.0]), (1, [0.0, 3.0]), (0, [5.0, 0.0])]
    for label, vec in adds:
        res.add(label, **_entry(0.3, vec))
        assert res.anchors() is None
    res.add(2, **_entry(0.3, [3.0, 3.0]))
    anchors = res.anchors()
    expected = torch.tensor([[3.0, 0.0], [0.0, 2.0], [2.0, 2.0]])  # class means
    torch.testing.assert_close(anchors, expected[:, None].expand(3, 2, 2))


def test_correction_logits_by_hand():
    res = TokenReservoir(num_classes=2, capacity=3, num_layers=2, width=2, embed_dim=2)
    res.add(0, embedding=torch.zeros(2), entropy_=0.1, tokens=torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    res.add(1, embedding=torch.zeros(2), entropy_=0.1, tokens=torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    res.add(1, embedding=torch.zeros(2), entropy_=0.2, tokens=torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    current = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = layer_weights(2, 1.0)
    torch.testing.assert_close(w, torch.tensor([1, math.e], dtype=torch.float64) / (1 + math.e))
    w0, w1 = float(w[0]), float(w[1])
    lam, beta = 2.0, 3.0
    expected = torch.tensor(
        [lam * math.exp(-beta * (1 - w0)), lam * (math.exp(-beta * (1 - w1)) + math.exp(-beta * (1 - 1.0)))]
    )
    torch.testing.assert_close(res.logits(current, w, lam, beta), expected)


def test_layer_weights_temperature():
    assert float(layer_weights(12, 0.01)[-1]) > 0.99  # small tau: the last layer
    torch.testing.assert_close(layer_weights(12, 1e6), torch.full((12,), 1 / 12, dtype=torch.float64))


# --------------------------------------------------------------------------- options
def test_options_and_presets():
    assert TCAConfig().resolved_drop_rate == 0.035
    assert TCAConfig(keep_ratio=0.7).resolved_drop_rate == 0.1
    assert TCAConfig(keep_ratio=1.0).resolved_drop_rate == 0.0
    assert TCAConfig(drop_rate=0.1).resolved_drop_rate == 0.1
    assert TCAConfig().reservoir_settings() == dict(reservoir_size=3, tau=0.1, lambd=3.0, beta=5.0)
    assert TCAConfig(preset="eurosat").reservoir_settings() == dict(reservoir_size=2, tau=5.0, lambd=8.0, beta=7.0)
    assert TCAConfig(preset="flowers", beta=1.0).reservoir_settings() == dict(
        reservoir_size=3, tau=0.01, lambd=7.0, beta=1.0
    )
    for bad, match in [
        (dict(keep_ratio=0.8), "keep_ratio must be one of"),
        (dict(keep_ratio=0.9, drop_rate=0.1), "set one of them"),
        (dict(preset="mnist"), "unknown TCA preset"),
        (dict(scoring="max"), "scoring must be one of mean, rank"),
        (dict(eviction="fifo"), "eviction must be one of"),
        (dict(merge_centers=0), "merge_centers"),
        (dict(drop_rate=1.0), "drop_rate"),
    ]:
        with pytest.raises(MethodOptionError, match=match):
            create_method("tca", **bad)


def test_blocks_beyond_the_tower_are_named(tiny_openclip):
    with pytest.raises(MethodOptionError, match=r"condense_blocks \[3, 6, 9\] do not exist.*blocks 0..1"):
        vlm_tta.classify(_images(1), CLASSES, method="tca", model=tiny_openclip, cache=False)


def test_siglip_is_refused_naming_what_tca_supports(tiny_hf_siglip):
    with pytest.raises(UnsupportedBackboneError, match="TCA.*CLIPModel"):
        vlm_tta.classify(_images(1), CLASSES, method="tca", model=tiny_hf_siglip, cache=False)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(params=["tiny_openclip", "tiny_hf_clip"])
def model(request):
    return request.getfixturevalue(request.param)


def test_without_condensation_or_reservoir_it_is_zero_shot(model):
    imgs = _images(4)
    zs = vlm_tta.classify(imgs, CLASSES, model=model, cache=False)
    tca = vlm_tta.classify(
        imgs, CLASSES, method="tca", model=model, cache=False, condense_blocks=(1,), drop_rate=0.0, lambd=0.0
    )
    np.testing.assert_allclose(tca.logits, zs.logits, rtol=1e-5, atol=1e-4)


def test_end_to_end_repeatable_and_the_model_unchanged(model):
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    fingerprint = model.fingerprint
    opts = dict(condense_blocks=(0, 1), drop_rate=0.2, merge_centers=2, seed=3)
    runs = [create_method("tca", **opts) for _ in range(2)]
    results = [vlm_tta.classify(_images(6), CLASSES, method=m, model=model, cache=False) for m in runs]
    np.testing.assert_array_equal(results[0].logits, results[1].logits)
    assert results[0].scores.shape == (6,)
    info = results[0].info
    assert info["gmacs_per_image"] == runs[0].run_info()["gmacs_per_image"]
    assert (
        info["tokens_after_blocks"] == planned_tokens(17, 2, (0, 1), 0.2, 2) == [9, 7]
    )  # k = 13, m = 4: 1 + 5 + 2 + 1
    assert info["gmacs_per_image"] < runs[0].stepper.shape.macs() / 1e9
    assert int(runs[0].reservoir.counts.sum()) <= 3 * 3
    assert model.refresh_fingerprint() == fingerprint
    after = model.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_given_view_tensors_are_what_tca_reads(tiny_openclip):
    imgs = _images(3)
    views = torch.stack([tiny_openclip.preprocess(img) for img in imgs])[:, None]  # N x 1 x 3 x H x W
    opts = dict(condense_blocks=(1,), drop_rate=0.2)
    from_images = vlm_tta.classify(imgs, CLASSES, method="tca", model=tiny_openclip, cache=False, **opts)
    from_views = vlm_tta.classify(views, CLASSES, method="tca", model=tiny_openclip, cache=False, **opts)
    np.testing.assert_array_equal(from_views.logits, from_images.logits)


def _alternating_stream(model, n=8):
    """Two classes whose embeddings are two of the images, and a stream alternating those images,
    so that every class quickly holds two entries and the anchors switch on."""
    protos = _images(2, seed=7)
    pixels = torch.stack([model.preprocess(p) for p in protos])
    class_features = model.encode_images(pixels)
    store = FeatureStore(model)
    samples = [Sample(i, protos[i % 2], store) for i in range(n)]
    return MethodContext(class_features, model.logit_scale, None, ["a", "b"], model), samples


@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
def test_anchors_join_once_both_classes_hold_two(tiny_openclip, drop_rate):
    ctx, samples = _alternating_stream(tiny_openclip)
    outs = {}
    for anchors in (True, False):
        method = create_method("tca", condense_blocks=(1,), drop_rate=drop_rate, anchors=anchors)
        method.setup(ctx)
        outs[anchors] = torch.stack([method.predict_sample(s).logits for s in samples])
        if anchors:
            assert method.run_info()["anchors_from_image"] == 4
            assert method.reservoir.counts.tolist() == [3, 3]
    torch.testing.assert_close(outs[True][:4], outs[False][:4])  # identical before the anchors exist
    assert not torch.allclose(outs[True][4:], outs[False][4:])  # the anchor changes the attention after
