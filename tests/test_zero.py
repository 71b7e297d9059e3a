"""ZERO: the zero-temperature vote, the tie rule and its fallback, the underflow quirk, batching,
and end to end on a tiny model.

Hand-made views use class embeddings along the first C axes and one spare axis, so a view's
cosines are exactly the coordinates written in the test (the spare coordinate makes it unit)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from feature_method_checks import check_cli_lists_options, end_to_end, synthetic_stream

from vlm_tta.errors import FeatureError, MethodOptionError
from vlm_tta.methods import MethodContext, create_method


def _views(*cosines):
    x = torch.tensor(cosines, dtype=torch.float32)
    spare = (1 - (x**2).sum(-1, keepdim=True)).sqrt()
    return torch.cat([x, spare], -1)


def _zero(c, **opts):
    m = create_method("zero", **opts)
    m.setup(MethodContext(torch.eye(c + 1)[:c], 100.0))
    return m


def _votes(pred):
    return pred.logits.softmax(-1)


def test_majority_vote_of_the_most_confident_views():
    confident = [(0.5, 0.1, 0.1), (0.49, 0.1, 0.1), (0.1, 0.48, 0.1)]  # int(0.3 x 10) = 3 kept
    unsure = [(0.1, 0.11, 0.1)] * 7  # all for class 1, but too uncertain to be kept
    pred = _zero(3, n_views=10).predict_features(_views(*confident, *unsure))
    torch.testing.assert_close(_votes(pred), torch.tensor([2 / 3, 1 / 3, 0.0]))
    assert pred.index == 0 and pred.score == pytest.approx(2 / 3)


def test_tie_goes_to_the_first_remaining_view_that_names_a_tied_class():
    kept = [(0.5, 0.1, 0.1), (0.49, 0.1, 0.1), (0.1, 0.48, 0.1), (0.1, 0.47, 0.1)]  # 2 votes each for 0 and 1
    rest = [(0.1, 0.1, 0.3), (0.1, 0.25, 0.1)] + [(0.11, 0.1, 0.1)] * 8  # class 2 (not tied), then class 1
    pred = _zero(3, n_views=14).predict_features(_views(*kept, *rest))  # int(0.3 x 14) = 4 kept
    torch.testing.assert_close(_votes(pred), torch.tensor([2, 3, 0]) / 5.0)  # the winner gets one more vote
    assert pred.index == 1


def test_tie_fallback_reproduces_the_bitwise_not_quirk():
    # Tied classes {0, 1}; no remaining view names them. The first remaining view's cosines are
    # (0.15, 0.1, 0.25, 0.1, 0.3): the reference masks classes C-1-t = {4, 3} and takes the argmax of
    # the rest, class 2 (untied); "tied_only" takes the better tied class, 0.
    kept = [(0.5, 0.1, 0.1, 0.1, 0.1), (0.49, 0.1, 0.1, 0.1, 0.1)]  # 2 votes for class 0
    kept += [(0.1, 0.48, 0.1, 0.1, 0.1), (0.1, 0.47, 0.1, 0.1, 0.1)]  # 2 votes for class 1
    rest = [(0.15, 0.1, 0.25, 0.1, 0.3)] + [(0.1, 0.1, 0.1, 0.12, 0.1)] * 9
    views = _views(*kept, *rest)
    ref = _zero(5, n_views=14).predict_features(views)
    torch.testing.assert_close(_votes(ref), torch.tensor([2, 2, 1, 0, 0]) / 5.0)
    assert ref.index == 0  # still tied after the extra vote: the first class
    fixed = _zero(5, n_views=14, tie_fallback="tied_only").predict_features(views)
    torch.testing.assert_close(_votes(fixed), torch.tensor([3, 2, 0, 0, 0]) / 5.0)


def test_no_remaining_view_gives_the_lowest_tied_class():
    pred = _zero(2, n_views=2, gamma=1.0).predict_features(_views((0.1, 0.4), (0.4, 0.1)))
    torch.testing.assert_close(_votes(pred), torch.tensor([2, 1]) / 3.0)


def test_underflowing_view_ranks_last_like_the_reference():
    # view 0's logit gap is 120: its smaller probability underflows to 0 and -(p log p) is NaN
    views = _views((-0.6, 0.6), (0.4, 0.1), (0.39, 0.1), (0.38, 0.1), *[(0.1, 0.11)] * 6)
    ref = _zero(2, n_views=10).predict_features(views)
    torch.testing.assert_close(_votes(ref), torch.tensor([1.0, 0.0]))  # view 0 is not among the 3 kept
    fixed = _zero(2, n_views=10, underflow_ranks_last=False).predict_features(views)
    torch.testing.assert_close(_votes(fixed), torch.tensor([2, 1]) / 3.0)  # view 0 is the most confident


def test_eps_softmax_vote_shares_an_exact_tie_and_argmax_does_not():
    kept = torch.tensor([[[0.3, 0.3, 0.1], [0.2, 0.5, 0.1]]])
    torch.testing.assert_close(_zero(3).vote(kept), torch.tensor([[0.5, 1.5, 0.0]]))
    torch.testing.assert_close(_zero(3, vote="argmax").vote(kept), torch.tensor([[1.0, 1.0, 0.0]]))


def test_batch_equals_one_image_at_a_time():
    g = torch.Generator().manual_seed(0)
    classes = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    views = F.normalize(torch.randn(40, 64, 8, generator=g), dim=-1)
    m = create_method("zero")
    m.setup(MethodContext(classes, 30.0))
    batch = torch.stack([p.logits for p in m.predict_batch(views)])
    single = torch.stack([m.predict_features(v).logits for v in views])
    assert torch.equal(batch, single)
    shares = batch.softmax(-1)  # 19 votes, 20 where a tie was broken: this data has both

    def whole(n):
        return ((shares * n - (shares * n).round()).abs() < 1e-4).all(-1)

    broken = whole(20) & ~whole(19)
    assert 0 < int(broken.sum()) < len(views)


def test_options_and_errors():
    assert (create_method("zero").view_set().recipe, create_method("zero").view_set().n_views) == ("crop_flip", 64)
    with pytest.raises(MethodOptionError, match="keeps none"):
        create_method("zero", n_views=3)
    with pytest.raises(MethodOptionError, match="vote"):
        create_method("zero", vote="soft")
    m = _zero(2, n_views=10)
    with pytest.raises(FeatureError, match="reads 10 views"):
        m.predict_batch(torch.ones(1, 4, 3))
    with pytest.raises(FeatureError, match="NaN"):
        m.predict_batch(torch.full((1, 10, 3), float("nan")))


def test_end_to_end_on_a_tiny_model(tiny_openclip, tmp_path):
    result = end_to_end(tiny_openclip, tmp_path, "zero", n_views=10)

    def whole(n):
        return np.isclose(result.probs * n, np.round(result.probs * n))

    assert np.all(whole(3) | whole(4))  # vote shares of int(0.3 x 10) = 3 votes (+1 for a broken tie)


def test_cli_lists_every_option_with_its_default(capsys):
    check_cli_lists_options("zero", capsys)


def test_cache_sized_blocks_give_the_bits_of_one_pass(monkeypatch):
    """The exact speed-up: per-image work in blocks of images (common.blockwise) equals one pass."""
    import vlm_tta.methods.common as common

    views, classes, _ = synthetic_stream(24, 50, 16, 64, seed=3)
    m = create_method("zero")
    m.setup(MethodContext(classes, 100.0))
    monkeypatch.setattr(common, "BLOCK_ELEMENTS", 10**12)  # the straightforward computation: one block
    whole = torch.stack([p.logits for p in m.predict_batch(views)])
    monkeypatch.setattr(common, "BLOCK_ELEMENTS", 64 * 50 * 5)  # blocks of 5 images
    blocked = torch.stack([p.logits for p in m.predict_batch(views)])
    assert torch.equal(blocked, whole)


def _reference_votes(cos, scale, gamma=0.3):
    """ZERO's votes written plainly (torch.gather, argmax; no blocks), the oracle of the fast path."""
    probs = (cos / (1.0 / scale)).softmax(-1)
    order = torch.argsort(-(probs * probs.log()).sum(-1), dim=-1, stable=True)
    k = int(cos.shape[1] * gamma)

    def take(idx):
        return torch.gather(cos, 1, idx.unsqueeze(-1).expand(*idx.shape, cos.shape[-1]))

    votes = (take(order[:, :k]) / torch.finfo(cos.dtype).eps).softmax(-1).sum(1)
    rest = take(order[:, k:])
    tied = votes == votes.max(-1, keepdim=True).values
    rows = (tied.sum(-1) > 1).nonzero().flatten().tolist()
    for i in rows:
        pred = rest[i].argmax(-1)
        hits = [int(p) for p in pred if tied[i, p]]
        winner = hits[0] if hits else int(rest[i, 0].masked_fill(tied[i].flip(-1), float("-inf")).argmax())
        votes[i, winner] += 1
    return votes, len(rows)


def test_fast_votes_equal_the_plain_computation_with_many_ties():
    views, classes, _ = synthetic_stream(40, 300, 32, 64, seed=5, noise=12.0)  # spread votes: many ties
    m = create_method("zero")
    m.setup(MethodContext(classes, 100.0))
    cos = views @ classes.T
    expected, n_tied = _reference_votes(cos, 100.0)
    got = torch.cat([m.votes(c) for c in cos.split(7)])
    assert torch.equal(got, expected)
    assert 5 < n_tied < 40  # the tie rule ran, and not for every image
    preds = m.predict_batch(views)
    assert [p.index for p in preds] == expected.argmax(-1).tolist()
