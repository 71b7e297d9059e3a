"""Shared memory mathematics in vlm_tta.methods.common: KeyStore, affinity, entropies, vote logits."""

import math

import pytest
import torch

from vlm_tta.errors import FeatureError, MethodOptionError
from vlm_tta.methods.common import (
    KeyStore,
    affinity,
    blockwise,
    check_view_features,
    entropy,
    gather_views,
    lowest,
    prob_entropy,
    probs_to_logits,
)


def test_keystore_batch_read_equals_reading_one_query_at_a_time():
    g = torch.Generator().manual_seed(0)
    store = KeyStore(4, capacity=2)  # small capacity: growth happens mid-batch
    for i in range(3):
        store.add(torch.randn(4, generator=g), i)
    queries = torch.randn(5, 4, generator=g)
    store.begin(queries)
    for i in range(5):
        if i == 1:
            store.set(0, torch.randn(4, generator=g))  # overwrite a row read by the batch product
        if i in (2, 3):
            store.add(torch.randn(4, generator=g), 9)  # new rows (the store grows past its capacity)
        expected = store.keys[: store.n] @ queries[i]
        torch.testing.assert_close(store.similarities(i), expected)
    assert store.n == 5 and store.tags[:5].tolist() == [0, 1, 2, 9, 9]


def test_keystore_values_and_extend():
    store = KeyStore(2, value_dim=3)
    rows = store.extend(torch.eye(2), torch.tensor([4, 5]))
    assert rows.tolist() == [0, 1]
    row = store.add(torch.ones(2), 7, torch.tensor([1.0, 0.0, 1.0]))
    assert row == 2 and store.values[2].tolist() == [1.0, 0.0, 1.0] and store.values[0].tolist() == [0.0] * 3
    store.begin(torch.tensor([[2.0, 3.0]]))
    assert store.similarities(0).tolist() == [2.0, 3.0, 5.0]


def test_affinity_is_tip_adapter_exp():
    s = torch.tensor([1.0, 0.5, 0.0])
    torch.testing.assert_close(affinity(s, 5.5), torch.tensor([1.0, math.exp(-2.75), math.exp(-5.5)]))


def test_entropies():
    logits = torch.tensor([[0.0, 0.0], [100.0, 0.0]])
    torch.testing.assert_close(entropy(logits), torch.tensor([math.log(2), 0.0]), atol=1e-6, rtol=0)
    p = torch.tensor([0.5, 0.5, 0.0])
    assert float(prob_entropy(p)) == pytest.approx(math.log(2))  # 0 log 0 = 0, no NaN
    assert float(prob_entropy(p, 1e-6)) == pytest.approx(-(2 * 0.5 * math.log(0.5 + 1e-6) + 0 * math.log(1e-6)))


def test_lowest_keeps_int_fraction_stably():
    scores = torch.tensor([[3.0, 1.0, 1.0, 0.0, 5.0, 2.0, 2.0, 9.0, 7.0, 1.0]])
    assert lowest(scores, 0.3).tolist() == [[3, 1, 2]]  # ties keep the lower index
    with pytest.raises(MethodOptionError, match="keeps none"):
        lowest(scores, 0.05)


def test_probs_to_logits_softmax_gives_back_the_normalised_vector():
    votes = torch.tensor([[0.0, 3.0, 1.0]])
    logits = probs_to_logits(votes)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits.softmax(-1), torch.tensor([[0.0, 0.75, 0.25]]))


def test_check_view_features_errors():
    x = torch.ones(2, 3, 4)
    assert check_view_features(x, 2, "m").shape == (2, 2, 4)
    with pytest.raises(FeatureError, match="reads 5 views"):
        check_view_features(x, 5, "m")
    x[1, 0, 0] = float("nan")
    with pytest.raises(FeatureError, match="1 image"):
        check_view_features(x, 3, "m")


def test_gather_views_equals_torch_gather():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 7, 5, generator=g)
    index = torch.randint(0, 6, (3, 2, 4), generator=g)

    def reference(x, index):
        return torch.gather(x, -2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))

    assert torch.equal(gather_views(x, index), reference(x, index))  # contiguous: the index_select path
    assert torch.equal(gather_views(x[..., :6, :], index), reference(x[..., :6, :], index))  # strided: gather
    assert torch.equal(gather_views(x[0, 0], index[0, 0]), reference(x[0, 0], index[0, 0]))  # no leading dim


def test_blockwise_gives_the_bits_of_one_pass():
    """Per-image chains (softmax, entropies, selection, means over views) in blocks of images equal
    one pass over the whole batch bit for bit, whatever the block size; dicts and tuples are joined."""
    g = torch.Generator().manual_seed(0)
    logits = 30 * torch.randn(37, 16, 50, generator=g)

    def chain(x):
        p = x.softmax(-1)
        keep = lowest(prob_entropy(p, 1e-6), 0.25)
        return {"mean": gather_views(p, keep).mean(1), "ent": entropy(x), "lse": x.logsumexp(-2)}

    whole = chain(logits)
    for elements in (1, 16 * 50 * 5, 10**9):  # one image per block, 5 per block, one block
        got = blockwise(chain, logits, per_image=16 * 50, elements=elements)
        assert got.keys() == whole.keys() and all(torch.equal(got[k], whole[k]) for k in whole)
        pair = blockwise(lambda x: (chain(x)["ent"], x[:, 0]), logits, per_image=16 * 50, elements=elements)
        assert torch.equal(pair[0], whole["ent"]) and torch.equal(pair[1], logits[:, 0])


@pytest.mark.parametrize("inclusive", [True, False])
def test_keystore_versions_equal_reading_each_query_after_its_writes(inclusive):
    """Writes first, one batched read: every query sees the rows as a loop would have seen them
    (written at a clock <= i, or < i), including rows added and overwritten within the batch."""
    g = torch.Generator().manual_seed(1)
    store = KeyStore(4, value_dim=3, capacity=2)
    for i in range(3):
        store.add(torch.randn(4, generator=g), i, torch.randn(3, generator=g))
    queries = torch.randn(6, 4, generator=g)
    writes = {0: [("set", 1)], 1: [("add", 7)], 2: [("set", 1), ("set", 3)], 4: [("set", 3)], 5: [("add", 8)]}
    expected = []
    store.begin(queries, versions=True)
    snapshot = KeyStore(4, value_dim=3)  # a plain copy, written and read in a loop
    for r in range(3):
        snapshot.add(store.keys[r], int(store.tags[r]), store.values[r])
    for i in range(6):
        if not inclusive:
            expected.append((snapshot.keys[: snapshot.n] @ queries[i], snapshot.values[: snapshot.n].clone()))
        store.clock = i
        for op, arg in writes.get(i, []):
            key, value = torch.randn(4, generator=g), torch.randn(3, generator=g)
            if op == "set":
                store.set(arg, key, value)
                snapshot.set(arg, key, value)
            else:
                store.add(key, arg, value)
                snapshot.add(key, arg, value)
        if inclusive:
            expected.append((snapshot.keys[: snapshot.n] @ queries[i], snapshot.values[: snapshot.n].clone()))
    sims, rows, visible, values = store.versions(inclusive)
    for i, (s, v) in enumerate(expected):
        assert int(visible[i].sum()) == len(s)  # one visible version per row that exists at that time
        seen = rows[visible[i]]
        assert sorted(seen.tolist()) == list(range(len(s)))
        torch.testing.assert_close(sims[i][visible[i]], s[seen])  # each row's version at that time
        torch.testing.assert_close(values[visible[i]], v[seen])
    with pytest.raises(RuntimeError, match="versions=True"):
        KeyStore(2).versions()
