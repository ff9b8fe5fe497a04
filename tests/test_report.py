"""`muge report`: the data it shows, its self-containment, and the page in a real headless Chromium."""
import json
import re
import struct
from dataclasses import dataclass

import numpy as np
import pytest
from click.testing import CliRunner

from competition import ImageTSV, read_queries
from report.build import report_data
from report.cli import report


def _predictions(queries, gallery_ids, path, seed, miss_every) -> dict[int, int]:
    """Top-10 lists with the first ground truth put at a rank chosen per query (a miss every
    `miss_every` queries), the rest filled with non-truth gallery ids. Returns the planned first-hit
    rank of each query (0: a miss): what the report must show, known without any scorer."""
    rng = np.random.default_rng(seed)
    planned = {}
    with open(path, "w", encoding="utf-8") as f:
        for q in queries:
            others = [i for i in rng.permutation(gallery_ids).tolist() if i not in set(q.item_ids)][:10]
            rank = int(rng.integers(1, 11))
            planned[q.query_id] = rank if q.query_id % miss_every else 0
            if planned[q.query_id]:
                others[rank - 1] = q.item_ids[0]
            f.write(json.dumps({"query_id": q.query_id, "query_text": q.text, "item_ids": others}) + "\n")
    return planned


@pytest.fixture(scope="module")
def two_runs(small_sample, tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    queries = str(small_sample / "MR_valid_queries.jsonl")
    images = str(small_sample / "MR_valid_imgs.tsv")
    gallery = ImageTSV(images).ids.tolist()
    gt = read_queries(queries, require_ids=True)
    planned = {"a": _predictions(gt, gallery, d / "a.jsonl", seed=1, miss_every=4),
               "b": _predictions(gt, gallery, d / "b.jsonl", seed=2, miss_every=3)}
    return {"queries": queries, "images": images, "a": str(d / "a.jsonl"), "b": str(d / "b.jsonl"), "gt": gt,
            "dir": d, "planned": planned}


def _expected_metrics(planned: dict[int, int]) -> dict:
    """R@1/5/10 and MeanRecall (x100) of the planned ranks, by their definition."""
    ranks = list(planned.values())
    recall = {k: 100 * sum(0 < r <= k for r in ranks) / len(ranks) for k in (1, 5, 10)}
    return {"r1": recall[1], "r5": recall[5], "r10": recall[10], "mean_recall": sum(recall.values()) / 3}


@dataclass
class Planned:
    mean_recall: float
    first_hit: np.ndarray  # per ground-truth query, in file order; 0 = a miss


def _planned(r, name) -> Planned:
    ranks = r["planned"][name]
    return Planned(_expected_metrics(ranks)["mean_recall"], np.array([ranks[q.query_id] for q in r["gt"]]))


def test_report_data_matches_the_planned_ranks(two_runs, runs):
    r = two_runs
    data = report_data(r["queries"], r["images"], [r["a"], r["b"]], run_dir=runs["dual"], workers=1)
    for run, name in zip(data["runs"], "ab"):
        expected = _expected_metrics(r["planned"][name])
        assert {k: run["metrics"][k] for k in expected} == pytest.approx(expected)
        ranks = list(r["planned"][name].values())
        assert run["histogram"] == [ranks.count(k) for k in range(1, 11)] + [ranks.count(0)]
    assert data["runs"][0]["histogram"][-1] > 0
    by_id = {q["id"]: q for q in data["queries"]}
    assert {qid: q["rank"] for qid, q in by_id.items()} == {
        qid: [r["planned"]["a"][qid], r["planned"]["b"][qid]] for qid in r["planned"]["a"]}
    # thumbnails: exactly the images some query shows, no other gallery image
    shown = {i for q in data["queries"] for run in range(2) for i in q["top"][run] + q["missed"][run][:10]}
    assert set(map(int, data["thumbs"])) == shown
    q = next(q for q in data["queries"] if q["rank"][0] == 0)
    assert set(q["missed"][0]) == set(q["gt"])  # a miss: every truth is missed


def test_report_file_is_self_contained(two_runs, tmp_path):
    out = tmp_path / "r.html"
    res = CliRunner().invoke(report, ["--queries", two_runs["queries"], "--images", two_runs["images"],
                                      "--pred", two_runs["a"], "--out", str(out), "--workers", "1"])
    assert res.exit_code == 0, res.output
    html = out.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", html)
    assert html.count("<script") == 2 and "__DATA__" not in html
    assert f"{out.stat().st_size / 2**20:.1f} MiB" in res.output


def test_invalid_prediction_file_is_refused(two_runs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = open(two_runs["a"]).read().splitlines()
    obj = json.loads(lines[3])
    obj["item_ids"] = obj["item_ids"][:9]
    bad.write_text("\n".join(lines[:3] + [json.dumps(obj)] + lines[4:]) + "\n")
    out = tmp_path / "r.html"
    res = CliRunner().invoke(report, ["--queries", two_runs["queries"], "--images", two_runs["images"],
                                      "--pred", str(bad), "--out", str(out)])
    assert res.exit_code != 0 and f"{bad}:4" in res.output and not out.exists()


def _png_size(path):
    head = open(path, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's chromium and chromium-driver


class Page:
    """A Selenium-driven headless Chromium page: JavaScript in, values out."""

    def __init__(self, driver):
        self.driver = driver

    def open(self, url: str) -> None:
        self.driver.get(url)

    def js(self, expression: str):
        return self.driver.execute_script(f"return ({expression});")

    def console_errors(self) -> list[str]:
        return [e["message"][:300] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def screenshot(self, path: str) -> None:
        assert self.driver.save_screenshot(path)


@pytest.fixture(scope="module")
def browser():
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            pytest.fail(f"{path} not found: `make test` installs Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # no sandbox (root in CI), no network chatter (this machine's closed network), a fixed viewport
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    # the page's viewport itself 1280 x 900 (a window of that size leaves less to the page)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})
    yield Page(driver)
    driver.quit()


def test_report_renders_and_filters_in_chromium(two_runs, runs, browser, tmp_path):
    r = two_runs
    out = tmp_path / "compare.html"
    res = CliRunner().invoke(report, ["--queries", r["queries"], "--images", r["images"], "--pred", r["a"],
                                      "--pred", r["b"], "--run", runs["dual"], "--out", str(out)])
    assert res.exit_code == 0, res.output
    sa, sb = _planned(r, "a"), _planned(r, "b")
    browser.open(out.as_uri())
    js = browser.js
    assert js("document.body.dataset.ready") == "1", browser.console_errors()
    # the summary: both runs' metrics and the B - A row, histograms, the training curves
    cells = js("[...document.querySelectorAll('table.metrics tr')].map(r => r.innerText.split('\\t'))")
    assert cells[1][0] == "A" and float(cells[1][4]) == pytest.approx(sa.mean_recall, abs=0.005)
    assert cells[2][0] == "B" and float(cells[2][4]) == pytest.approx(sb.mean_recall, abs=0.005)
    assert cells[3][0] == "B - A"
    assert js("document.querySelectorAll('.hist').length") == 2 and js("!!document.querySelector('#curves polyline')")
    # the first page: 25 cards, each with its top-10 thumbnails decoded by the browser
    assert js("document.querySelectorAll('.query').length") == 25
    first = js("[...document.querySelectorAll('.query')[0].querySelectorAll('.row.top10 img')]"
               ".map(i => i.complete && i.naturalWidth > 0)")
    assert len(first) == 20 and all(first)  # A's and B's top 10
    assert js("document.querySelectorAll('.query figure.gt').length") > 0
    browser.screenshot(str(tmp_path / "report.png"))
    assert _png_size(tmp_path / "report.png") == (1280, 900)

    def shown_ranks(run):
        return js("[...document.querySelectorAll('.query')]"
                  f".map(q => +q.querySelectorAll('.badge')[{run}].dataset.rank)")

    def click(selector):
        js(f"document.querySelector({json.dumps(selector)}).click()")
        return int(js("document.body.dataset.matching"))

    # filters act on the ranks of B (the run being inspected) until A is chosen
    assert click("[data-filter=miss]") == int((sb.first_hit == 0).sum()) and set(shown_ranks(1)) == {0}
    assert click("[data-filter=top1]") == int((sb.first_hit == 1).sum()) and set(shown_ranks(1)) <= {1}
    n = click("[data-filter=top2_10]")
    assert n == int(((sb.first_hit >= 2) & (sb.first_hit <= 10)).sum()) and min(shown_ranks(1)) >= 2
    click("[data-view=A]")
    assert click("[data-filter=miss]") == int((sa.first_hit == 0).sum()) and set(shown_ranks(0)) == {0}
    key_a, key_b = np.where(sa.first_hit == 0, 11, sa.first_hit), np.where(sb.first_hit == 0, 11, sb.first_hit)
    assert click("[data-filter=better]") == int((key_b < key_a).sum())
    assert click("[data-filter=worse]") == int((key_b > key_a).sum())
    net = js("document.getElementById('net').innerText")
    assert f"higher on {int((key_b < key_a).sum())} queries and lower on {int((key_b > key_a).sum())}" in net
    # hardest first, paging, and the state in the URL
    assert click("[data-filter=all]") == len(r["gt"])
    ranks = shown_ranks(0)
    keys = [11 if x == 0 else x for x in ranks]
    assert keys == sorted(keys, reverse=True)
    js("document.getElementById('next').click()")
    assert js("document.getElementById('page-info').innerText").startswith("page 2 of 2")
    assert "filter=all" in js("location.hash") and "page=2" in js("location.hash")
    browser.screenshot(str(tmp_path / "report-page2.png"))
    assert not browser.console_errors()


def _strict_json(text: str):
    """JSON as a browser's JSON.parse reads it: bare NaN / Infinity are errors."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_a_diverged_runs_history_makes_a_page_that_loads(two_runs, tmp_path):
    """A run whose loss (or a score) is NaN or infinite: the page's data is still JSON the browser
    parses, with those values null; a metrics.jsonl that is not UTF-8 or mistyped is named."""
    run = tmp_path / "run"
    run.mkdir()
    lines = ['{"epoch": 0, "step": 0, "train_loss": null, "samples_per_s": null, "r1": 1.0, "r5": 2.0, "r10": 3.0, '
             '"mean_recall": 2.0, "mrr": 1.0}',
             '{"epoch": 1, "step": 5, "train_loss": NaN, "samples_per_s": Infinity, "r1": 1.0, "r5": 2.0, '
             '"r10": 3.0, "mean_recall": -Infinity, "mrr": 1.0}']
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "r.html"
    args = ["--queries", two_runs["queries"], "--images", two_runs["images"], "--pred", two_runs["a"], "--out",
            str(out), "--workers", "1", "--run", str(run)]
    res = CliRunner().invoke(report, args)
    assert res.exit_code == 0, res.output
    blob = re.search(r'<script id="data" type="application/json">(.*?)</script>', out.read_text(encoding="utf-8"),
                     re.S).group(1)
    history = _strict_json(blob)["history"]
    assert history[1]["train_loss"] is None and history[1]["mean_recall"] is None and history[1]["r1"] == 1.0
    for bad, message in ((b'{"epoch": 0, "step": 0}\n{"epoch": 1, "step": 3, "train_loss": 1.5\xff}\n',
                          "metrics.jsonl:2: not UTF-8 text"),
                         (b'{"epoch": "nine", "step": 3}\n', "metrics.jsonl:1: epoch='nine': expected int"),
                         (b'{"epoch": 1, "step": -3}\n', "metrics.jsonl:1: step=-3: expected a count"),
                         (b'{"epoch": 1, "step": 3, "loss": 2.0}\n', "unknown epoch record key loss")):
        (run / "metrics.jsonl").write_bytes(bad)
        res = CliRunner().invoke(report, args)
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output
