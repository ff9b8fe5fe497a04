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


# The default sample's files at these sizes, as the generator has always written them: a change
# to its output (a new draw from the RNG, a reordered field) shows here. The TSVs' JPEG bytes
# depend on Pillow's encoder, so of the TSVs only the ids and their order are pinned.
GOLDEN_KW = dict(seed=3, n_train_queries=60, n_eval_queries=12, gallery_size=30, workers=1)
GOLDEN = {
    "MR_train_queries.jsonl": "4e325bf5d6ec560235a0d1455237b94fea23c4d398af076038ba14f0486d48fe",
    "MR_valid_queries.jsonl": "6d18846bbec779fb4e3830fe75073e556c17bc82c3b5988a4ff5fc29b3ad2abf",
    "MR_test_queries.jsonl": "43571c285b053ef39610d8f761a0f358fa56373af6ca1c8282aad13b8c5f68b9",
    "example_pred.jsonl": "672e6c0d7517e0342850b3a77501961a699892ebba36d7767eaffc0765c2d09e",
    "sample_attributes.json": "578852f6f900e544ef295ac75e95042c9c724c4dac17a8d6cb14f7b0de19109b",
}
GOLDEN_TSV_IDS = {  # sha256 of the ids column, one id per line
    "MR_train_imgs.tsv": "b8b76be60c3a496e7ea1d69cfac2238d8f83c26b1f9b6fd7398a8677f9182320",
    "MR_valid_imgs.tsv": "46109d69ce0f7cb0cf16361620da602e8f7a00fb92071b78cbdc8ddca6717052",
    "MR_test_imgs.tsv": "077a3677f2e11abcc0fbce851aa8eeff13e374af149041bd87022e75ec03062a",
}


def test_the_default_sample_is_the_golden_one(tmp_path):
    make_sample(tmp_path, **GOLDEN_KW)
    assert {f: hashlib.sha256((tmp_path / f).read_bytes()).hexdigest() for f in GOLDEN} == GOLDEN
    ids = {}
    for f in GOLDEN_TSV_IDS:
        with open(tmp_path / f, encoding="ascii") as lines:
            ids[f] = hashlib.sha256("".join(line.split("\t", 1)[0] + "\n" for line in lines).encode()).hexdigest()
    assert ids == GOLDEN_TSV_IDS
