from medldm.data.splits import assign_splits


def test_split_is_subject_level_deterministic_and_complete():
    subjects = [f"s{i:03d}" for i in range(40)] * 2  # every subject has two sessions
    a = assign_splits(subjects, 0.1, 0.2, seed=1)
    assert a == assign_splits(list(reversed(subjects)), 0.1, 0.2, seed=1)
    assert set(a) == set(subjects)
    counts = {k: sum(v == k for v in a.values()) for k in ("train", "val", "test")}
    assert counts == {"train": 28, "val": 4, "test": 8}
    assert assign_splits(subjects, 0.1, 0.2, seed=2) != a


def test_small_cohorts_still_get_val_and_test():
    a = assign_splits(["a", "b", "c", "d", "e"], 0.1, 0.1, seed=0)
    assert sorted(a.values()).count("train") == 3
    assert {"val", "test"} <= set(a.values())
