"""AdaND (ZS-NTTA): Otsu's threshold, the switch-over, the detector's training windows and Adam step,
pre-update decisions, injected noise, batch independence, errors, and one run on a tiny model."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlm_tta
from vlm_tta.benchmark.metrics import otsu_noisy_flags
from vlm_tta.cache import EmbeddingCache
from vlm_tta.errors import FeatureError, MethodOptionError
from vlm_tta.features import FeatureStore, encoder_call_counter
from vlm_tta.methods import MethodContext, create_method
from vlm_tta.methods.adand import AdaND, _interleave, noise_image
from vlm_tta.methods.common import OTSU_GRID, OtsuQueue, otsu_threshold

D, C = 16, 5


def _stream(n, seed=0):
    """Raw embeddings with a shared direction, as CLIP's are (zero-shot scores spread over (0, 1) at
    logit scale 100): about half near a class embedding, half random."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(D, generator=g)
    cls = F.normalize(3 * shared + torch.randn(C, D, generator=g), dim=-1)
    y = torch.randint(0, C, (n,), generator=g)
    clean = torch.rand(n, generator=g) < 0.5
    own = torch.where(clean[:, None], cls[y] * 3, torch.randn(n, D, generator=g) * 1.5)
    return 3 * shared + own + 0.8 * torch.randn(n, D, generator=g), cls


def _run(feats, cls, extras=None, store=None, calls=None, **options):
    options.setdefault("noise_rate", 0.0)
    method = AdaND(**options)
    method.setup(MethodContext(cls, 100.0, store=store, extras=extras or {}))
    chunks = [feats] if calls is None else list(feats.split(calls))
    preds = [p for chunk in chunks for p in method.predict_batch(chunk[:, None])]
    return method, preds


def _zs_ood(feats, cls, scale=100.0):
    return 1 - (scale * F.normalize(feats, dim=-1) @ cls.T).softmax(-1).max(-1).values


def _noisy(preds):
    return np.array([p.noisy for p in preds])


def _scores(preds):
    return torch.tensor([p.score for p in preds], dtype=torch.float32)


def _adam_first_step(detector, feats, noisy, lr=5e-4):
    """Parameters after one Adam step from ``detector`` on CE with labels clean = 1: p - lr g/(|g| + eps)."""
    det = copy.deepcopy(detector)
    F.cross_entropy(det(feats), (~noisy).long()).backward()
    return {k: (p - lr * p.grad / (p.grad.abs() + 1e-8)).detach() for k, p in det.named_parameters()}


def _initial_detector(seed=0):
    """What AdaND starts from: nn.Linear(D, 2) as created right after torch.manual_seed(seed)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.nn.Linear(D, 2)


# ---------------------------------------------------------------------- Otsu
def test_otsu_grid_is_the_references():
    np.testing.assert_array_equal(OTSU_GRID.numpy(), np.arange(0, 1, 0.01))


def test_otsu_on_a_bimodal_sample():
    # every threshold in (0.2, 0.8] gives the split {0.1, 0.1, 0.2} | {0.8, 0.9, 0.9}; the first is 0.21
    assert otsu_threshold([0.1, 0.1, 0.2, 0.8, 0.9, 0.9]) == pytest.approx(0.21)
    # [0, 0.3, 1]: {0} | {0.3, 1} scores 2/3 x var(0.3, 1) = 0.0817; {0, 0.3} | {1} scores 2/3 x 0.0225 = 0.015
    assert otsu_threshold(torch.tensor([0.0, 0.3, 1.0])) == pytest.approx(0.31)
    # a score equal to a grid value belongs to the upper group (s >= th)
    assert otsu_threshold([0.5, 0.5, 0.9, 0.9]) == pytest.approx(0.51)


def test_otsu_on_one_score_or_no_split():
    assert otsu_threshold([0.42]) == 0.0  # no threshold splits one score: the first grid value
    assert otsu_threshold([0.7, 0.7, 0.7]) == 0.0
    assert otsu_threshold([]) == 0.0
    assert otsu_threshold([0.42], no_split=math.inf) == math.inf
    assert otsu_threshold([0.505, 0.509], no_split=math.inf) == math.inf  # no grid point between them
    with pytest.raises(ValueError, match="NaN"):
        otsu_threshold([0.1, float("nan")])


def test_otsu_queue_keeps_the_last_scores():
    q = OtsuQueue(3)
    q.push(torch.tensor([0.9, 0.9], dtype=torch.float64))
    q.push(torch.tensor([0.1, 0.1], dtype=torch.float64))
    assert q.scores.tolist() == [0.9, 0.1, 0.1] and q.threshold() == pytest.approx(0.11)
    assert OtsuQueue(3, fixed=0.5).threshold() == 0.5


# ---------------------------------------------------------------------- switch-over
def test_switch_over_at_batch_128():
    feats, cls = _stream(1408 + 2 * 128)
    method, preds = _run(feats, cls)
    info = method.run_info()
    # the reference decides by the detector when batch * 128 > 10 * 128: from batch 11 = row 1408,
    # with the detector of 11 updates; 13 batches -> 13 updates
    assert info["detector_decides_from_row"] == 1408 and info["detector_updates"] == 13
    zs = _zs_ood(feats, cls)
    np.testing.assert_array_equal(_noisy(preds)[:1408], otsu_noisy_flags(zs, batch_size=128)[:1408])
    torch.testing.assert_close(_scores(preds)[:1408], (1 - zs[:1408]), rtol=0, atol=1e-6)  # MSP
    assert (_noisy(preds)[1408:] != otsu_noisy_flags(zs, batch_size=128)[1408:]).any()
    assert not torch.allclose(_scores(preds)[1408:], (1 - zs[1408:]), atol=1e-3)


def test_switch_over_at_batch_1():
    feats, cls = _stream(700)
    method, preds = _run(feats, cls, adapt_batch_size=1)
    # trained at samples 64, 128, ..., 640 (10 updates); decides when sample > 10 x 64
    assert method.run_info()["detector_decides_from_row"] == 641 and method.updates == 10
    zs_flags = otsu_noisy_flags(_zs_ood(feats, cls), batch_size=1)
    np.testing.assert_array_equal(_noisy(preds)[:641], zs_flags[:641])
    assert zs_flags[0]  # the reference's first sample: Otsu on one score gives 0, so it is flagged

    fixed, preds = _run(feats, cls, adapt_batch_size=1, fix_first_sample=True)
    # trained after samples 63, 127, ..., 639 (10 updates); decides from sample 640
    assert fixed.run_info()["detector_decides_from_row"] == 640 and fixed.updates == 10
    assert not _noisy(preds)[0]  # a queue no threshold splits flags nothing
    np.testing.assert_array_equal(_noisy(preds)[1:640], zs_flags[1:640])


@pytest.mark.parametrize("fix_first_sample", [False, True])
def test_batch_1_trains_on_the_reference_window(fix_first_sample):
    feats, cls = _stream(65)
    feats[:, 0] = 0.0
    feats[0, 0] = 5.0  # coordinate 0 is sample 0's alone: its detector weights move only if sample 0 trains
    method, _ = _run(feats, cls, adapt_batch_size=1, fix_first_sample=fix_first_sample)
    assert method.updates == 1
    # reference: at sample 64 on the 64-long queue = samples 1..64 (sample 0 fell out); fixed: 0..63
    window = slice(0, 64) if fix_first_sample else slice(1, 65)
    noisy = torch.from_numpy(otsu_noisy_flags(_zs_ood(feats, cls), batch_size=1))
    noisy[0] = not fix_first_sample  # sample 0's one-score queue: threshold 0 (reference) or no split (fixed)
    expected = _adam_first_step(_initial_detector(), feats[window], noisy[window])
    torch.testing.assert_close(method.detector.weight.detach(), expected["weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(method.detector.bias.detach(), expected["bias"], rtol=0, atol=1e-6)
    moved = (method.detector.weight[:, 0] - _initial_detector().weight[:, 0]).abs().detach()
    assert torch.allclose(moved, torch.full((2,), 5e-4), atol=1e-6) if fix_first_sample else (moved == 0).all()


# ---------------------------------------------------------------------- training and decisions
def test_batch_update_uses_zero_shot_labels_and_caller_noise():
    feats, cls = _stream(8, seed=3)
    injected = torch.zeros(8, dtype=torch.bool)
    injected[[1, 5]] = True
    method, preds = _run(feats, cls, extras={"injected_noise": injected}, adapt_batch_size=8)
    zs = _zs_ood(feats, cls)
    noisy = (zs > otsu_threshold(zs)) | injected  # noise rows always trained as noisy
    expected = _adam_first_step(_initial_detector(), feats, noisy)
    torch.testing.assert_close(method.detector.weight.detach(), expected["weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(method.detector.bias.detach(), expected["bias"], rtol=0, atol=1e-6)
    assert len(preds) == 8 and _noisy(preds)[[1, 5]].all()
    assert method.run_info()["injected_noise_rows"] == [1, 5]


def test_self_injected_noise_is_trained_as_noisy():
    feats, cls = _stream(4, seed=4)
    pool = torch.randn(50, D) * 5
    method, preds = _run(feats, cls, extras={"noise_features": pool}, adapt_batch_size=4, noise_rate=1.0)
    k = method.run_info()["noise_injected"]
    assert k > 0 and len(preds) == 4  # injected rows are not in the result
    mixed = torch.cat([feats, pool[:k]])  # taken from the pool in order; order in a batch is irrelevant
    zs = _zs_ood(mixed, cls)
    noisy = (zs > otsu_threshold(zs)) | (torch.arange(4 + k) >= 4)
    expected = _adam_first_step(_initial_detector(), mixed, noisy)
    torch.testing.assert_close(method.detector.weight.detach(), expected["weight"], rtol=0, atol=1e-6)


def test_decisions_use_the_detector_from_before_the_batch_update():
    feats, cls = _stream(16, seed=5)
    method = AdaND(adapt_batch_size=8, warmup_updates=0, noise_rate=0.0)
    method.setup(MethodContext(cls, 100.0))
    method.predict_batch(feats[:8, None])  # batch 0: zero-shot decides, detector trains
    before = copy.deepcopy(method.detector)
    preds = method.predict_batch(feats[8:, None])  # batch 1: the detector decides, then trains again
    with torch.no_grad():
        prob = before(feats[8:]).softmax(-1)
    np.testing.assert_array_equal(_noisy(preds), (prob[:, 0] > otsu_threshold(prob[:, 0])).numpy())
    torch.testing.assert_close(_scores(preds), prob[:, 1], rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(method.detector(feats[8:]).softmax(-1), prob)  # the update did change it


def test_noise_kept_out_of_the_queues_on_request():
    feats, cls = _stream(8, seed=3)
    # noise rows orthogonal to every class: uniform zero-shot probabilities, OOD score 1 - 1/C
    q, _ = torch.linalg.qr(cls.T)
    r = torch.randn(2, D, generator=torch.Generator().manual_seed(3))
    feats[[0, 3]] = (r - (r @ q) @ q.T) * 3
    injected = torch.zeros(8, dtype=torch.bool)
    injected[[0, 3]] = True
    zs = _zs_ood(feats, cls)
    torch.testing.assert_close(zs[[0, 3]], torch.full((2,), 1 - 1 / C))
    with_noise = (zs > otsu_threshold(zs)).numpy()
    without = (zs > otsu_threshold(zs[~injected])).numpy()
    clean = ~injected.numpy()
    assert (with_noise[clean] != without[clean]).any()  # the option matters here
    _, preds = _run(feats, cls, extras={"injected_noise": injected}, adapt_batch_size=8)
    np.testing.assert_array_equal(_noisy(preds)[clean], with_noise[clean])
    _, preds = _run(feats, cls, extras={"injected_noise": injected}, adapt_batch_size=8, noise_in_queues=False)
    np.testing.assert_array_equal(_noisy(preds)[clean], without[clean])


def test_score_options_and_seeded_init():
    feats, cls = _stream(20, seed=7)
    _, preds = _run(feats, cls, adapt_batch_size=10, score="detector", seed=3)
    with torch.no_grad():
        first = _initial_detector(seed=3)(feats[:10]).softmax(-1)[:, 1]
    torch.testing.assert_close(_scores(preds)[:10], first, rtol=0, atol=0)
    _, preds = _run(feats, cls, adapt_batch_size=10, score="msp", warmup_updates=0)
    torch.testing.assert_close(_scores(preds), (1 - _zs_ood(feats, cls)), rtol=0, atol=1e-6)


def test_fixed_threshold():
    feats, cls = _stream(10, seed=8)
    _, preds = _run(feats, cls, adapt_batch_size=10, fixed_threshold=0.5)
    np.testing.assert_array_equal(_noisy(preds), (_zs_ood(feats, cls) > 0.5).numpy())


# ---------------------------------------------------------------------- injection, repeatability, batching
def test_injected_noise_rate_and_repeatability():
    feats, cls = _stream(2000, seed=9)
    pool = torch.randn(400, D) * 4
    rng_before = torch.get_rng_state()
    m1, p1 = _run(feats, cls, extras={"noise_features": pool}, noise_rate=0.125)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is never used
    # geometric counts before each row: mean 0.125, variance 0.125 x 1.125 -> sd about 17 over 2000 rows
    assert abs(m1.run_info()["noise_injected"] - 250) < 70
    m2, p2 = _run(feats, cls, extras={"noise_features": pool}, noise_rate=0.125)
    assert m2.run_info() == m1.run_info()
    assert [(p.noisy, p.score) for p in p2] == [(p.noisy, p.score) for p in p1]
    m3, _ = _run(feats[:256], cls, extras={"noise_features": pool}, noise_rate=0.125, seed=1)
    m4, _ = _run(feats[:256], cls, extras={"noise_features": pool}, noise_rate=0.125, seed=0)
    assert m3.run_info()["noise_injected"] != m4.run_info()["noise_injected"]


def test_results_do_not_depend_on_how_the_stream_is_cut():
    feats, cls = _stream(300, seed=10)
    pool = torch.randn(64, D) * 4
    kw = dict(extras={"noise_features": pool}, noise_rate=0.125, adapt_batch_size=16, warmup_updates=3)
    m_all, whole = _run(feats, cls, **kw)  # one call: AdaND cuts it into its own batches of 16
    m_cut, cut = _run(feats, cls, calls=16, **kw)  # what the stream loop does (stream_batch_size)
    assert m_all.stream_batch_size() == 16
    assert [(p.noisy, p.score) for p in whole] == [(p.noisy, p.score) for p in cut]
    torch.testing.assert_close(torch.stack([p.logits for p in whole]), torch.stack([p.logits for p in cut]))
    assert m_all.run_info() == m_cut.run_info() and m_all.run_info()["detector_decides_from_row"] == 64


def test_interleave_puts_counts_of_noise_before_each_row():
    x = torch.tensor([[1.0], [2.0], [3.0]])
    noise = torch.tensor([[-1.0], [-2.0], [-3.0]])
    flagged = torch.tensor([False, True, False])
    mixed, is_noise, is_row = _interleave(x, flagged, torch.tensor([1, 0, 2]), noise)
    assert mixed.flatten().tolist() == [-1.0, 1.0, 2.0, -2.0, -3.0, 3.0]
    assert is_noise.tolist() == [True, False, True, True, True, False]
    assert is_row.tolist() == [False, True, True, False, False, True]


@pytest.mark.parametrize("kind", ["gaussian", "uniform", "salt_and_pepper", "poisson"])
def test_noise_images_follow_the_reference_recipe(kind):
    img = noise_image(kind, 224, torch.Generator().manual_seed(0))
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (224, 224, 3)
    assert arr.min() == 0 and arr.max() == 255  # min-max scaled to [0, 255] then truncated to uint8
    again = noise_image(kind, 224, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(np.asarray(again), arr)
    if kind == "gaussian":  # randn(3, 224, 224), channel-first, min-max, truncation
        x = torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(0))
        expected = ((x - x.min()) / (x.max() - x.min()) * 255).byte().permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(arr, expected)


# ---------------------------------------------------------------------- options, errors, warnings
@pytest.mark.parametrize(
    "option",
    [
        {"adapt_batch_size": 0},
        {"lr": -1.0},
        {"noise_rate": -0.1},
        {"noise_type": "pink"},
        {"score": "energy"},
        {"fixed_threshold": 2.0},
        {"queue_length": 0},
        {"warmup_updates": -1},
        {"fix_first_sample": "no"},
        {"fixed_threshold": "0.5"},
    ],
)
def test_bad_options(option):
    with pytest.raises(MethodOptionError, match=next(iter(option))):
        create_method("adand", **option)


def test_registered_under_its_names():
    assert isinstance(create_method("zs-ntta"), AdaND) and AdaND.raw_features and not AdaND.episodic


def test_input_errors():
    feats, cls = _stream(8)
    with pytest.raises(FeatureError, match="noise_features"):
        AdaND().setup(MethodContext(cls, 100.0))  # no model and no noise given
    with pytest.raises(FeatureError, match="not both"):
        AdaND().setup(
            MethodContext(cls, 100.0, extras={"noise_features": torch.ones(2, D), "injected_noise": [False] * 8})
        )
    with pytest.raises(FeatureError, match=f"M x {D}"):
        AdaND().setup(MethodContext(cls, 100.0, extras={"noise_features": torch.ones(2, D + 1)}))
    bad = feats.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(FeatureError, match="NaN"):
        _run(bad, cls)
    with pytest.raises(FeatureError, match="injected_noise has 4 entries"):
        _run(feats, cls, extras={"injected_noise": [False] * 4})
    with pytest.raises(NotImplementedError, match="predict_batch"):
        _run(feats, cls)[0].predict_features(feats[:1])


def test_warns_when_the_stream_ends_before_the_warm_up():
    feats, cls = _stream(200)
    method, _ = _run(feats, cls)  # 2 batches of 128: the detector never decided
    with pytest.warns(UserWarning, match=r"before the detector's first decision \(it decides from batch 11 of 128"):
        method.finish()
    assert method.run_info()["detector_decides_from_row"] is None
    method, _ = _run(feats[:20], cls, adapt_batch_size=1)
    with pytest.warns(UserWarning, match=r"from sample 641, counting from 0"):
        method.finish()
    method, _ = _run(feats, cls, adapt_batch_size=8, warmup_updates=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method.finish()


def test_detector_init_from_a_file(tmp_path):
    from safetensors.torch import save_file

    feats, cls = _stream(10)
    weight, bias = torch.randn(2, D), torch.randn(2)
    save_file({"fc.weight": weight, "fc.bias": bias}, tmp_path / "det.safetensors")  # the reference's OODDetector keys
    _, preds = _run(feats, cls, adapt_batch_size=10, score="detector", detector_init=tmp_path / "det.safetensors")
    torch.testing.assert_close(_scores(preds), (feats @ weight.T + bias).softmax(-1)[:, 1], rtol=0, atol=1e-6)
    torch.save({"weight": torch.randn(2, D + 1), "bias": bias}, tmp_path / "det.pt")
    with pytest.raises(MethodOptionError, match="expected weight 2 x 16"):
        _run(feats, cls, detector_init=str(tmp_path / "det.pt"))


# ---------------------------------------------------------------------- end to end
def test_classify_features_with_caller_noise_rows():
    feats, cls = _stream(40, seed=11)
    injected = np.zeros(40, dtype=bool)
    injected[[2, 17, 30]] = True
    opts = dict(adapt_batch_size=8, warmup_updates=1)
    res = vlm_tta.classify_features(feats, cls, method="adand", injected_noise=injected, batch_size=7, **opts)
    assert len(res) == 40 and res.noisy.dtype == bool and res.noisy[[2, 17, 30]].all()
    assert res.info["injected_noise_rows"] == [2, 17, 30] and res.info["detector_decides_from_row"] == 16
    _, preds = _run(feats, cls, extras={"injected_noise": torch.from_numpy(injected)}, **opts)
    np.testing.assert_array_equal(res.noisy, _noisy(preds))  # raw embeddings reached the method unchanged
    np.testing.assert_allclose(res.scores, _scores(preds).numpy(), rtol=0, atol=1e-7)


def test_classify_features_with_noise_embeddings_ignores_the_callers_batch_size():
    feats, cls = _stream(90, seed=12)
    noise = torch.randn(30, D) * 4
    opts = dict(method="adand", noise_features=noise, adapt_batch_size=16, warmup_updates=2)
    runs = [vlm_tta.classify_features(feats, cls, batch_size=b, **opts) for b in (5, 64)]
    np.testing.assert_array_equal(runs[0].noisy, runs[1].noisy)
    np.testing.assert_array_equal(runs[0].scores, runs[1].scores)
    assert runs[0].info["noise_injected"] == runs[1].info["noise_injected"] > 0
    with pytest.raises(FeatureError, match="noise_features"):
        vlm_tta.classify_features(feats, cls, method="adand")  # no way to make noise on embeddings


def test_classify_on_images_encodes_noise_through_the_cache(tiny_openclip, tmp_path):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)) for _ in range(12)]
    classes = ["cat", "dog", "bird"]
    calls = encoder_call_counter(tiny_openclip)
    kw = dict(
        method="adand", model=tiny_openclip, cache_dir=tmp_path, adapt_batch_size=4, warmup_updates=1, noise_rate=0.25
    )
    first = vlm_tta.classify(images, classes, batch_size=5, **kw)
    after_first = calls()["images"]
    second = vlm_tta.classify(images, classes, batch_size=3, **kw)  # another reading chunk: same result
    assert calls()["images"] == after_first, "a second run must read the images and the noise images from the cache"
    assert first.info["noise_injected"] > 0 and first.info["detector_decides_from_row"] == 8
    assert first.noisy.shape == (12,) and first.noisy.dtype == bool
    np.testing.assert_array_equal(first.noisy, second.noisy)
    np.testing.assert_array_equal(first.scores, second.scores)
    # the zero-shot logits of the frozen model, from the raw embeddings AdaND received
    store = FeatureStore(tiny_openclip, EmbeddingCache(tmp_path / "check"))
    raw = store.view_features(images, AdaND().view_set(), normalize=False)[:, 0]
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(1))
    expected = tiny_openclip.logit_scale * F.normalize(raw, dim=-1) @ store.class_features(classes).T
    np.testing.assert_allclose(first.logits, expected.numpy(), rtol=1e-4, atol=1e-4)
