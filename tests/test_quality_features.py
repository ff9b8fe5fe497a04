"""What winning teams add on top of the chain, each proven on tiny inputs: zero-shot export,
ensembles, query-bank re-ranking, weight averaging (EMA and soups), test-time augmentation and
the hard sample."""
import json
import math
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import rerank_topk, tiny_config

from competition import check_submission, read_queries
from competition.topk import exact_topk, predictions_from_positions
from predict.embed import embed_gallery, embed_queries, encode_gallery_images
from predict.ensemble import fuse, parse_weights, weight_grid
from predict.rerank import bank_stats
from predict.runtime import BundleEncoders
from predict.submit import PredictOptions, predict_split

# -- re-ranking ------------------------------------------------------------------------------------
GALLERY = np.array([[1, 0], [0, 1]], np.float32)
BANK = np.array([[1, 0], [1, 0]], np.float32)  # both bank queries are drawn to image 0: a hub
QUERIES = np.array([[0.8, 0.6], [0.6, 0.8]], np.float32)


def test_bank_statistics_by_hand():
    stats = bank_stats(BANK, GALLERY, beta=1.0, bank_block=1, gallery_chunk=1)
    # log Z(g) = log sum_b exp(s(b, g)): image 0 log(2e), image 1 log(2); image 0 is every bank top-1
    np.testing.assert_allclose(stats.log_norm, [1 + math.log(2), math.log(2)], rtol=1e-6)
    assert stats.active.tolist() == [True, False]


def test_qbnorm_matches_a_hand_computed_example():
    stats = bank_stats(BANK, GALLERY, beta=1.0)
    scores, pos = rerank_topk("qbnorm", QUERIES, GALLERY, stats, beta=1.0, k=2)
    # query 0's plain top-1 (image 0) is in the activation set: ranked by s - log Z, the hub drops
    assert pos[0].tolist() == [1, 0]
    np.testing.assert_allclose(scores[0], [0.6 - math.log(2), 0.8 - 1 - math.log(2)], rtol=1e-5)
    # query 1's plain top-1 (image 1) is not: its plain scores are kept (dynamic inverted softmax)
    assert pos[1].tolist() == [1, 0]
    np.testing.assert_allclose(scores[1], [0.8, 0.6], rtol=1e-6)


def test_dual_softmax_matches_a_hand_computed_example():
    stats = bank_stats(BANK, GALLERY, beta=1.0)
    scores, pos = rerank_topk("dual-softmax", QUERIES, GALLERY, stats, beta=1.0, k=2)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # s * p(q | g), the softmax over the bank plus the query = sigmoid(s - log Z)
    q0 = [0.8 * sigmoid(0.8 - 1 - math.log(2)), 0.6 * sigmoid(0.6 - math.log(2))]
    assert pos[0].tolist() == [1, 0]
    np.testing.assert_allclose(scores[0], [q0[1], q0[0]], rtol=1e-5)
    q1 = [0.6 * sigmoid(0.6 - 1 - math.log(2)), 0.8 * sigmoid(0.8 - math.log(2))]
    np.testing.assert_allclose(scores[1], sorted(q1, reverse=True), rtol=1e-5)


def test_reranking_is_exact_in_blocks_against_a_dense_computation():
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    q, g, bank = (unit(rng.standard_normal((n, 8)).astype(np.float32)) for n in (50, 300, 400))
    beta = 20.0
    dense = beta * (bank @ g.T)
    log_z = np.log(np.exp(dense - dense.max(0)).sum(0)) + dense.max(0)
    stats = bank_stats(bank, g, beta, bank_block=64, gallery_chunk=70)
    np.testing.assert_allclose(stats.log_norm, log_z, rtol=1e-5)
    assert np.array_equal(np.flatnonzero(stats.active), np.unique((bank @ g.T).argmax(1)))
    s = q @ g.T
    ref = s / (1 + np.exp(log_z - beta * s))
    _, pos = rerank_topk("dual-softmax", q, g, stats, beta, k=10)
    np.testing.assert_array_equal(pos, np.argsort(-ref, axis=1, kind="stable")[:, :10])


# -- ensembles -------------------------------------------------------------------------------------
def test_fused_inner_product_is_the_weighted_sum():
    rng = np.random.default_rng(1)
    qa, qb, ga, gb = (rng.standard_normal((n, 4)).astype(np.float32) for n in (3, 3, 5, 5))
    fused = fuse([qa, qb], (0.7, 0.3)) @ fuse([ga, gb]).T
    np.testing.assert_allclose(fused, 0.7 * qa @ ga.T + 0.3 * qb @ gb.T, rtol=1e-5)
    assert parse_weights("3,1", 2) == (0.75, 0.25) and parse_weights(None, 2) == (0.5, 0.5)
    assert parse_weights("auto", 3) == "auto" and len(weight_grid(2)) == 11 and len(weight_grid(3)) == 66
    for bad in ("1", "1,-1", "0,0", "a,b"):
        with pytest.raises(ValueError):
            parse_weights(bad, 2)


def test_an_ensemble_of_a_bundle_with_itself_is_the_bundle(tiny_bundle, small_sample, tmp_path):
    opts = PredictOptions(cache_dir=str(tmp_path / "cache"), workers=0)
    alone = predict_split(tiny_bundle, str(small_sample), "valid", str(tmp_path / "one.jsonl"), opts)
    opts.weights = "auto"
    pair = predict_split([tiny_bundle, tiny_bundle], str(small_sample), "valid", str(tmp_path / "two.jsonl"), opts)
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()
    assert pair["mean_recall"] == alone["mean_recall"]
    record = json.loads((tmp_path / "two.ensemble.json").read_text())
    assert record["weights"] == [0.5, 0.5] and len(record["grid"]) == 11  # a tie: the most even weights
    # test split, auto: weights from valid, recorded beside the submission
    predict_split([tiny_bundle, tiny_bundle], str(small_sample), "test", str(tmp_path / "t.jsonl"), opts)
    assert json.loads((tmp_path / "t.ensemble.json").read_text())["chosen"] == "auto (valid grid)"
    assert check_submission(str(small_sample / "MR_test_queries.jsonl"), str(tmp_path / "t.jsonl")).ok


# -- re-ranking and TTA through predict -----------------------------------------------------------
@pytest.mark.parametrize("method", ["qbnorm", "dual-softmax"])
def test_predict_reranks_with_the_train_queries_as_bank(tiny_bundle, small_sample, tmp_path, method, caplog):
    opts = PredictOptions(cache_dir=str(tmp_path / "cache"), workers=0, rerank=method)
    out = tmp_path / "valid.jsonl"
    summary = predict_split(tiny_bundle, str(small_sample), "valid", str(out), opts)
    n_train = len(read_queries(str(small_sample / "MR_train_queries.jsonl")))
    assert summary["rerank"]["bank_queries"] == n_train and summary["rerank"]["method"] == method
    assert summary["rerank"]["beta"] == pytest.approx(json.load(open(os.path.join(tiny_bundle, "manifest.json")))
                                                      ["inverse_temperature"], rel=1e-3)
    assert check_submission(str(small_sample / "MR_valid_queries.jsonl"), str(out)).ok
    # the submission is the re-ranked top 10, computed here from the same embeddings
    enc = BundleEncoders(tiny_bundle, device="cpu")
    gallery = embed_gallery(enc, str(small_sample / "MR_valid_imgs.tsv"), opts.cache_dir, workers=0)
    queries, qfeat = embed_queries(enc, str(small_sample / "MR_valid_queries.jsonl"), opts.cache_dir)
    _, bank = embed_queries(enc, str(small_sample / "MR_train_queries.jsonl"), opts.cache_dir)
    beta = enc.manifest.inverse_temperature  # what predict uses (the summary shows it rounded)
    _, pos = rerank_topk(method, qfeat, gallery.features, bank_stats(bank, gallery.features, beta), beta)
    _, plain = exact_topk(qfeat, gallery.features, k=10)
    assert (pos != plain).any()  # the re-ranking changes some lists: the check below can tell
    written = {json.loads(line)["query_id"]: json.loads(line)["item_ids"] for line in out.read_text().splitlines()}
    assert written == predictions_from_positions(queries, gallery.ids, pos)
    with caplog.at_level("INFO"):
        again = predict_split(tiny_bundle, str(small_sample), "valid", str(out), opts)
    assert "query-bank statistics reused" in caplog.text and again["mean_recall"] == summary["mean_recall"]


def test_hflip_tta_is_the_normalised_mean_of_image_and_mirror(tiny_bundle, small_sample, tmp_path):
    enc = BundleEncoders(tiny_bundle, device="cpu", batch_size=8)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, enc.image_size, enc.image_size, 3), dtype=np.uint8)
    mean = enc.encode_images(pixels) + enc.encode_images(np.ascontiguousarray(pixels[:, :, ::-1]))
    np.testing.assert_allclose(encode_gallery_images(enc, pixels, "hflip"),
                               mean / np.linalg.norm(mean, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    cache = str(tmp_path / "cache")
    tsv = str(small_sample / "MR_valid_imgs.tsv")
    plain = embed_gallery(enc, tsv, cache, workers=0)
    flipped = embed_gallery(enc, tsv, cache, workers=0, tta="hflip")
    assert not flipped.from_cache and not np.allclose(plain.features, flipped.features)  # cached apart
    assert embed_gallery(enc, tsv, cache, workers=0, tta="hflip").from_cache
    assert len(os.listdir(cache)) == 2  # two cache keys: plain and hflip
    np.testing.assert_allclose(np.linalg.norm(flipped.features, axis=1), 1, rtol=1e-5)


# -- weight averaging ------------------------------------------------------------------------------
def test_averaging_two_copies_of_a_run_reproduces_it(runs, small_sample, tmp_path):
    import shutil

    from model.weights import CheckpointError, load_checkpoint
    from train.average import average_runs

    copy = tmp_path / "copy"
    shutil.copytree(runs["dual"], copy)
    soup = average_runs([runs["dual"], str(copy)], str(tmp_path / "soup"), data_dir=str(small_sample))
    original = load_checkpoint(os.path.join(runs["dual"], "best.pt"))
    averaged = load_checkpoint(str(tmp_path / "soup" / "best.pt"))
    for k, v in original["model"].items():
        assert torch.equal(averaged["model"][k], v), k
    assert soup["metrics"]["mean_recall"] == pytest.approx(original["metrics"]["mean_recall"])
    assert (tmp_path / "soup" / "tokenizer").is_dir() and len(soup["soup"]) == 2
    with pytest.raises(CheckpointError, match="different architecture"):  # a dual run and a Chinese-CLIP run
        average_runs([runs["dual"], runs["chinese-clip"]], str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
    (copy / "tokenizer" / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(CheckpointError, match="token"):
        average_runs([runs["dual"], str(copy)], str(tmp_path / "bad"))


def test_average_cli_writes_an_exportable_run(runs, tmp_path):
    from muge_cli import cli

    result = CliRunner().invoke(cli, ["average", runs["dual"], runs["dual"], "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert {"best.pt", "config.yaml", "tokenizer"} <= set(os.listdir(tmp_path / "s"))
    bad = CliRunner().invoke(cli, ["average", runs["dual"], runs["chinese-clip"], "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "nothing written" in bad.output


def test_ema_update_and_warmup():
    from train.ema import ModelEma

    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = ModelEma(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay min(0.9, 2/11): shadow = 9/11
    np.testing.assert_allclose(ema.shadow["weight"].numpy(), 9 / 11, rtol=1e-6)
    with ema.applied(model):
        np.testing.assert_allclose(model.weight.detach().numpy(), 9 / 11, rtol=1e-6)
    assert torch.equal(model.weight.detach(), torch.ones(1, 2))
    with pytest.raises(ValueError):
        ModelEma(model, 1.0)


@pytest.mark.stage
def test_ema_is_scored_each_epoch_and_its_state_resumes(small_sample, tmp_path, monkeypatch):
    from model.weights import load_checkpoint
    from train.config import load_config
    from train.main import train_run

    cfg = tiny_config("dual", "train.epochs=3", "eval.untrained=false", "train.ema=0.5", "data.limit_pairs=64")
    train_run(cfg, str(small_sample), str(tmp_path / "whole"))
    history = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3] and all(0 <= h["ema"]["mean_recall"] <= 100 for h in history)
    whole = load_checkpoint(str(tmp_path / "whole" / "last.pt"))
    assert whole["ema"]["updates"] == whole["step"] > 0
    # killed after epoch 2's checkpoint, then resumed: the EMA goes on from its saved state, exactly
    import train.main

    real, calls = train.main.plot_curves, []

    def killed_at_epoch_2(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(train.main, "plot_curves", killed_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, str(small_sample), str(tmp_path / "split"))
    monkeypatch.undo()
    assert load_checkpoint(str(tmp_path / "split" / "last.pt"))["epoch"] == 2
    train_run(load_config(str(tmp_path / "split" / "config.yaml")), str(small_sample), str(tmp_path / "split"),
              resume=True)
    split = load_checkpoint(str(tmp_path / "split" / "last.pt"))
    assert split["ema"]["updates"] == whole["ema"]["updates"]
    for k, v in whole["ema"]["shadow"].items():
        torch.testing.assert_close(split["ema"]["shadow"][k], v, msg=k)


@pytest.mark.stage
@pytest.mark.parametrize("ema_wins", [True, False], ids=["ema-best", "trained-best"])
def test_best_pt_holds_the_ema_exactly_when_it_scores_higher(small_sample, tmp_path, monkeypatch, ema_wins):
    """Valid scores scripted per call (epoch 1 trained, its EMA, epoch 2 trained, its EMA): best.pt
    then holds the EMA's weights and says so, or the trained weights, and never anything else."""
    import train.main as main
    from model.weights import load_checkpoint

    scripted = iter([10.0, 5.0, 20.0, 30.0 if ema_wins else 15.0])
    real = main.valid_scores
    monkeypatch.setattr(main, "valid_scores", lambda *a, **k: {**real(*a, **k), "mean_recall": next(scripted)})
    best = main.train_run(tiny_config("dual", "train.epochs=2", "eval.untrained=false", "train.ema=0.5",
                                      "data.limit_pairs=64"),
                    str(small_sample), str(tmp_path / "r"))
    saved, last = load_checkpoint(str(tmp_path / "r" / "best.pt")), load_checkpoint(str(tmp_path / "r" / "last.pt"))
    top = 30.0 if ema_wins else 20.0
    assert saved["epoch"] == 2 and best["mean_recall"] == saved["metrics"]["mean_recall"] == top
    assert saved["metrics"].get("weights") == ("ema" if ema_wins else None)
    expected = last["ema"]["shadow"] if ema_wins else last["model"]
    for k, v in expected.items():
        assert torch.equal(saved["model"][k].float(), v.float()), k
    if ema_wins:  # and the EMA is not the trained weights, so the check above could fail
        assert any(not torch.equal(last["model"][k].float(), v) for k, v in expected.items())


# -- zero-shot -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_zero_shot_export_of_a_local_chinese_clip_passes_the_gate_and_predicts(small_sample, tmp_path):
    from conftest import tiny_chinese_clip_dir

    from muge_cli import cli

    weights = tmp_path / "cnclip"
    tiny_chinese_clip_dir(weights, small_sample)
    bundle = tmp_path / "bundles" / "zero-shot"
    result = CliRunner().invoke(cli, ["export", "--pretrained", str(weights), "--out", str(bundle), "--data",
                                      str(small_sample), "--parity-queries", "40", "--parity-gallery", "60"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    source = manifest["source_pretrained"]
    assert source["pretrained"] == str(weights) and len(source["files"]["model.safetensors"]) == 64
    assert manifest["parity"]["passed"] and manifest["family"] == "chinese-clip" and manifest["image_size"] == 32
    assert not [n for n in os.listdir(tmp_path / "bundles") if n.startswith(".pretrained-")]  # staging removed
    summary = predict_split(str(bundle), str(small_sample), "valid", str(tmp_path / "v.jsonl"),
                            PredictOptions(cache_dir=str(tmp_path / "cache"), workers=0))
    assert summary["queries"] == 40
    # the bundle ranks as the weights do in PyTorch, loaded straight from the directory
    from conftest import brute_force_top10, overlap, submission_lists, torch_encoders

    from competition import ImageTSV, read_queries
    from competition.preprocess import TextTokenizer
    from model.config import ModelConfig
    from model.factory import create_model

    model, _ = create_model(ModelConfig(family="chinese-clip", name=str(weights)))
    encoders = torch_encoders(model, TextTokenizer(bundle / "tokenizer", manifest["max_text_length"]))
    expected = brute_force_top10(*encoders, read_queries(small_sample / "MR_valid_queries.jsonl"),
                                 ImageTSV(str(small_sample / "MR_valid_imgs.tsv")), 32)
    assert overlap(submission_lists(tmp_path / "v.jsonl"), expected) >= 0.99
    missing = CliRunner().invoke(cli, ["export", "--pretrained", str(tmp_path / "nowhere"), "--out",
                                       str(tmp_path / "b2"), "--data", str(small_sample)])
    assert missing.exit_code == 1 and "no bundle written" in missing.output and not (tmp_path / "b2").exists()


# -- the hard sample -------------------------------------------------------------------------------
@pytest.mark.stage
def test_hard_sample_keeps_the_layout_with_fewer_positives(tmp_path):
    from competition.sample import EASY, HARD, make_sample

    kw = dict(seed=3, n_train_queries=60, n_eval_queries=12, gallery_size=30, workers=1)
    easy = make_sample(tmp_path / "easy", **kw)  # the default; its bytes are pinned in test_sample.py
    hard = make_sample(tmp_path / "hard", **{**kw, "difficulty": HARD})
    assert hard["difficulty"] == "hard" and easy["difficulty"] == "easy"
    assert hard["valid_positives_mean"] < easy["valid_positives_mean"]
    attrs = json.loads((tmp_path / "hard" / "sample_attributes.json").read_text())
    assert {c for _, c, _ in attrs.values()} - set(EASY.colours)  # near shades occur
    for split in ("valid", "test"):
        queries = read_queries(str(tmp_path / "hard" / f"MR_{split}_queries.jsonl"))
        assert len(queries) == 12
    make_sample(tmp_path / "hard2", **{**kw, "difficulty": HARD})  # deterministic for a seed
    for name in ("MR_valid_imgs.tsv", "MR_train_queries.jsonl"):
        assert (tmp_path / "hard" / name).read_bytes() == (tmp_path / "hard2" / name).read_bytes()
