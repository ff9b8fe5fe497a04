import hashlib
import json

from competition import ImageTSV, read_queries
from competition.queries import ground_truth_not_in_gallery
from competition.sample import make_sample

FILES = ["MR_train_imgs.tsv", "MR_train_queries.jsonl", "MR_valid_imgs.tsv", "MR_valid_queries.jsonl",
         "MR_test_imgs.tsv", "MR_test_queries.jsonl"]


def test_layout_schema_and_consistency(small_sample):
    for name in FILES + ["example_pred.jsonl"]:
        assert (small_sample / name).stat().st_size > 0, name
    ids = {}
    for split in ("train", "valid", "test"):
        tsv = ImageTSV(str(small_sample / f"MR_{split}_imgs.tsv"))
        queries = read_queries(small_sample / f"MR_{split}_queries.jsonl", require_ids=split != "test")
        if split != "test":
            assert not ground_truth_not_in_gallery(queries, tsv.__contains__)
        ids[split] = (set(tsv.ids.tolist()), {q.query_id for q in queries}, {q.text for q in queries})
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        for k in range(3):
            assert not ids[a][k] & ids[b][k], (a, b, k)  # splits share no images, queries or texts
    valid = read_queries(small_sample / "MR_valid_queries.jsonl")
    assert sum(len(q.item_ids) for q in valid) / len(valid) > 2  # several positives per query
    train = read_queries(small_sample / "MR_train_queries.jsonl")
    assert all(1 <= len(q.item_ids) <= 2 for q in train)
    first = json.loads((small_sample / "MR_test_queries.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"query_id", "query_text"}


def test_deterministic_for_a_seed(tmp_path):
    def digest(d):
        return {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in FILES}

    kw = dict(seed=3, n_train_queries=30, n_eval_queries=10, gallery_size=20, workers=1)
    make_sample(tmp_path / "a", **kw)
    make_sample(tmp_path / "b", **dict(kw, workers=2))
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
