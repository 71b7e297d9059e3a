"""DiffTPT's view pool and view filters (vlm_tta.methods.difftpt): counts, both filter modes on
hand-made logits and embeddings, batching, and the generated views through the model and the cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_models import build_tiny_image_variation_pipeline

from vlm_tta.cache import EmbeddingCache
from vlm_tta.diffusion import ImageVariations
from vlm_tta.errors import MethodOptionError, VlmTtaError
from vlm_tta.features import FeatureStore, encoder_call_counter
from vlm_tta.images import content_hash
from vlm_tta.methods.common import entropy
from vlm_tta.methods.difftpt import (
    assemble_pool,
    conventional_view_set,
    cosine_filter,
    cosine_to_original,
    generated_view_features,
    generated_views,
    select_views,
)
from vlm_tta.views import original_view

# ------------------------------------------------------------------------------- hand-made pool
# 8 views over 3 classes: view 0 the original, 1-4 conventional, 5-7 generated.
HAND_LOGITS = torch.tensor(
    [
        [10.0, 0, 0],  # 0 original
        [0, 9, 0],  # 1 cos 0
        [5, 5, 0],  # 2 cos 0.707
        [20, 0, 0],  # 3 cos 1, the most confident view
        [1, 0.1, 0],  # 4 cos 0.995, nearly uniform
        [0, 0, 12],  # 5 cos 0 (ties with view 1, which comes first), very confident
        [3, 1, 0],  # 6 cos 0.949
        [-10, 0, 0],  # 7 cos -1
    ]
)
# Image embeddings for the paper mode: generated view 5 looks like the original, 7 does not.
HAND_FEATURES = torch.tensor([[1.0, 0]] + [[0.3, 0.7]] * 4 + [[1, 0.05], [1, 1], [0, 1]])


def test_hand_made_code_mode():
    cos = cosine_to_original(HAND_LOGITS)
    assert torch.allclose(cos, torch.tensor([0, math.sqrt(0.5), 1, 1 / math.sqrt(1.01), 0, 3 / math.sqrt(10), -1]))
    # int(7 * 0.8) = 5 by logit cosine, most similar first; view 5 loses the tie with view 1, 7 is last
    sel = select_views(HAND_LOGITS, cosine_fraction=0.8, entropy_fraction=0.5, n_generated=3)
    assert sel.cosine.tolist() == [3, 4, 6, 2, 1]
    assert sel.kept.tolist() == [0, 3, 4, 6, 2, 1]
    # int(6 * 0.5) = 3 lowest entropies among the kept: 3 ([20,0,0]), 0 ([10,0,0]), 1 ([0,9,0])
    assert sel.selected.tolist() == [3, 0, 1]
    h = entropy(HAND_LOGITS)
    assert h[3] < h[0] < h[1] < h[6] < h[2] < h[4]


def test_hand_made_paper_mode():
    # generated views (5, 6, 7) by embedding cosine: 0.9988, 0.707, 0 -> int(3 * 0.8) = 2 kept: 5, 6;
    # the conventional views 1-4 all pass
    sel = select_views(HAND_LOGITS, 0.8, 0.5, mode="paper", features=HAND_FEATURES, n_generated=3)
    assert sel.cosine.tolist() == [1, 2, 3, 4, 5, 6]
    assert sel.kept.tolist() == [0, 1, 2, 3, 4, 5, 6]
    # int(7 * 0.5) = 3: view 5 ([0,0,12]) is now in, after view 3 and before the original
    assert sel.selected.tolist() == [3, 5, 0]
    # the paper mode's cosine reads the embeddings only; the code mode's the logits only
    scrambled = HAND_LOGITS.clone()
    scrambled[5:] = scrambled[5:].flip(0)
    assert cosine_filter(scrambled, 0.8, "paper", HAND_FEATURES, 3).tolist() == sel.cosine.tolist()
    assert cosine_filter(HAND_LOGITS, 0.8, "code", HAND_FEATURES.flip(0), 3).tolist() == [3, 4, 6, 2, 1]


def test_default_counts_on_the_full_pool():
    torch.manual_seed(0)
    n, v, c = 3, 1 + 64 + 63, 10
    logits = torch.randn(n, v, c) * 3
    features = torch.randn(n, v, 16)
    code = select_views(logits)
    assert code.cosine.shape == (n, 101) and code.kept.shape == (n, 102) and code.selected.shape == (n, 30)
    for row in range(n):
        assert 0 not in code.cosine[row].tolist() and len(set(code.cosine[row].tolist())) == 101
        assert code.kept[row, 0] == 0 and set(code.selected[row].tolist()) <= set(code.kept[row].tolist())
    paper = select_views(logits, mode="paper", features=features)
    # 64 conventional + int(63 * 0.8) = 50 generated; 1 + 114 = 115 candidates; int(115 * 0.3) = 34
    assert paper.cosine.shape == (n, 114) and paper.kept.shape == (n, 115) and paper.selected.shape == (n, 34)
    assert (paper.cosine[:, :64] == torch.arange(1, 65)).all() and (paper.cosine[:, 64:] >= 65).all()


def test_selection_matches_a_direct_loop_and_batching_changes_nothing():
    """Against the algorithm written out per image with Python sorts (what the reference does per
    image), and the batched call against one image at a time."""
    torch.manual_seed(1)
    logits = torch.randn(4, 128, 20) * 5
    batched = select_views(logits)
    for i in range(4):
        one = select_views(logits[i : i + 1])
        assert torch.equal(one.selected[0], batched.selected[i]) and torch.equal(one.kept[0], batched.kept[i])
        x = logits[i].double()
        cos = [float(torch.dot(x[0], x[j]) / (x[0].norm() * x[j].norm())) for j in range(1, 128)]
        by_cos = sorted(range(1, 128), key=lambda j: -cos[j - 1])[: int(127 * 0.8)]
        kept = [0] + by_cos
        ent = {j: float(entropy(x[j])) for j in kept}
        expected = sorted(kept, key=lambda j: ent[j])[: int(len(kept) * 0.3)]
        assert batched.kept[i].tolist() == kept
        assert batched.selected[i].tolist() == expected


def test_bad_options():
    logits = torch.randn(2, 8, 3)
    with pytest.raises(MethodOptionError, match="filter mode"):
        select_views(logits, mode="features")
    with pytest.raises(MethodOptionError, match="pass features"):
        select_views(logits, mode="paper", n_generated=3)
    with pytest.raises(ValueError, match="n_generated"):
        select_views(logits, mode="paper", features=torch.randn(2, 8, 4), n_generated=8)
    with pytest.raises(MethodOptionError, match="keeps none"):
        select_views(logits, cosine_fraction=0.1)


def test_assemble_pool_order():
    conv = torch.arange(2 * 65 * 4, dtype=torch.float32).view(2, 65, 4)
    gen = -torch.arange(2 * 63 * 4, dtype=torch.float32).view(2, 63, 4) - 1
    pool = assemble_pool(conv, gen)
    assert pool.shape == (2, 128, 4) and torch.equal(pool[:, :65], conv) and torch.equal(pool[:, 65:], gen)
    with pytest.raises(ValueError):
        assemble_pool(conv, gen[:1])
    assert conventional_view_set("crop_flip").n_views == 65


# ------------------------------------------------------------------------------- generated views


@pytest.fixture(scope="module")
def variations(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: one thread is much faster on a shared machine
    pipe = build_tiny_image_variation_pipeline()
    cache = EmbeddingCache(tmp_path_factory.mktemp("cache"))
    yield ImageVariations(pipe, cache=cache, count=3, steps=2, height=32, width=32, jpeg_quality=None, store_size=None)
    torch.set_num_threads(n)


def test_generated_views_use_the_model_preprocessing(tiny_openclip, variations):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    gens = variations([image])[0]
    views = generated_views(tiny_openclip, gens)
    assert views.shape == (3, 3, 32, 32)
    for g, v in zip(gens, views):
        assert torch.equal(v, original_view(Image.fromarray(g), tiny_openclip.preprocess_cfg))
    with pytest.raises(VlmTtaError, match="store-size"):
        generated_views(tiny_openclip, gens[:, :16, :16])


def test_generated_view_features_are_cached(tiny_openclip, variations, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)) for _ in range(2)]
    hashes = [content_hash(im) for im in images]
    gens = variations(images)
    store = FeatureStore(tiny_openclip, EmbeddingCache(tmp_path))
    calls = encoder_call_counter(tiny_openclip)
    feats = generated_view_features(store, variations, hashes)
    assert feats.shape == (2, 3, tiny_openclip.embed_dim) and calls()["images"] >= 1
    expected = tiny_openclip.encode_images(torch.stack([generated_views(tiny_openclip, g) for g in gens]).flatten(0, 1))
    assert torch.allclose(feats.flatten(0, 1), expected, atol=1e-5)
    before = calls()["images"]
    reader = ImageVariations(variations._pipe, cache=EmbeddingCache(tmp_path / "empty"), **vars(variations.settings))
    reader._identity = variations.identity  # same keys, but an empty generation cache: nothing may be read
    again = generated_view_features(store, reader, hashes)
    assert torch.equal(again, feats) and calls()["images"] == before and reader.calls == 0
