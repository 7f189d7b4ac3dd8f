from collections import Counter

from medldm.data.splits import assign_splits


def test_split_is_subject_level_deterministic_and_complete():
    subjects = {f"s{i:03d}": None for i in range(40)}
    a = assign_splits(subjects, 0.1, 0.2, seed=1)
    assert a == assign_splits(dict(reversed(list(subjects.items()))), 0.1, 0.2, seed=1)
    assert set(a) == set(subjects)
    assert Counter(a.values()) == {"train": 28, "val": 4, "test": 8}
    assert assign_splits(subjects, 0.1, 0.2, seed=2) != a


def test_stratified_split_keeps_the_diagnosis_mix():
    subjects = {f"s{i:03d}": dx for i, dx in enumerate(["CN"] * 50 + ["MCI"] * 30 + ["AD"] * 20)}
    a = assign_splits(subjects, 0.1, 0.2, seed=0, stratify=True)
    for dx, n in (("CN", 50), ("MCI", 30), ("AD", 20)):
        test = sum(1 for s, split in a.items() if split == "test" and subjects[s] == dx)
        assert test == round(0.2 * n)


def test_rerun_with_more_subjects_never_moves_a_subject():
    first = {f"s{i:03d}": "CN" for i in range(20)}
    a = assign_splits(first, 0.15, 0.15, seed=0)
    more = {**first, **{f"t{i:03d}": "AD" for i in range(10)}}
    b = assign_splits(more, 0.15, 0.15, seed=0, previous=a)
    assert all(b[s] == a[s] for s in first)
    assert {"train", "test"} <= {b[s] for s in more if s.startswith("t")}


def test_small_cohorts_still_get_val_and_test():
    a = assign_splits(dict.fromkeys("abcde"), 0.1, 0.1, seed=0)
    assert sorted(a.values()).count("train") == 3
    assert {"val", "test"} <= set(a.values())
