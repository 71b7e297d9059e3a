"""STS (vlm_tta/methods/sts.py): the spectral basis and its rank rules, the shifted prototypes, the
AdamW step, view selection, batching, errors, and end-to-end runs on the tiny backbones."""

import dataclasses
import math
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlm_tta
from vlm_tta.cache import EmbeddingCache
from vlm_tta.errors import FeatureError, MethodOptionError
from vlm_tta.features import FeatureStore, encoder_call_counter
from vlm_tta.methods import MethodContext, create_method, get_method_class
from vlm_tta.methods import sts as sts_mod
from vlm_tta.methods.common import entropy
from vlm_tta.methods.sts import (
    STSConfig,
    _Prototypes,
    cached_spectral_basis,
    energy_rank,
    gavish_donoho_omega,
    gavish_donoho_rank,
    shifted_cosines,
    spectral_basis,
    steer,
)

CLASSES = ["cat", "dog", "airplane", "apple", "truck"]


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _prototypes(c=20, d=32, seed=0, shared=2.0):
    """Prototypes with a common direction, as CLIP's text embeddings have."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(c, d, generator=g) + shared * torch.randn(d, generator=g), dim=-1)


def _low_rank_prototypes(c=20, d=32, rank=4, seed=0):
    """Prototypes near a (rank + 1)-dimensional subspace (shared direction + rank directions) plus noise."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(c, rank, generator=g) @ torch.randn(rank, d, generator=g)
    return F.normalize(2 * torch.randn(d, generator=g) + signal + 0.1 * torch.randn(c, d, generator=g), dim=-1)


def _direct_logits(views, z, basis, gamma, scale, bias=0.0):
    """The paper's formula, literally: logits of views against normalize(z_c + B gamma)."""
    shifted = F.normalize(z + (basis @ gamma), dim=-1)
    return scale * views @ shifted.T + bias


# ---------------------------------------------------------------------- rank rules
def test_omega_is_gavish_donohos_cubic():
    assert gavish_donoho_omega(1.0) == pytest.approx(2.858, abs=0.005)  # GD 2014: omega(1) = 2.858
    assert gavish_donoho_omega(0.5) == pytest.approx(0.56 / 8 - 0.95 / 4 + 1.82 / 2 + 1.43)
    with pytest.raises(ValueError):
        gavish_donoho_omega(0.0)


@pytest.mark.parametrize(
    "shape, rank", [((500, 256), 20), ((100, 512), 10), ((64, 64), 5), ((512, 100), 8), ((40, 300), 3)]
)
def test_gavish_donoho_recovers_the_rank_of_low_rank_plus_noise(shape, rank):
    m, n = shape
    g = torch.Generator().manual_seed(rank)
    u = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
    # noise entries of variance 1/max(m, n): the noise bulk ends near 1 + sqrt(beta) <= 2
    signal = torch.linspace(4.0, 8.0, rank, dtype=torch.float64)
    noise = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(max(m, n))
    x = u @ torch.diag(signal) @ v.T + noise
    k, threshold = gavish_donoho_rank(torch.linalg.svdvals(x), (m, n))
    assert k == rank
    assert 1.0 < threshold < 4.0
    # weak components (inside the noise bulk) are not counted
    weak = torch.linalg.qr(torch.randn(m, 3, generator=g, dtype=torch.float64))[0] @ (
        0.3 * torch.linalg.qr(torch.randn(n, 3, generator=g, dtype=torch.float64))[0].T
    )
    assert gavish_donoho_rank(torch.linalg.svdvals(x + weak), (m, n))[0] == rank


def test_gavish_donoho_median_averages_the_middle_pair():
    s = torch.tensor([10.0, 4.0, 2.0, 1.0])  # median 3, beta = 4 / 8
    k, threshold = gavish_donoho_rank(s, (4, 8))
    assert threshold == pytest.approx(3.0 * gavish_donoho_omega(0.5))  # 3 x 2.1275 = 6.38
    assert k == 1


def test_energy_rank_by_hand():
    s = torch.tensor([3.0, 2.0, 1.0])  # squared: 9, 4, 1 of 14 -> shares 0.643, 0.929, 1
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 9 / 14) == 1  # exactly reaching the share is enough
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 0.93) == 3
    assert energy_rank(s, 1.0) == 3


def test_basis_is_the_top_right_singular_vectors():
    z = _prototypes()
    b = spectral_basis(z, rank="fixed", k=4)
    _, s, vh = torch.linalg.svd(z.double(), full_matrices=False)
    assert b.k == 4 and b.basis.shape == (32, 4)
    np.testing.assert_allclose(b.basis.T @ b.basis, torch.eye(4), atol=1e-6)
    np.testing.assert_allclose((b.basis.double().T @ vh[:4].T).abs(), torch.eye(4, dtype=torch.float64), atol=1e-6)
    assert b.threshold is None and b.rule == "fixed"
    assert spectral_basis(z, rank="energy", energy=0.99).k == energy_rank(s, 0.99)


def test_uncentred_leading_direction_is_the_shared_one_and_centring_removes_it():
    d = 32
    common = F.normalize(torch.randn(d, generator=torch.Generator().manual_seed(3)), dim=0)
    z = F.normalize(4.0 * common + 0.5 * torch.randn(30, d, generator=torch.Generator().manual_seed(4)), dim=-1)
    mean = F.normalize(z.mean(0), dim=0)
    top = spectral_basis(z, rank="fixed", k=1).basis[:, 0]
    assert abs(float(top @ mean)) > 0.999
    top_centred = spectral_basis(z, rank="fixed", k=1, center=True).basis[:, 0]
    assert abs(float(top_centred @ mean)) < 0.1


def test_small_class_sets():
    d = 8
    one = spectral_basis(_unit(1, d))
    assert one.k == 0 and one.rule == "single_class"
    # two orthogonal prototypes: equal singular values, nothing clears omega x median -> the fallback
    two = spectral_basis(torch.eye(d)[:2])
    assert two.k == 1 and two.rule == "gavish_donoho+fallback"
    # centred, two classes span one direction: z1 - z0
    centred = spectral_basis(torch.eye(d)[:2], center=True)
    assert centred.k == 1
    diff = F.normalize(torch.eye(d)[1] - torch.eye(d)[0], dim=0)
    assert abs(float(centred.basis[:, 0] @ diff)) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(MethodOptionError, match="k=2 exceeds .* 1"):
        spectral_basis(torch.eye(d)[:2], rank="fixed", k=2, center=True)
    with pytest.raises(MethodOptionError, match="k <= 8"):
        spectral_basis(_unit(20, d), rank="fixed", k=9)


def test_one_class_gives_the_zero_shot_logits():
    views = _unit(3, 64, 8)
    z = _unit(1, 8, seed=1)
    sts = vlm_tta.classify_features(views, z, method="sts")
    zs = vlm_tta.classify_features(views, z, method="zeroshot")
    np.testing.assert_allclose(sts.logits, zs.logits, rtol=1e-6)


def test_two_classes_adapt():
    views, z = _unit(4, 64, 16), _unit(2, 16, seed=1)
    sts = vlm_tta.classify_features(views, z, method="sts", logit_scale=10.0)
    zs = vlm_tta.classify_features(views, z, method="zeroshot", logit_scale=10.0)
    assert not np.allclose(sts.logits, zs.logits)


def test_basis_is_memoised_by_the_prototypes_content(monkeypatch):
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real_svd(*a, **k))
    monkeypatch.setattr(sts_mod, "_MEMO", type(sts_mod._MEMO)())
    z = _prototypes(seed=11)
    first = cached_spectral_basis(z, rank="gavish_donoho", energy=0.9, k=None, center=False)
    again = cached_spectral_basis(z.clone(), rank="gavish_donoho", energy=0.9, k=None, center=False)
    assert again is first and len(calls) == 1
    cached_spectral_basis(z, rank="gavish_donoho", energy=0.9, k=None, center=True)  # another rule
    cached_spectral_basis(_prototypes(seed=12), rank="gavish_donoho", energy=0.9, k=None, center=False)
    assert len(calls) == 3
    # setup of a method on the same prototypes reads the memo
    create_method("sts").setup(MethodContext(z, 100.0))
    assert len(calls) == 3


# ---------------------------------------------------------------------- shifted prototypes
def test_shifted_cosines_equal_the_normalised_shifted_prototypes():
    z, views = _prototypes(), _unit(3, 5, 32, seed=2)
    basis = spectral_basis(z, rank="fixed", k=6).basis
    p = _Prototypes.build(z, basis)
    gamma = 0.3 * torch.randn(3, 6, generator=torch.Generator().manual_seed(5))
    fast = shifted_cosines(views @ z.T, views @ basis, gamma, p)
    direct = torch.stack([_direct_logits(views[i], z, basis, gamma[i], 1.0) for i in range(3)])
    np.testing.assert_allclose(fast, direct, atol=1e-6)
    # gamma = 0: the unshifted cosines
    np.testing.assert_allclose(
        shifted_cosines(views @ z.T, views @ basis, torch.zeros(3, 6), p), views @ z.T, atol=1e-6
    )


@pytest.mark.parametrize("options", [dict(steps=0), dict(lr=0.0)])
@pytest.mark.parametrize("bias", [None, -10.0])
def test_gamma_zero_reproduces_zero_shot(options, bias):
    views, z = _unit(6, 64, 32), _prototypes()
    sts = vlm_tta.classify_features(views, z, method="sts", logit_bias=bias, **options)
    zs = vlm_tta.classify_features(views, z, method="zeroshot", logit_bias=bias)
    np.testing.assert_allclose(sts.logits, zs.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sts.scores, zs.scores, rtol=1e-5)


# ---------------------------------------------------------------------- the AdamW step
def test_first_step_by_hand_two_classes():
    """Z = (e1, e2), B = I, one kept view x = (0.8, 0.6). At gamma = 0, d cos(x, z0')/d gamma =
    x - (x.z0) z0 = (0, 0.6) and d cos(x, z1')/d gamma = (0.8, 0); with p0 > p1 the entropy falls as
    l0 - l1 grows, so grad H = a (-0.8, 0.6) with a > 0 and the Adam step is -lr sign(grad) = (-lr, +lr)."""
    z, basis = torch.eye(2), torch.eye(2)
    views = torch.tensor([0.8, 0.6]).expand(1, 10, 2).contiguous()  # 10 views, selection 0.1 keeps 1
    cfg = STSConfig(n_views=10, lr=5e-3)
    # scale 10: |grad| ~ 0.2 >> Adam's eps (at scale 100, p1 ~ 2e-9 and |grad| ~ eps damps the step)
    out = steer(views, _Prototypes.build(z, basis), 10.0, None, cfg)
    np.testing.assert_allclose(out.gamma[0], [-5e-3, 5e-3], rtol=1e-6)
    assert out.kept.shape == (1, 1)
    # the steered prediction is more confident in class 0 than zero-shot
    assert out.logits[0, 0] - out.logits[0, 1] > 10 * (0.8 - 0.6)


@pytest.mark.parametrize("bias", [None, -12.5])
def test_first_step_is_lr_times_sign_of_the_gradient(bias):
    z, views = _prototypes(c=12, d=16, seed=3), _unit(2, 20, 16, seed=4)
    basis = spectral_basis(z, rank="fixed", k=5).basis
    cfg = STSConfig(n_views=20, selection_p=0.25, lr=5e-3, weight_decay=0.3)
    out = steer(views, _Prototypes.build(z, basis), 50.0, bias, cfg)
    for i in range(2):  # the gradient of the literal formula, in float64, on the kept views
        gamma = torch.zeros(5, dtype=torch.float64, requires_grad=True)
        logits = _direct_logits(views[i, out.kept[i]].double(), z.double(), basis.double(), gamma, 50.0, bias or 0.0)
        p_bar = logits.softmax(-1).mean(0)
        (-(p_bar * p_bar.log()).sum()).backward()
        g = gamma.grad
        assert (g.abs() > 1e-6).all()
        expected = -5e-3 * g / (g.abs() + 1e-8)  # Adam's first step: m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps)
        np.testing.assert_allclose(out.gamma[i].double(), expected, rtol=1e-5)


def test_regulariser_and_weight_decay_are_inert_for_one_step_but_not_for_two():
    views, z = _unit(5, 64, 32), _prototypes()
    run = lambda **o: vlm_tta.classify_features(views, z, method="sts", rank="fixed", k=6, **o).logits  # noqa: E731
    base = run()
    for options in (dict(reg_weight=10.0), dict(reg_weight=10.0, reg_norm="squared"), dict(weight_decay=0.5)):
        np.testing.assert_array_equal(run(**options), base)
    two = run(steps=2)
    assert not np.allclose(run(steps=2, reg_weight=10.0), two)
    assert not np.allclose(run(steps=2, reg_weight=10.0, reg_norm="squared"), two)
    assert not np.allclose(two, base)


@pytest.mark.parametrize("steps, bias", [(1, None), (3, -10.0)])
def test_matches_a_literal_one_image_at_a_time_implementation(steps, bias):
    views, z = _unit(4, 64, 32, seed=6), _low_rank_prototypes(seed=7)
    method = create_method("sts", steps=steps)
    method.setup(MethodContext(z, 30.0, bias))
    basis, b = method.spectrum.basis, bias or 0.0
    assert method.spectrum.k == 5  # Gavish-Donoho finds the shared direction and the 4 others
    expected = []
    for x in views:  # the algorithm as written: select, then AdamW on normalize(z_c + B gamma)
        kept = torch.argsort(entropy(30.0 * x @ z.T + b), stable=True)[:6]
        gamma = torch.zeros(basis.shape[1], requires_grad=True)
        optimizer = torch.optim.AdamW([gamma], lr=5e-3)
        for _ in range(steps):
            p_bar = _direct_logits(x[kept], z, basis, gamma, 30.0, b).softmax(-1).mean(0)
            optimizer.zero_grad()
            (-(p_bar * p_bar.log()).sum()).backward()
            optimizer.step()
        expected.append(_direct_logits(x[0], z, basis, gamma.detach(), 30.0, b))
    got = torch.stack([p.logits for p in method.predict_batch(views)])
    np.testing.assert_allclose(got, torch.stack(expected), rtol=1e-5, atol=1e-4)
    assert not np.allclose(got, 30.0 * views[:, 0] @ z.T + b, atol=1e-3)  # it did adapt


# ---------------------------------------------------------------------- selection and prediction
@pytest.mark.parametrize("n_views, expected", [(64, 6), (30, 3), (10, 1)])
def test_keeps_the_lowest_entropy_views(n_views, expected):
    z = torch.eye(8)[:5]
    g = torch.Generator().manual_seed(n_views)
    views = F.normalize(torch.randn(1, n_views, 8, generator=g), dim=-1) * 0.1 + torch.eye(8)[5]  # off every class
    confident = torch.randperm(n_views, generator=g)[:expected]
    for rank, v in enumerate(confident):  # aligned with class 2, more and more tightly
        views[0, v] = torch.eye(8)[2] + 0.01 * rank * torch.eye(8)[6]
    views = F.normalize(views, dim=-1)
    out = steer(views, _Prototypes.build(z, spectral_basis(z).basis), 100.0, None, STSConfig(n_views=n_views))
    assert out.kept.shape == (1, expected)
    assert sorted(out.kept[0].tolist()) == sorted(confident.tolist())
    entropies = entropy(100.0 * views[0] @ z.T)
    assert entropies[out.kept[0]].max() < entropies[~torch.isin(torch.arange(n_views), out.kept[0])].min()


def test_kept_average_prediction_is_the_mean_probability_of_the_kept_views():
    views, z = _unit(4, 64, 32), _prototypes()
    res = vlm_tta.classify_features(views, z, method="sts", predict="kept_average", steps=0)
    zs = 100.0 * views @ z.T
    kept = torch.argsort(entropy(zs), dim=-1, stable=True)[:, :6]
    p_bar = torch.stack([zs[i, kept[i]].softmax(-1).mean(0) for i in range(4)])
    np.testing.assert_allclose(res.probs, p_bar, rtol=1e-5, atol=1e-7)
    adapted = vlm_tta.classify_features(views, z, method="sts", predict="kept_average")
    assert not np.allclose(adapted.probs, res.probs)


# ---------------------------------------------------------------------- batching
def test_batched_equals_one_image_at_a_time():
    views, z = _unit(7, 64, 32, seed=8), _prototypes(seed=9)
    method = create_method("sts", rank="fixed", k=8, steps=3)
    method.setup(MethodContext(z, 100.0, -5.0))
    batched = method.predict_batch(views)
    single = [method.predict_features(v) for v in views]
    for b, s in zip(batched, single):
        np.testing.assert_allclose(b.logits, s.logits, rtol=1e-5, atol=1e-5)
        assert b.index == s.index
    p = method._prototypes
    together = steer(views, p, 100.0, -5.0, method.config)
    alone = torch.cat([steer(v[None], p, 100.0, -5.0, method.config).gamma for v in views])
    np.testing.assert_allclose(together.gamma, alone, rtol=1e-4, atol=1e-6)  # 3 steps: |gamma| ~ 1.5e-2
    # internal chunking changes nothing either
    method.chunk_elements = 2 * 64 * 20
    np.testing.assert_allclose(
        torch.stack([q.logits for q in method.predict_batch(views)]),
        torch.stack([b.logits for b in batched]),
        rtol=1e-5,
        atol=1e-5,
    )


# ---------------------------------------------------------------------- options and errors
@pytest.mark.parametrize(
    "options, match",
    [
        (dict(rank="svd"), "rank must be one of"),
        (dict(rank="fixed"), "needs k"),
        (dict(k=4), "only with rank='fixed'"),
        (dict(energy=0.0), "energy"),
        (dict(n_views=5), "keeps none"),
        (dict(selection_p=1.5), "selection_p"),
        (dict(steps=-1), "steps"),
        (dict(lr=float("nan")), "lr"),
        (dict(reg_norm="l1"), "reg_norm"),
        (dict(reg_weight=-1.0), "reg_weight"),
        (dict(predict="mean"), "predict"),
        (dict(view_recipe="blur"), "view_recipe"),
        (dict(center="yes"), "center"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(MethodOptionError, match=match):
        create_method("sts", **options)


def test_config_types_resolve_for_the_cli():
    hints = typing.get_type_hints(STSConfig)
    assert {f.name for f in dataclasses.fields(STSConfig)} == set(hints)
    assert hints["k"] == (int | None) and hints["center"] is bool


def test_bad_features():
    method = create_method("sts")
    method.setup(MethodContext(_prototypes(), 100.0))
    views = _unit(2, 64, 32)
    views[1, 3, 0] = float("nan")
    with pytest.raises(FeatureError, match="NaN"):
        method.predict_batch(views)
    with pytest.raises(FeatureError, match="64 views"):
        method.predict_batch(_unit(2, 8, 32))
    with pytest.raises(FeatureError, match="64 views"):
        vlm_tta.classify_features(_unit(2, 8, 32), _prototypes(), method="sts")


def test_a_diverging_step_is_a_clear_error():
    views, z = _unit(2, 64, 32), _prototypes()
    with pytest.raises(FloatingPointError, match="lower lr"):
        vlm_tta.classify_features(views, z, method="sts", lr=1e30, steps=2)


def test_run_info_and_templates():
    method = create_method("sts")
    method.setup(MethodContext(_prototypes(), 100.0))
    info = method.run_info()
    assert info["sts_k"] == method.spectrum.k >= 1 and info["sts_rank_rule"] == "gavish_donoho"
    assert get_method_class("sts").default_templates is None
    assert get_method_class("sts_ensemble").default_templates == "clip7"
    assert get_method_class("sts-ensemble") is get_method_class("sts_ensemble")
    assert create_method("sts").view_set() == vlm_tta.views.ViewSet("crop_flip", 64, 0)


# ---------------------------------------------------------------------- end to end
def _images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("backend", ["tiny_openclip", "tiny_hf_clip", "tiny_hf_siglip"])
def test_classify_end_to_end(backend, request, tmp_path):
    model = request.getfixturevalue(backend)
    images = _images(2)
    calls = encoder_call_counter(model)
    res = vlm_tta.classify(images, CLASSES, method="sts", model=model, cache_dir=tmp_path)
    # the same as STS on the same view embeddings, through classify_features
    store = FeatureStore(model, EmbeddingCache(tmp_path))  # reads the views classify cached
    views = store.view_features(images, create_method("sts").view_set())
    classes = store.class_features(CLASSES)
    expected = vlm_tta.classify_features(
        views, classes, method="sts", logit_scale=model.logit_scale, logit_bias=model.logit_bias
    )
    np.testing.assert_allclose(res.logits, expected.logits, rtol=1e-4, atol=1e-4)
    assert res.info["sts_k"] >= 1 and res.info["templates"] == "single"
    # steps=0 is zero-shot, bias included
    zs = vlm_tta.classify(images, CLASSES, model=model, cache_dir=tmp_path)
    none = vlm_tta.classify(images, CLASSES, method="sts", steps=0, model=model, cache_dir=tmp_path)
    np.testing.assert_allclose(none.logits, zs.logits, rtol=1e-4, atol=1e-4)
    # a second run reads every view embedding from the cache
    before = calls()["images"]
    again = vlm_tta.classify(images, CLASSES, method="sts", model=model, cache_dir=tmp_path)
    assert calls()["images"] == before
    np.testing.assert_array_equal(again.logits, res.logits)


def test_sts_ensemble_end_to_end(tiny_openclip, tmp_path):
    images = _images(2)
    scale = dict(logit_scale=tiny_openclip.logit_scale, n_views=16)
    # templates=None: classify takes the method's default_templates, CLIP's 7 templates
    res = vlm_tta.classify(images, CLASSES, method="sts_ensemble", model=tiny_openclip, cache_dir=tmp_path, n_views=16)
    assert res.info["templates"] == "clip7"
    explicit = vlm_tta.classify(
        images, CLASSES, method="sts_ensemble", templates="clip7", model=tiny_openclip, cache_dir=tmp_path, n_views=16
    )
    np.testing.assert_array_equal(res.logits, explicit.logits)
    store = FeatureStore(tiny_openclip, EmbeddingCache(tmp_path))
    views = store.view_features(images, create_method("sts_ensemble", n_views=16).view_set())
    expected = vlm_tta.classify_features(views, store.class_features(CLASSES, "clip7"), method="sts_ensemble", **scale)
    np.testing.assert_allclose(res.logits, expected.logits, rtol=1e-4, atol=1e-4)
    single = vlm_tta.classify_features(views, store.class_features(CLASSES), method="sts", **scale)
    assert not np.allclose(res.logits, single.logits)


def test_view_selection_in_cache_sized_blocks_gives_the_bits_of_one_pass(monkeypatch):
    """The exact speed-up: the confident-view selection in blocks of images (common.blockwise)."""
    import vlm_tta.methods.common as common

    z = _prototypes(c=50, d=32)
    views = _unit(12, 64, 32, seed=3)
    m = create_method("sts", steps=2)
    m.setup(MethodContext(z, 100.0))
    monkeypatch.setattr(common, "BLOCK_ELEMENTS", 10**12)  # the straightforward computation: one block
    whole = torch.stack([p.logits for p in m.predict_batch(views)])
    monkeypatch.setattr(common, "BLOCK_ELEMENTS", 64 * 50 * 5)  # blocks of 5 images
    blocked = torch.stack([p.logits for p in m.predict_batch(views)])
    assert torch.equal(blocked, whole)
