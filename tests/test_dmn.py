"""DMN: the memory's replacement rule, the read-out (with the self-match), pseudo-labels, the fused
output, few-shot static memory (embeddings and images), the trained variant, the test-label search
helper, and end to end on a tiny model."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from feature_method_checks import check_cli_lists_options, end_to_end, synthetic_stream
from PIL import Image

import vlm_tta
from vlm_tta.cache import as_cache
from vlm_tta.errors import MethodOptionError
from vlm_tta.features import FeatureStore, encoder_call_counter
from vlm_tta.methods import MethodContext, create_method
from vlm_tta.methods.dmn import (
    DMNBiases,
    direct_readout,
    gram,
    gram_readout,
    search_fusion_weights_on_test_labels,
)


def _setup(classes, scale=10.0, extras=None, **opts):
    m = create_method("dmn", **opts)
    m.setup(MethodContext(classes, scale, extras=extras or {}))
    return m


def _unit(*v):
    return F.normalize(torch.tensor(v, dtype=torch.float32), dim=0)


def _slots(m, cls):
    """Class ``cls``'s dynamic memory as stored (features and entropies, in slot order)."""
    f = m.fixed.shape[1]
    rows = m.slot_row[cls, f : f + int(m.count[cls])]
    return m.store.keys[rows], m.entropy[cls, : int(m.count[cls])]


def test_replacement_rule_append_then_replace_the_largest_entropy_if_smaller():
    m = _setup(torch.eye(3), memory_size=2)
    a, b, c, d = torch.eye(3)[0], torch.eye(3)[1], torch.eye(3)[2], _unit(1, 1, 0)
    m.write(a, 0, 0.5)
    m.write(b, 0, 0.7)  # room left: appended
    m.write(c, 0, 0.6)  # full; 0.6 < 0.7: replaces the 0.7 slot
    keys, ents = _slots(m, 0)
    assert ents.tolist() == pytest.approx([0.5, 0.6]) and torch.equal(keys, torch.stack([a, c]))
    m.write(d, 0, 0.9)  # higher than everything stored: discarded
    m.write(d, 0, 0.6)  # not smaller than any stored entropy (0.5, 0.6): discarded
    keys, ents = _slots(m, 0)
    assert ents.tolist() == pytest.approx([0.5, 0.6]) and torch.equal(keys, torch.stack([a, c]))
    m.write(d, 0, 0.55)  # smaller than 0.6: replaces it
    keys, ents = _slots(m, 0)
    assert ents.tolist() == pytest.approx([0.5, 0.55]) and torch.equal(keys, torch.stack([a, d]))
    assert int(m.count[1]) == 0
    # the Gram matrix that the fast read-out uses follows the writes
    slots = torch.cat([m.fixed[0], keys])
    torch.testing.assert_close(m.gram[0, :3, :3], slots @ slots.T)


def test_equal_largest_entropies_replace_the_last_slot():
    m = _setup(torch.eye(2), memory_size=3)
    for k, e in zip(torch.eye(2).repeat(2, 1)[:3], (0.8, 0.2, 0.8)):
        m.write(k, 1, e)
    m.write(_unit(1, 1), 1, 0.1)
    assert _slots(m, 1)[1].tolist() == pytest.approx([0.8, 0.2, 0.1])


def test_read_out_hand_computed_with_the_self_match():
    classes = torch.eye(3)[:2]  # two classes along the first two axes of a 3-d space
    q = _unit(0.8, 0.5, 0.3)
    views = q.repeat(10, 1)[None]  # 10 identical views: pseudo-label = argmax of the text probabilities = 0
    m = _setup(classes, n_views=10, alpha2=1.0, record_components=True)
    pred = m.predict_batch(views)[0]
    # class 0's memory is [text t0, q itself]: weights exp(-5.5 (1 - q.t0)) and exp(0) = 1
    w_t = math.exp(-5.5 * (1 - float(q[0])))
    proto0 = F.normalize(w_t * classes[0] + 1.0 * q, dim=0)
    dyn = 10 * torch.stack([q @ proto0, q @ classes[1]])  # class 1: only its text slot
    comps = m.components()
    np.testing.assert_allclose(comps["dynamic"][0], dyn.softmax(0).numpy(), rtol=1e-5, atol=1e-6)
    text = (10 * q @ classes.T).softmax(0)
    np.testing.assert_allclose(comps["text"][0], text.numpy(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.logits.softmax(0), (text + dyn.softmax(0)) / 2)
    assert pred.score == pytest.approx(float(((text + dyn.softmax(0)) / 2).max()))
    # predict_first reads the empty memory: the dynamic classifier is the text classifier
    m = _setup(classes, n_views=10, order="predict_first", record_components=True)
    m.predict_batch(views)
    np.testing.assert_allclose(m.components()["dynamic"][0], text.numpy(), rtol=1e-5, atol=1e-6)


def test_pseudo_label_comes_from_the_confident_views_and_the_original_view_is_stored():
    classes = torch.eye(4)[:3]
    original = _unit(1, 1, 0.2, 0)  # ambiguous between classes 0 and 1
    confident = _unit(0, 0, 1, 0.1)  # certain of class 2
    views = torch.stack([original] + [confident] + [_unit(1, 1, 1, 0)] * 8)[None]  # 10 views, keeps 1
    m = _setup(classes, n_views=10)
    m.predict_batch(views)
    assert m.count.tolist() == [0, 0, 1]
    keys, ents = _slots(m, 2)
    torch.testing.assert_close(keys[0], original)
    p = (10 * confident @ classes.T).softmax(0)
    assert float(ents[0]) == pytest.approx(float(-(p * torch.log(p + 1e-8)).sum()), rel=1e-5)


def _random_memory(c=5, s=7, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    slots = F.normalize(torch.randn(c, s, d, generator=g), dim=-1)
    filled = torch.rand(c, s, generator=g) > 0.3
    filled[:, 0] = True
    return slots * filled[..., None], filled, F.normalize(torch.randn(4, d, generator=g), dim=-1)


def test_gram_read_out_equals_forming_the_prototypes():
    slots, filled, q = _random_memory()
    direct = direct_readout(q, slots, filled, 5.5, 100.0)
    fast = gram_readout(torch.einsum("nd,csd->ncs", q, slots), gram(slots), 5.5, 100.0)
    torch.testing.assert_close(fast, direct, rtol=1e-5, atol=1e-4)
    # zero biases are the training-free read-out
    torch.testing.assert_close(direct_readout(q, slots, filled, 5.5, 100.0, DMNBiases(5, 12)), direct)


def _naive_dmn(views, classes, scale, memory_size, alpha2, order="write_first"):
    """DMN-ZS written plainly (per image, prototypes formed explicitly): the test's oracle."""
    c = len(classes)
    mem = [[] for _ in range(c)]  # per class: [feature, entropy]

    def write(y, f, h):
        if len(mem[y]) < memory_size:
            mem[y].append([f, h])
        elif any(h < e for _, e in mem[y]):
            worst = max(range(len(mem[y])), key=lambda j: (mem[y][j][1], j))
            mem[y][worst] = [f, h]

    out = []
    for v in views:
        p = (scale * v @ classes.T).softmax(-1)
        ent = -(p * torch.log(p + 1e-6)).sum(-1)
        keep = torch.argsort(ent, stable=True)[: int(len(v) * 0.1)]
        mean = p[keep].mean(0)
        y, h = int(mean.argmax()), float(-(mean * torch.log(mean + 1e-8)).sum())
        if order == "write_first":
            write(y, v[0], h)
        logits = []
        for k in range(c):
            keys = torch.stack([classes[k]] + [f for f, _ in mem[k]])
            w = torch.exp(-5.5 * (1 - keys @ v[0]))
            logits.append(scale * F.normalize(w @ keys, dim=0) @ v[0])
        if order != "write_first":
            write(y, v[0], h)
        out.append(p[0] + alpha2 * torch.stack(logits).softmax(0))
    return torch.stack(out)


@pytest.mark.parametrize("order", ["write_first", "predict_first"])
def test_stream_matches_a_plain_per_image_implementation_at_any_batch_size(order):
    views, classes, _ = synthetic_stream(50, 4, 16, 10, seed=1)
    expected = _naive_dmn(views, classes, 100.0, 3, 2.0, order)
    expected = expected / expected.sum(-1, keepdim=True)
    for batch in (1, 6, 50):
        m = _setup(classes, 100.0, n_views=10, memory_size=3, alpha2=2.0, order=order)
        got = torch.stack([p.logits for b in views.split(batch) for p in m.predict_batch(b)]).softmax(-1)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert m.count.tolist() == [3, 3, 3, 3]  # every class full: replacements happened
    m.reset()
    assert m.count.sum() == 0 and m.store.n == 4


def _support(classes, shots, views, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(classes)).repeat_interleave(shots)
    feats = classes[labels][:, None] + 0.8 * torch.randn(len(labels), views, classes.shape[1], generator=g)
    return F.normalize(feats, dim=-1), labels


def test_few_shot_static_memory_from_extras():
    views, classes, _ = synthetic_stream(12, 4, 16, 10, seed=2)
    feats, labels = _support(classes, shots=3, views=4)
    extras = {"support_features": feats, "support_labels": labels}
    m = _setup(classes, 100.0, extras, n_views=10, support_views=4, alpha2=0.5, alpha3=2.0, record_components=True)
    preds = m.predict_batch(views)
    comps = m.components()
    # the static memory: [text, the 4 views of each of the 3 shots] per class, read for the original view
    slots = torch.stack([torch.cat([classes[k : k + 1], feats[labels == k].reshape(-1, 16)]) for k in range(4)])
    static = direct_readout(views[:, 0], slots, torch.ones(4, 13, dtype=torch.bool), 5.5, 100.0).softmax(-1)
    np.testing.assert_allclose(comps["static"], static.numpy(), rtol=1e-4, atol=1e-5)
    fused = torch.as_tensor(comps["text"] + 0.5 * comps["dynamic"] + 2.0 * comps["static"]) / 3.5
    torch.testing.assert_close(torch.stack([p.logits for p in preds]).softmax(-1), fused, rtol=1e-4, atol=1e-6)
    # the shots' original views join the dynamic memory's fixed slots
    assert m.fixed.shape[1] == 4
    torch.testing.assert_close(m.fixed[1, 1:], feats[labels == 1, 0])


def test_few_shot_errors():
    classes = torch.eye(3)
    with pytest.raises(MethodOptionError, match="needs a support set"):
        _setup(classes, shots=2)
    with pytest.raises(MethodOptionError, match="class indices"):
        _setup(classes, extras={"support_features": torch.ones(2, 3), "support_labels": [0, 5]})
    with pytest.raises(MethodOptionError, match="support_views=2"):
        _setup(classes, extras={"support_features": torch.ones(2, 3), "support_labels": [0, 1]}, support_views=2)
    with pytest.raises(MethodOptionError, match="classify_features"):
        _setup(classes, support="imagenet", support_root="/nowhere")  # no encoder on embeddings


def test_few_shot_support_images_go_through_the_shared_cache(tiny_openclip, tmp_path):
    from vlm_tta.data import ImageFolderDataset
    from vlm_tta.views import ViewSet

    classes = ["cat", "dog"]
    rng = np.random.default_rng(0)
    for name in classes:
        (tmp_path / "support" / name).mkdir(parents=True)
        for j in range(3):
            pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "support" / name / f"{j}.png")
    images = [Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)) for _ in range(3)]
    opts = dict(support=str(tmp_path / "support"), shots=2, support_views=3, n_views=10)
    calls = encoder_call_counter(tiny_openclip)
    m = create_method("dmn", **opts)
    first = vlm_tta.classify(images, classes, method=m, model=tiny_openclip, cache_dir=tmp_path / "cache")
    encoded = calls()["images"]
    assert encoded > 0 and m.static.shape[:2] == (2, 1 + 2 * 3)  # text + 2 shots x 3 views per class
    again = vlm_tta.classify(images, classes, method="dmn", model=tiny_openclip, cache_dir=tmp_path / "cache", **opts)
    assert calls()["images"] == encoded  # support and test views all come from the cache
    np.testing.assert_allclose(again.probs, first.probs, rtol=1e-5, atol=1e-6)
    # the same support set passed as embeddings gives the same predictions
    store = FeatureStore(tiny_openclip, as_cache(tmp_path / "cache"))
    support = vlm_tta.data.few_shot(ImageFolderDataset(tmp_path / "support"), 2, seed=0)
    feats = store.view_features(store.open_images(support.paths), ViewSet("crop_flip_dmn", 3))
    res = vlm_tta.classify_features(
        store.view_features(images, m.view_set()),
        store.class_features(classes),
        method="dmn",
        logit_scale=tiny_openclip.logit_scale,
        support_features=feats,
        support_labels=support.labels,
        **{k: v for k, v in opts.items() if k not in ("support", "shots")},
    )
    assert calls()["images"] == encoded
    np.testing.assert_allclose(res.probs, first.probs, rtol=1e-5, atol=1e-6)


def test_trained_variant_learns_biases_that_lower_the_training_loss():
    classes = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(3)), dim=-1)
    feats, labels = _support(classes, shots=4, views=5, seed=1)
    extras = {"support_features": feats, "support_labels": labels}
    opts = dict(train=True, train_epochs=15, train_lr=1e-2, train_views=4, n_views=10)
    m = _setup(classes, 100.0, extras, **opts)
    assert any(float(p.abs().max()) > 0 for p in m.biases.parameters())

    @torch.no_grad()
    def loss(biases):
        q = feats[:, 1:].reshape(-1, 8)
        y = labels.repeat_interleave(4)
        static = direct_readout(q, m.static, m.static_filled, 5.5, 100.0, biases)
        text = 100.0 * q @ (biases.text_features(classes) if biases is not None else classes).T
        return float(F.cross_entropy(static, y) + F.cross_entropy(text, y))

    assert loss(m.biases) < loss(DMNBiases(3, 8))
    again = _setup(classes, 100.0, extras, **opts)  # seeded: the same biases
    for a, b in zip(m.biases.parameters(), again.biases.parameters()):
        torch.testing.assert_close(a, b)
    views, _, _ = synthetic_stream(5, 3, 8, 10, seed=4)
    assert len(m.predict_batch(views)) == 5


def test_fusion_weight_search_is_an_explicit_helper_on_test_labels():
    text = np.array([[0.6, 0.4], [0.6, 0.4], [0.2, 0.8]])
    dynamic = np.array([[0.0, 1.0], [0.7, 0.3], [1.0, 0.0]])
    labels = [1, 0, 1]  # alpha2 must be > 0.2 for image 0 and < 0.6 for image 2: 0.3 is the first in the grid
    best = search_fusion_weights_on_test_labels({"text": text, "dynamic": dynamic}, labels)
    assert best == {"alpha2": 0.3, "alpha3": 0.0, "accuracy": 1.0}
    m = create_method("dmn")
    assert m.config.alpha2 == 1.0  # the default never reads labels
    with pytest.raises(MethodOptionError, match="record_components"):
        _setup(torch.eye(2)).components()


def test_presets_and_options():
    assert create_method("dmn").view_set().recipe == "crop_flip_dmn"
    assert create_method("dmn").view_set().n_views == 32
    assert create_method("dmn", preset="imagenet_r").view_set().recipe == "crop_flip_dmn"
    assert create_method("dmn", preset="Flower102").view_set().recipe == "augmix_dmn"
    assert create_method("dmn", preset="eurosat").config.training_schedule(8) == (1e-3, 100)
    assert create_method("dmn", preset="eurosat").config.training_schedule(4) == (1e-4, 100)
    assert create_method("dmn", preset="food101").config.training_schedule(16) == (1e-4, 100)
    assert create_method("dmn").config.training_schedule(1) == (1e-5, 100)
    assert create_method("dmn", train_lr=0.5, train_epochs=3).config.training_schedule(1) == (0.5, 3)
    with pytest.raises(MethodOptionError, match="keeps none"):
        create_method("dmn", n_views=5)
    with pytest.raises(MethodOptionError, match="memory_size"):
        create_method("dmn", memory_size=0)
    with pytest.raises(MethodOptionError, match="order"):
        create_method("dmn", order="sometimes")


def test_end_to_end_on_a_tiny_model(tiny_openclip, tmp_path):
    result = end_to_end(tiny_openclip, tmp_path, "dmn", n_views=10)
    np.testing.assert_allclose(result.probs.sum(1), 1.0, rtol=1e-5)
    assert 1 <= result.info["dmn_memory_entries"] <= 5


def test_cli_lists_every_option_with_its_default(capsys):
    check_cli_lists_options("dmn", capsys)


def test_cache_sized_blocks_give_the_bits_of_one_pass(monkeypatch):
    """The exact speed-up: pseudo-labels in blocks of images (common.blockwise) equal one pass."""
    import vlm_tta.methods.common as common

    views, classes, _ = synthetic_stream(24, 50, 16, 32, seed=3)
    m = _setup(classes, 100.0)
    monkeypatch.setattr(common, "BLOCK_ELEMENTS", 10**12)  # the straightforward computation: one block
    whole = m.pseudo_labels(views)
    monkeypatch.setattr(common, "BLOCK_ELEMENTS", 32 * 50 * 5)  # blocks of 5 images
    blocked = m.pseudo_labels(views)
    assert blocked.keys() == whole.keys() and all(torch.equal(blocked[k], whole[k]) for k in whole)


@pytest.mark.parametrize("order", ["write_first", "predict_first"])
def test_batched_read_equals_writing_and_reading_one_image_at_a_time(order):
    """The exact speed-up: all of a batch's writes first, then one read (each image sees each class's
    memory as it was at its turn) equals the loop write / read_dynamic per image, with replacements
    and classes written several times within a batch."""
    views, classes, _ = synthetic_stream(90, 5, 16, 10, seed=4)
    fast = _setup(classes, 100.0, n_views=10, memory_size=4, order=order)
    slow = _setup(classes, 100.0, n_views=10, memory_size=4, order=order)
    for batch in views.split(30):
        pl = fast.pseudo_labels(batch)
        labels, ents = pl["label"].tolist(), pl["entropy"].tolist()
        got = fast.write_and_read(batch[:, 0], labels, ents)
        slow.store.begin(batch[:, 0])
        expected = []
        for i, q in enumerate(batch[:, 0]):
            if order == "write_first":
                slow.write(q, labels[i], ents[i])
            expected.append(slow.read_dynamic(i, q))
            if order == "predict_first":
                slow.write(q, labels[i], ents[i])
        torch.testing.assert_close(got, torch.stack(expected), rtol=1e-6, atol=1e-5)
        assert torch.equal(got.argmax(-1), torch.stack(expected).argmax(-1))
    assert fast.count.tolist() == slow.count.tolist() == [4] * 5  # full memories: replacements happened
    assert torch.equal(fast.store.keys, slow.store.keys) and torch.equal(fast.gram, slow.gram)
