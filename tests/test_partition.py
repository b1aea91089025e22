"""The paper's non-IID partition: sizes, shares, disjointness, determinism, matching test splits."""
import numpy as np
import pytest

from hyperfl_fast.data import EMNIST_GROUPS, TEN_CLASS_GROUPS
from hyperfl_fast.partition import class_counts, even_split, overlap, partition


def labels(per_class, num_classes=10, seed=0):
    y = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(y)


@pytest.fixture
def splits():
    return partition(labels(600), labels(300), 10, TEN_CLASS_GROUPS, num_clients=10, local_size=200,
                     test_size=100, iid_share=0.2, seed=3)


def test_even_split():
    assert even_split(10, 3) == [4, 3, 3]
    assert sum(even_split(123, 7)) == 123


def test_sizes(splits):
    assert len(splits) == 10
    for s in splits:
        assert len(s.train) == 200 and len(s.test) == 100
        assert len(np.unique(s.train)) == 200 and len(np.unique(s.test)) == 100


def test_share_and_dominant_classes(splits):
    train_y = labels(600)
    for cid, s in enumerate(splits):
        counts = np.bincount(train_y[s.train], minlength=10)
        group = TEN_CLASS_GROUPS[cid % 5]
        # 20% of 200 = 40 spread evenly: 4 per class; 160 over the 3 group classes: 54, 53, 53
        expected = np.full(10, 4)
        expected[list(group)] += [54, 53, 53]
        np.testing.assert_array_equal(counts, expected)
        assert counts[list(group)].sum() == 200 - 40 + 4 * 3


def test_emnist_groups_round_robin():
    counts = class_counts(4, 1000, 62, EMNIST_GROUPS, 0.2)
    assert counts.sum() == 1000
    # client 4 -> group 4 % 3 = upper case; 200 iid samples over 62 classes: classes 0-13 get 4, the rest 3
    assert (counts[:10] == 4).all() and (counts[36:] == 3).all()
    assert counts[10:36].sum() == 800 + 4 * 4 + 22 * 3


def test_train_disjoint_across_clients(splits):
    all_train = np.concatenate([s.train for s in splits])
    assert len(np.unique(all_train)) == len(all_train)


def test_deterministic_per_seed():
    a = partition(labels(600), labels(300), 10, TEN_CLASS_GROUPS, 10, 200, 100, 0.2, seed=5)
    b = partition(labels(600), labels(300), 10, TEN_CLASS_GROUPS, 10, 200, 100, 0.2, seed=5)
    c = partition(labels(600), labels(300), 10, TEN_CLASS_GROUPS, 10, 200, 100, 0.2, seed=6)
    assert all(np.array_equal(x.train, y.train) and np.array_equal(x.test, y.test) for x, y in zip(a, b))
    assert not all(np.array_equal(x.train, y.train) for x, y in zip(a, c))


def test_test_split_matches_train_label_groups(splits):
    train_y, test_y = labels(600), labels(300)
    for s in splits:
        train_share = np.bincount(train_y[s.train], minlength=10) / len(s.train)
        test_share = np.bincount(test_y[s.test], minlength=10) / len(s.test)
        np.testing.assert_allclose(train_share, test_share, atol=0.01)


def test_iid_partition_is_disjoint_and_balanced():
    splits = partition(labels(600), labels(300), 10, TEN_CLASS_GROUPS, 10, 500, 100, iid=True, seed=1)
    all_train = np.concatenate([s.train for s in splits])
    assert len(np.unique(all_train)) == 5000
    counts = np.bincount(labels(600)[all_train], minlength=10)
    assert counts.min() > 400  # roughly uniform, no dominant classes


def test_too_many_clients_is_a_clear_error():
    with pytest.raises(ValueError, match="lower --clients or --local-size"):  # IID splits stay disjoint
        partition(labels(600), labels(300), 10, TEN_CLASS_GROUPS, 11, 600, 100, iid=True)
    with pytest.raises(ValueError, match="class 0 has 60 training samples, fewer than the 61 one client needs"):
        partition(labels(60), labels(300), 10, TEN_CLASS_GROUPS, 1, 601, 100, iid_share=1.0)


def test_a_class_that_runs_out_starts_over_as_the_authors_partition_does():
    """100 clients x 600 samples of FMNIST-like data: the dominant classes run out, start over and hand the same
    samples out again; every client still gets exactly its class counts."""
    train_y = labels(600)
    splits = partition(train_y, labels(300), 10, TEN_CLASS_GROUPS, 20, 300, 100, 0.2, seed=2)
    assert overlap(splits) > 0
    for cid, s in enumerate(splits):
        assert len(np.unique(s.train)) == 300  # no sample twice within a client
        np.testing.assert_array_equal(np.bincount(train_y[s.train], minlength=10),
                                      class_counts(cid, 300, 10, TEN_CLASS_GROUPS, 0.2))
    first = partition(train_y, labels(300), 10, TEN_CLASS_GROUPS, 10, 300, 100, 0.2, seed=2)
    assert overlap(first) == 0  # nothing runs out: disjoint as before
    # class 0 is dominant for clients 0, 4, 5, 9, ...: after 600 / (80 + 6) = 6 of them it starts over
    zero = [set(s.train[train_y[s.train] == 0]) for s in splits]
    assert zero[0] & set().union(*zero[1:])
