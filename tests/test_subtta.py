"""SubTTA: subspace maths and base losses on hand-made cases, the adapted parameters and their
restoration, one batch against a direct computation, errors, and classify end to end."""

import copy
import math
import warnings

import numpy as np
import pytest
import tiny_models
import torch
import torch.nn.functional as F
from PIL import Image

import vlm_tta
from vlm_tta.errors import ClassNamesError, MethodOptionError, ModelSpecError
from vlm_tta.features import FeatureStore, Sample, encoder_call_counter
from vlm_tta.methods import MethodContext, create_method
from vlm_tta.methods import subtta as st
from vlm_tta.views import ViewSet

# 40 classes in the tiny models' D = 32: the text covariance, where the running covariance starts, is
# full rank, so the covariance's singular values are distinct and the SVD's gradient is defined. (With
# B + C - 2 < D, repeated tail singular values can make it NaN and the step is skipped, as in the
# reference, depending on the LAPACK build: no test should depend on that.)
CLASSES = [
    f"{adj} {name}" for adj in ("small", "blurry", "bad", "origami", "sketch") for name in tiny_models.CLASSNAMES
]
RANK = 8


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)) for _ in range(n)]


def _orthonormal(k, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=torch.float64)).Q.T  # k x dim


# ---------------------------------------------------------------------- private backbones
# SubTTA changes the weights during a stream: never run it on the session fixtures.
@pytest.fixture(scope="module")
def own_openclip():
    return tiny_models.build_tiny_openclip(seed=0)


@pytest.fixture(scope="module")
def own_hf_clip(tiny_hf_clip_dir):
    return vlm_tta.load_model(f"hf:{tiny_hf_clip_dir}", device="cpu")


@pytest.fixture(scope="module")
def own_hf_siglip(tiny_hf_siglip_dir):
    return vlm_tta.load_model(f"hf:{tiny_hf_siglip_dir}", device="cpu")


@pytest.fixture(params=["own_openclip", "own_hf_clip", "own_hf_siglip"])
def own_model(request):
    return request.getfixturevalue(request.param)


def _setup(model, classes=CLASSES, **options):
    store = FeatureStore(model)
    method = create_method("subtta", **{"rank": RANK, **options})
    cf = store.class_features(classes)
    method.setup(MethodContext(cf, model.logit_scale, model.logit_bias, classes, model, store))
    return method, store


def _state(model):
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def _pixels(samples):
    return torch.cat([s.views(ViewSet("original", 1)) for s in samples])


# ---------------------------------------------------------------------- subspace maths
def test_chordal_distance_is_zero_for_one_subspace_and_sqrt_k_for_orthogonal_ones():
    k, dim = 3, 8
    basis = _orthonormal(2 * k, dim)
    a, b = basis[:k], basis[k:]
    rotation = _orthonormal(k, k, seed=1)  # another orthonormal basis of the same span
    assert st.chordal_distance(a, a).item() == pytest.approx(0, abs=1e-6)
    assert st.chordal_distance(a, rotation @ a).item() == pytest.approx(0, abs=1e-6)
    assert st.chordal_distance(a, b).item() == pytest.approx(math.sqrt(k), abs=1e-12)
    # one shared direction out of three: d^2 = k - 1
    assert st.chordal_distance(a, torch.cat([a[:1], b[1:]])).item() == pytest.approx(math.sqrt(2), abs=1e-12)
    # the loss is -||U_V U_T'||^2 / (k (1 - alpha)): -1/(1 - alpha) when aligned, 0 when orthogonal
    assert st.alignment_loss(a, a, k, 0.5).item() == pytest.approx(-2.0)
    assert st.alignment_loss(a, b, k, 0.5).item() == pytest.approx(0.0, abs=1e-12)


def test_running_covariance_update_on_a_hand_made_batch():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]], dtype=torch.float64)
    # centred rows (-1,-1), (1,-1), (0,2): X~'X~ = diag(2, 6), over B - 1 (+1e-6) = 2
    batch = st.batch_covariance(x)
    expected = torch.diag(torch.tensor([2.0, 6.0], dtype=torch.float64)) / (2 + 1e-6) + 1e-6 * torch.eye(2)
    torch.testing.assert_close(batch, expected)
    running = torch.eye(2, dtype=torch.float64)
    updated = st.update_covariance(running, x, 0.25)
    torch.testing.assert_close(updated, 0.25 * running + 0.75 * expected)
    np.testing.assert_allclose(updated.numpy(), [[1.0, 0.0], [0.0, 2.5]], atol=1e-5)


def test_text_basis_drops_the_first_principal_component():
    # Four class embeddings around a mean whose spread lies along e0 (largest), e1, e2 (smallest).
    dim = 6
    mean = torch.full((dim,), 0.3, dtype=torch.float64)
    coeff = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    text = mean + (coeff * torch.tensor([3.0, 2.0, 1.0])).double() @ torch.eye(3, dim, dtype=torch.float64)
    centred = text - text.mean(0)
    sub = st.text_subspace(text, rank=2, remove_first_pc=True)
    assert sub.rank == 2 and sub.basis.shape == (2, dim) and sub.null_directions == 0
    torch.testing.assert_close(sub.basis.T @ sub.basis, torch.diag(torch.tensor([0.0, 1, 1, 0, 0, 0]).double()))
    torch.testing.assert_close(sub.covariance, centred.T @ centred / (3 + 1e-6))
    torch.testing.assert_close(sub.mean, text.mean(0))
    keep = st.text_subspace(text, rank=2, remove_first_pc=False)
    torch.testing.assert_close(keep.basis.T @ keep.basis, torch.diag(torch.tensor([1.0, 1, 0, 0, 0, 0]).double()))


def test_reference_rank_cap_takes_directions_outside_the_text_span():
    # C = 4 centred embeddings span 3 directions; dropping the first leaves 2 real ones, but the
    # reference's k = min(C - 1, rank) = 3 also takes a null-space direction.
    text = torch.randn(4, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    centred = text - text.mean(0)
    ref = st.text_subspace(text, rank=256)
    assert ref.rank == 3 and ref.basis.shape[0] == 3 and ref.null_directions == 1
    assert (centred @ ref.basis[-1]).abs().max() < 1e-10  # the last row is orthogonal to every class
    fixed = st.text_subspace(text, rank=256, within_span=True)
    assert fixed.rank == 2 and fixed.null_directions == 0
    torch.testing.assert_close(fixed.basis, ref.basis[:2])
    assert st.text_subspace(text, rank=256, remove_first_pc=False).rank == 4  # min(C, rank), as the reference
    assert st.text_subspace(text, rank=1).rank == 1
    with pytest.raises(ClassNamesError, match="at least 2 classes"):
        st.text_subspace(text[:1], rank=4)
    with pytest.raises(MethodOptionError, match="remove_first_pc"):
        st.text_subspace(text[:2], rank=4, within_span=True)


# ---------------------------------------------------------------------- base losses
def test_mint_loss_is_intra_minus_total_variance():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    # class means (2, 0) and (0, 3): every squared distance is 1; batch mean (1, 1.5): 2.25, 6.25, 1.25, 7.25
    assert st.mint_loss(x, torch.tensor([0, 0, 1, 1])).item() == pytest.approx(1.0 - 4.25)
    assert st.mint_loss(x, torch.tensor([7, 7, 2, 2])).item() == pytest.approx(1.0 - 4.25)  # any label values
    assert st.mint_loss(x, torch.tensor([3, 3, 3, 3])) is None  # one pseudo-class: no loss
    assert st.mint_loss(x[:1], torch.tensor([0])) is None


def test_batclip_loss_is_the_mean_cosine_between_class_means():
    x = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 3.0]])
    # means (3, 0), (0, 1), (2, 2): cosines 0, 1/sqrt2, 1/sqrt2
    assert st.batclip_loss(x, torch.tensor([0, 0, 1, 2, 2])).item() == pytest.approx(math.sqrt(2) / 3)
    assert st.batclip_loss(x[:3], torch.tensor([5, 5, 9])).item() == pytest.approx(0.0, abs=1e-7)
    assert st.batclip_loss(x, torch.zeros(5, dtype=torch.long)) is None


def test_tent_loss_over_features_and_over_classes():
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # softmax(ln3 * x) = (1/2, 1/6, 1/6, 1/6): entropy ln(12)/2; the zero row: ln 4
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # entropies ln 2 and H(3/4, 1/4)
    feats = st.tent_loss(x, logits, math.log(3.0), "features").item()
    assert feats == pytest.approx((math.log(12) / 2 + math.log(4)) / 2, rel=1e-6)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert st.tent_loss(x, logits, math.log(3.0), "classes").item() == pytest.approx((math.log(2) + h) / 2, rel=1e-6)


# ---------------------------------------------------------------------- options and presets
def test_presets_and_options():
    cfg = create_method("subtta").config
    assert (cfg.adapt_batch_size, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.rank, cfg.cov_momentum, cfg.loss) == (
        64,
        "adamw",
        5e-4,
        0.01,
        256,
        0.5,
        "mint",
    )
    c10 = create_method("subtta", preset="cifar10_c").config
    assert (c10.adapt_batch_size, c10.optimizer, c10.lr, c10.cov_momentum, c10.ent_scale) == (
        200,
        "adamw",
        1e-3,
        0.1,
        0.05,
    )
    c100 = create_method("subtta", preset="cifar100_c", lr=1e-4).config
    assert (c100.optimizer, c100.rank, c100.lr) == ("adam", 64, 1e-4)  # an explicit option beats the preset
    assert create_method("subtta", adapt_batch_size=8).stream_batch_size() == 8
    with pytest.raises(MethodOptionError, match="unknown SubTTA preset"):
        create_method("subtta", preset="mnist")
    for bad in (
        dict(adapt_batch_size=1),
        dict(loss="ent"),
        dict(optimizer="sgd"),
        dict(cov_momentum=1.0),
        dict(tent_over="dims"),
        dict(projection="centred"),
        dict(rank=0),
    ):
        with pytest.raises(MethodOptionError, match=next(iter(bad))):
            create_method("subtta", **bad)


# ---------------------------------------------------------------------- the backbone
def test_only_the_image_encoders_norm_affine_parameters_are_adapted(own_openclip, own_hf_clip):
    names = [n for n, _ in st.norm_parameters(st.image_tower(own_openclip))]
    expected = ["ln_pre"] + [f"transformer.resblocks.{i}.ln_{j}" for i in range(2) for j in (1, 2)] + ["ln_post"]
    assert names == [f"{m}.{p}" for m in expected for p in ("weight", "bias")]
    hf = [n for n, _ in st.norm_parameters(st.image_tower(own_hf_clip))]
    assert len(hf) == 12 and all("norm" in n for n in hf) and not any("text" in n for n in hf)


def _unchanged(model, before, flags):
    return (
        all(torch.equal(v, before[k]) for k, v in _state(model).items())
        and {n: p.requires_grad for n, p in model.model.named_parameters()} == flags
        and all(p.grad is None for p in model.model.parameters())
    )


def test_adaptation_changes_only_norm_parameters_and_the_model_is_the_users_between_batches(own_model, monkeypatch):
    model = own_model
    before, fingerprint = _state(model), model.fingerprint
    flags = {n: p.requires_grad for n, p in model.model.named_parameters()}
    method, store = _setup(model, adapt_batch_size=4, lr=1e-2)
    tower_prefix = "visual." if hasattr(model.model, "visual") else "vision_model."
    adapted = {f"{tower_prefix}{n}" for n, _ in st.norm_parameters(st.image_tower(model))}
    # the weights the prediction pass (the one without gradients) runs with
    seen, real = [], model._encode_images

    def spy(pixels):
        if not torch.is_grad_enabled():
            seen.append(_state(model))
        return real(pixels)

    monkeypatch.setattr(model, "_encode_images", spy)
    samples = [Sample(i, img, store) for i, img in enumerate(_images(8))]
    cov0 = method._covariance.clone()
    method.predict_samples(samples[:4])
    assert _unchanged(model, before, flags)  # between two batches the model is the user's own
    method.predict_samples(samples[4:])
    changed = {k for k, v in seen[-1].items() if not torch.equal(v, before[k])}
    assert changed and changed <= adapted  # something changed, and only LayerNorm weights/biases
    assert _unchanged(model, before, flags)
    assert not torch.equal(method._covariance, cov0) and method._optimizer.state

    cov = method._covariance.clone()
    method.reset()  # weights and optimizer back; the covariance carries over (the reference's reset)
    assert all(torch.equal(a, o) for a, o in zip(method._adapted, method._originals))
    assert not method._optimizer.state and torch.equal(method._covariance, cov)

    method.predict_samples(samples[:4])
    method.finish()
    method.finish()  # idempotent
    assert _unchanged(model, before, flags)
    assert model.refresh_fingerprint() == fingerprint


def test_an_error_inside_a_batch_gives_the_model_back(own_openclip, monkeypatch):
    before = _state(own_openclip)
    flags = {n: p.requires_grad for n, p in own_openclip.model.named_parameters()}

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(st, "mint_loss", broken)  # after the alignment step has changed the weights
    with pytest.raises(RuntimeError, match="boom"):
        vlm_tta.classify(_images(4), CLASSES, method="subtta", model=own_openclip, cache=False, adapt_batch_size=4)
    assert _unchanged(own_openclip, before, flags)


def test_reset_covariance_option_restarts_from_the_text_covariance(own_openclip):
    method, store = _setup(own_openclip, adapt_batch_size=4, reset_covariance=True)
    try:
        text_cov = method._text.covariance
        assert torch.equal(method._covariance, text_cov)
        method.predict_samples([Sample(i, img, store) for i, img in enumerate(_images(4))])
        assert not torch.equal(method._covariance, text_cov)
        method.reset()
        assert torch.equal(method._covariance, text_cov)
    finally:
        method.finish()


def _direct_source_stream(model, classes, batches, lr, rank, alpha=0.5, wd=0.01):
    """SubTTA with loss='source', written out for this test on a deep copy of the backbone: the
    alignment step on every batch (the previous gradient kept at 2**-16 of its size), then the logits."""
    net = copy.deepcopy(model.model)
    params = [p for m in net.visual.modules() if isinstance(m, torch.nn.LayerNorm) for p in (m.weight, m.bias)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=wd)
    text = model.class_embeddings(classes)
    centred = text - text.mean(0)
    cov = centred.T @ centred / (len(text) - 1 + 1e-6)
    k = min(len(text) - 1, rank)
    u_t = torch.linalg.svd(centred, full_matrices=False).Vh[1 : 1 + k]
    out = []
    for pixels in batches:
        x = net.encode_image(pixels)
        xc = x - x.mean(0)
        cov = alpha * cov.detach() + (1 - alpha) * (xc.T @ xc / (len(x) - 1 + 1e-6) + 1e-6 * torch.eye(x.shape[1]))
        u_v = torch.linalg.svd(cov).Vh[1 : 1 + k]
        for p in params:
            if p.grad is not None:
                p.grad /= 2.0**16
        (-(u_v @ u_t.T).pow(2).sum() / (k * (1 - alpha))).backward()
        opt.step()
        with torch.no_grad():
            out.append(model.logit_scale * F.normalize(net.encode_image(pixels), dim=-1) @ text.T)
    return torch.cat(out)


def test_alignment_steps_equal_a_direct_computation(own_openclip):
    method, store = _setup(own_openclip, adapt_batch_size=4, loss="source", lr=0.05)
    samples = [Sample(i, img, store) for i, img in enumerate(_images(8, seed=3))]
    try:
        ours = torch.stack([p.logits for b in (samples[:4], samples[4:]) for p in method.predict_samples(b)])
    finally:
        method.finish()
    direct = _direct_source_stream(
        own_openclip, CLASSES, [_pixels(samples[:4]), _pixels(samples[4:])], lr=0.05, rank=RANK
    )
    zero_shot = own_openclip.logits(
        own_openclip.encode_images(_pixels(samples)), own_openclip.class_embeddings(CLASSES)
    )
    assert (ours - zero_shot).abs().max() > 1e-3  # the steps did something
    torch.testing.assert_close(ours, direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("zero_grad", [False, True])
def test_alignment_step_carries_the_previous_gradient_at_2_to_the_minus_16(own_openclip, monkeypatch, zero_grad):
    method, store = _setup(own_openclip, adapt_batch_size=4, loss="source", zero_grad_before_align=zero_grad)
    samples = [Sample(i, img, store) for i, img in enumerate(_images(8))]
    try:
        method.predict_samples(samples[:4])
        previous = [g.clone() for g in method._grads]
        real = st.alignment_loss
        monkeypatch.setattr(st, "alignment_loss", lambda *a: real(*a) * 0.0)  # this batch adds a zero gradient
        seen = []
        method._optimizer.step = lambda: seen.append([p.grad.clone() for p in method._params])
        method.predict_samples(samples[4:])
    finally:
        method.finish()
    assert any(g.abs().max() > 0 for g in previous)
    for got, prev in zip(seen[0], previous):
        torch.testing.assert_close(got, torch.zeros_like(prev) if zero_grad else prev / 2**16, rtol=0, atol=0)


def test_base_step_follows_the_alignment_step_and_uses_three_forward_passes(own_openclip):
    samples_of = lambda store: [Sample(i, img, store) for i, img in enumerate(_images(5, seed=4))]  # noqa: E731
    calls = encoder_call_counter(own_openclip)
    counts, outputs = {}, {}
    for loss in ("source", "tent"):
        method, store = _setup(own_openclip, adapt_batch_size=4, loss=loss, lr=0.05)
        samples = samples_of(store)
        start = calls()["images"]
        with pytest.warns(RuntimeWarning, match="batch of 1 image"):
            outputs[loss] = [p.logits for b in (samples[:4], samples[4:]) for p in method.predict_samples(b)]
        counts[loss] = calls()["images"] - start
        method.finish()
    # source: align + predict; tent: align + base + predict; the single-image batch: predict only
    assert counts == {"source": 2 + 1, "tent": 3 + 1}
    assert not torch.allclose(torch.stack(outputs["source"]), torch.stack(outputs["tent"]))


def test_single_image_batch_is_predicted_with_the_current_weights_without_an_update(own_openclip):
    method, store = _setup(own_openclip, adapt_batch_size=4, lr=0.05)
    samples = [Sample(i, img, store) for i, img in enumerate(_images(5, seed=5))]
    try:
        method.predict_samples(samples[:4])
        adapted, cov = [w.clone() for w in method._adapted], method._covariance.clone()
        assert not all(torch.equal(a, o) for a, o in zip(adapted, method._originals))
        with method._adapted_backbone(), torch.no_grad():  # the adapted model, as a plain forward
            expected = own_openclip.logits(
                F.normalize(own_openclip.model.encode_image(_pixels(samples[4:])), dim=-1),
                method.ctx.class_features,
            )
        with pytest.warns(RuntimeWarning, match="batch of 1 image"):
            (pred,) = method.predict_samples(samples[4:])
        assert all(torch.equal(a, b) for a, b in zip(method._adapted, adapted))
        assert torch.equal(method._covariance, cov)
        torch.testing.assert_close(pred.logits, expected[0])
        assert pred.score == pytest.approx(float(expected[0].softmax(-1).max()))
    finally:
        method.finish()


def _skipped_warnings(run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if "was skipped" in str(w.message)]


def test_non_finite_loss_skips_the_update_with_one_warning(own_openclip, monkeypatch):
    real = st.alignment_loss
    monkeypatch.setattr(st, "alignment_loss", lambda *a: real(*a) * float("nan"))
    method, store = _setup(own_openclip, adapt_batch_size=4, loss="source")
    samples = [Sample(i, img, store) for i, img in enumerate(_images(8))]
    messages = _skipped_warnings(lambda: [method.predict_samples(samples[:4]), method.predict_samples(samples[4:])])
    assert all(torch.equal(a, o) for a, o in zip(method._adapted, method._originals))  # no step was taken
    assert len(messages) == 1 and "loss is not finite in the alignment step at batch 1" in messages[0]
    method.finish()
    assert method.run_info()["subtta_skipped_steps"] == {"alignment": 2}


def test_non_finite_embeddings_skip_both_steps_and_keep_the_covariance(own_openclip, monkeypatch):
    method, store = _setup(own_openclip, adapt_batch_size=4, loss="tent")
    samples = [Sample(i, img, store) for i, img in enumerate(_images(4))]
    cov = method._covariance.clone()
    real = own_openclip._encode_images
    # NaN embeddings whenever gradients are on (the two adaptation passes), finite for the prediction
    monkeypatch.setattr(
        own_openclip, "_encode_images", lambda x: real(x) * (float("nan") if torch.is_grad_enabled() else 1.0)
    )
    try:
        messages = _skipped_warnings(lambda: method.predict_samples(samples))
        assert all(torch.equal(a, o) for a, o in zip(method._adapted, method._originals))
    finally:
        method.finish()
    assert torch.equal(method._covariance, cov)
    assert len(messages) == 2 and "embeddings are not finite in the alignment step" in messages[0]
    assert method.run_info()["subtta_skipped_steps"] == {"alignment": 1, "base loss (tent)": 1}


def test_a_model_without_norm_parameters_is_refused_untouched(own_openclip):
    model = copy.deepcopy(own_openclip)
    for module in list(model.model.visual.modules()):
        for child, sub in list(module.named_children()):
            if isinstance(sub, torch.nn.LayerNorm):
                setattr(module, child, torch.nn.Identity())
    flags = [p.requires_grad for p in model.model.parameters()]
    with pytest.raises(ModelSpecError, match="has none"):
        _setup(model)
    assert [p.requires_grad for p in model.model.parameters()] == flags

    class NoTower:
        model = torch.nn.Linear(2, 2)

    with pytest.raises(ModelSpecError, match="vision_model"):
        st.image_tower(NoTower())


def test_run_info_counts_the_reference_rank_null_directions(own_openclip):
    method, _ = _setup(own_openclip, classes=["cat", "dog", "bird"])
    method.finish()
    assert (method.run_info()["subtta_rank"], method.run_info()["subtta_text_null_directions"]) == (2, 1)
    method, _ = _setup(own_openclip, classes=["cat", "dog", "bird"], rank_within_text_span=True)
    method.finish()
    assert (method.run_info()["subtta_rank"], method.run_info()["subtta_text_null_directions"]) == (1, 0)


# ---------------------------------------------------------------------- classify end to end
def test_classify_end_to_end_leaves_the_model_unchanged(own_model, tmp_path):
    model = own_model
    imgs = _images(6, seed=7)
    before, fingerprint = _state(model), model.fingerprint
    zero_shot = vlm_tta.classify(imgs, CLASSES, model=model, cache_dir=tmp_path)
    res = vlm_tta.classify(imgs, CLASSES, method="subtta", model=model, cache_dir=tmp_path, adapt_batch_size=4, lr=0.05)
    assert res.logits.shape == (6, len(CLASSES)) and res.method == "subtta"
    assert np.abs(res.logits - zero_shot.logits).max() > 1e-4  # it adapted
    assert res.info["subtta_batches"] == 2 and res.info["subtta_adapted_parameters"] > 0
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())
    assert model.refresh_fingerprint() == fingerprint
    assert all(not p.requires_grad and p.grad is None for p in model.model.parameters())
    # the shared cache still holds the original weights' embeddings: zero-shot reads them back unchanged
    calls = encoder_call_counter(model)
    again = vlm_tta.classify(imgs, CLASSES, model=model, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.logits, zero_shot.logits)
    assert calls()["images"] == 0


def test_results_do_not_depend_on_classify_batch_size(own_openclip):
    imgs = _images(10, seed=8)
    options = dict(method="subtta", model=own_openclip, cache=False, adapt_batch_size=4, lr=0.05)
    results = [vlm_tta.classify(imgs, CLASSES, batch_size=bs, **options) for bs in (3, 64)]
    assert results[0].info["subtta_batches"] == 3  # 4 + 4 + 2 images
    np.testing.assert_array_equal(results[0].logits, results[1].logits)


def test_requires_grad_flags_the_user_set_are_restored(own_openclip):
    text_param = own_openclip.model.token_embedding.weight
    ln = own_openclip.model.visual.ln_post.weight
    text_param.requires_grad_(True)
    try:
        vlm_tta.classify(_images(4), CLASSES, method="subtta", model=own_openclip, cache=False, adapt_batch_size=4)
        assert text_param.requires_grad and text_param.grad is None and not ln.requires_grad
    finally:
        text_param.requires_grad_(False)


def test_given_view_tensors_are_adapted_on_like_images(own_openclip):
    imgs = _images(6, seed=9)
    views = torch.stack([own_openclip.preprocess(img) for img in imgs])[:, None]  # N x 1 x 3 x H x W
    options = dict(method="subtta", model=own_openclip, cache=False, adapt_batch_size=3, rank=RANK, lr=0.05)
    from_images = vlm_tta.classify(imgs, CLASSES, **options)
    from_views = vlm_tta.classify(views, CLASSES, **options)
    np.testing.assert_array_equal(from_views.logits, from_images.logits)


def test_one_pass_with_a_feature_level_method_leaves_its_embeddings_alone(own_openclip, tmp_path):
    from vlm_tta.cache import EmbeddingCache
    from vlm_tta.engine import run_stream

    imgs = _images(8, seed=10)
    alone = vlm_tta.classify(imgs, CLASSES, model=own_openclip, cache=False)
    store = FeatureStore(own_openclip, EmbeddingCache(tmp_path))
    ctx = MethodContext(store.class_features(CLASSES), own_openclip.logit_scale, None, CLASSES, own_openclip, store)
    subtta = create_method("subtta", adapt_batch_size=4, rank=RANK, lr=0.05)
    adapted, zero_shot = run_stream(
        [(subtta, ctx), (create_method("zeroshot"), ctx)], store, imgs, ["x"] * 8, batch_size=4
    )
    # the second chunk's embeddings were encoded after SubTTA's first batch, with the user's weights
    np.testing.assert_allclose(torch.stack([p.logits for p in zero_shot.predictions]).numpy(), alone.logits, atol=1e-5)
    assert subtta.run_info()["subtta_batches"] == 2
