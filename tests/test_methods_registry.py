"""The method registry, zero-shot mathematics and classify_features on hand-made embeddings."""

import math

import numpy as np
import pytest
import torch

import vlm_tta
from vlm_tta.errors import ClassNamesError, FeatureError, UnknownMethodError
from vlm_tta.methods import Method, create_method, get_method_class, list_methods, register_method
from vlm_tta.methods.base import _REGISTRY


def test_zeroshot_is_registered_with_aliases():
    assert "zeroshot" in list_methods()
    assert get_method_class("ZeroShot") is get_method_class("zero-shot") is get_method_class("clip")


def test_unknown_method_error_suggests_close_names():
    with pytest.raises(UnknownMethodError, match="zeroshot"):
        get_method_class("zeroshoot")
    with pytest.raises(KeyError):  # UnknownMethodError is also a KeyError
        create_method("no-such-method")


def test_unknown_option_lists_valid_options():
    with pytest.raises(TypeError, match="did you mean 'score'"):
        create_method("zeroshot", scor="msp")
    with pytest.raises(ValueError, match="score must be one of"):
        create_method("zeroshot", score="bogus")


def test_register_method_decorator_and_duplicate_name():
    @register_method("_test_dummy")
    class Dummy(Method):
        pass

    try:
        assert "_test_dummy" in list_methods()
        with pytest.raises(ValueError, match="already registered"):

            @register_method("_test_dummy")
            class Other(Method):
                pass

    finally:
        _REGISTRY.pop("_test_dummy")


def _toy_embeddings():
    # Three classes along the axes; images near class 0, 1 and 2.
    classes = torch.eye(3, 4)
    images = torch.tensor([[1.0, 0.1, 0.0, 0.0], [0.2, 1.0, 0.1, 0.0], [0.0, 0.3, 0.9, 0.1]])
    return images, classes


def test_zeroshot_logits_match_hand_computation():
    images, classes = _toy_embeddings()
    res = vlm_tta.classify_features(images, classes, method="zeroshot", logit_scale=100.0, classnames=["a", "b", "c"])
    expected = 100.0 * torch.nn.functional.normalize(images, dim=-1) @ classes.T
    np.testing.assert_allclose(res.logits, expected.numpy(), rtol=1e-6)
    assert res.labels == ["a", "b", "c"]
    assert list(res.indices) == [0, 1, 2]
    np.testing.assert_allclose(res.probs.sum(1), 1.0, rtol=1e-6)
    # default score is the max softmax probability
    np.testing.assert_allclose(res.scores, res.probs.max(1), rtol=1e-5)


def test_zeroshot_siglip_bias_shifts_logits_not_ranking():
    images, classes = _toy_embeddings()
    plain = vlm_tta.classify_features(images, classes, logit_scale=10.0)
    biased = vlm_tta.classify_features(images, classes, logit_scale=10.0, logit_bias=-12.5)
    np.testing.assert_allclose(biased.logits, plain.logits - 12.5, rtol=1e-6, atol=1e-5)
    assert list(biased.indices) == list(plain.indices)


def test_zeroshot_scores_mcm_energy_maxlogit():
    images, classes = _toy_embeddings()
    cos = torch.nn.functional.normalize(images, dim=-1) @ classes.T
    mcm = vlm_tta.classify_features(images, classes, score="mcm", mcm_temperature=1.0).scores
    np.testing.assert_allclose(mcm, cos.softmax(-1).max(-1).values.numpy(), rtol=1e-5)
    energy = vlm_tta.classify_features(images, classes, score="energy").scores
    np.testing.assert_allclose(energy, torch.logsumexp(100 * cos, -1).numpy(), rtol=1e-5)
    maxlogit = vlm_tta.classify_features(images, classes, score="max_logit").scores
    np.testing.assert_allclose(maxlogit, (100 * cos).max(-1).values.numpy(), rtol=1e-5)
    assert vlm_tta.classify_features(images, classes, score="none").scores is None


def test_classify_features_uses_view_zero_of_view_stacks():
    images, classes = _toy_embeddings()
    noise = torch.randn(3, 5, 4)
    stacked = torch.cat([images[:, None], noise], dim=1)  # N x 6 x D, view 0 = original
    a = vlm_tta.classify_features(stacked, classes)
    b = vlm_tta.classify_features(images, classes)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-6)


def test_classify_features_accepts_numpy_and_normalises():
    images, classes = _toy_embeddings()
    a = vlm_tta.classify_features((images * 7).numpy(), (classes * 3).numpy().astype(np.float64))
    b = vlm_tta.classify_features(images, classes)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5)


@pytest.mark.parametrize(
    "views, classes, match",
    [
        (torch.ones(2, 3, 4, 5), torch.eye(3, 5), "N x D or N x V x D"),
        (torch.ones(2, 4), torch.ones(4), "C x D"),
        (torch.ones(2, 4), torch.eye(3, 5), "embedding sizes differ"),
        (torch.tensor([[1.0, float("nan")]]), torch.eye(2), "NaN"),
        (torch.ones(2, 2), torch.tensor([[1.0, float("inf")]]), "NaN or infinite"),
        (torch.zeros(1, 2), torch.eye(2), "all-zero"),
        (torch.ones(2, 2, dtype=torch.int64), torch.eye(2), "floating-point"),
        ([[1.0, 0.0]], torch.eye(2), "numpy array or torch tensor"),
    ],
)
def test_classify_features_bad_input(views, classes, match):
    with pytest.raises(FeatureError, match=match):
        vlm_tta.classify_features(views, classes)


def test_classify_features_bad_scale_and_names():
    images, classes = _toy_embeddings()
    with pytest.raises(FeatureError, match="logit_scale"):
        vlm_tta.classify_features(images, classes, logit_scale=0.0)
    with pytest.raises(FeatureError, match="2 class names for 3"):
        vlm_tta.classify_features(images, classes, classnames=["a", "b"])
    with pytest.raises(ClassNamesError, match="appears twice"):
        vlm_tta.classify_features(images, classes, classnames=["a", "b", "a"])


def test_classify_features_empty_batch():
    res = vlm_tta.classify_features(torch.zeros(0, 4), torch.eye(3, 4))
    assert len(res) == 0 and res.probs.shape == (0, 3) and res.labels == []


def test_result_rows_are_json_ready():
    import json

    images, classes = _toy_embeddings()
    res = vlm_tta.classify_features(images, classes, classnames=["a", "b", "c"])
    rows = res.to_rows(names=["x.png", "y.png", "z.png"], top_k=2)
    json.dumps(rows)
    assert rows[0]["image"] == "x.png" and rows[0]["label"] == "a" and len(rows[0]["top"]) == 2
    assert math.isclose(rows[0]["prob"], float(res.probs[0].max()), rel_tol=1e-6)


def test_duplicate_classnames_only_when_allowed():
    images, classes = _toy_embeddings()
    with pytest.raises(ClassNamesError, match="allow_duplicate_classnames"):
        vlm_tta.classify_features(images, classes, classnames=["missile", "b", "missile"])
    res = vlm_tta.classify_features(
        images, classes, classnames=["missile", "b", "missile"], allow_duplicate_classnames=True
    )
    assert res.labels == ["missile", "b", "missile"] and list(res.indices) == [0, 1, 2]
