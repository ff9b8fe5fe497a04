"""`muge plan`: the settings that fit a card, by the training memory model (`train.memory`), checked
at a tiny shape (its figures measured as `muge bench scale` measures the presets'), and at the
published shapes through the shipped memory model."""
import json

import pytest
from conftest import accepted, muge, refused
from tiny import tiny_config

import train.plan as planning
from train.memory import GIB, measure, pair_key, total_bytes


@pytest.fixture(scope="module")
def tiny_entry():
    """The memory model's entry of a tiny Chinese-CLIP: a full fine-tune's figures and LoRA's."""
    runs = {}
    for rank in (0, planning.LORA_RANK):
        figures = measure(tiny_config("chinese-clip", f"train.lora.rank={rank}"))
        runs[str(rank)] = {k: v for k, v in figures.items() if k not in ("model", "optimizer")}
    return {"batch_size": 64, "runs": runs}


def _fits(plan, entry) -> float:
    """The plan's total, recomputed by the memory model from the entry's figures."""
    figures = entry["runs"]["0" if plan.mode == "full" else str(planning.LORA_RANK)]
    return total_bytes(figures, plan.chunk, plan.checkpointing, plan.mask_ratio, plan.gpus) / GIB


def test_the_memory_model_measures_what_each_setting_holds(tiny_entry):
    full, lora = tiny_entry["runs"]["0"], tiny_entry["runs"][str(planning.LORA_RANK)]
    assert lora["trainable"] < full["trainable"] and lora["state_bytes"] < full["state_bytes"]
    assert full["state_bytes"] == 16 * full["params"]  # weights, gradients, two AdamW moments: fp32 each
    pairs = full["per_pair_bytes"]
    assert set(pairs) == {pair_key(c, m) for c in (False, True) for m in (0.0, 0.5)}
    assert pairs[pair_key(True, 0.0)] < pairs[pair_key(False, 0.0)]  # checkpointing holds less a pair
    assert pairs[pair_key(False, 0.5)] < pairs[pair_key(False, 0.0)]  # and so does FLIP


def test_a_measured_forward_is_freed():
    """exp saves its own output for backward: counted, then dropped with its graph (held by the
    graph it would stay, and at ViT-H/14's shape eight measured forwards outgrew a 24 GB machine)."""
    import gc
    import weakref

    import torch

    from train.memory import _saved_bytes

    x, outputs = torch.randn(64, 64, requires_grad=True), []

    def forward():
        y = torch.exp(x)
        outputs.append(weakref.ref(y))
        return y

    assert _saved_bytes(forward) == 64 * 64 * 4  # exp runs in fp32 under autocast: its output, counted
    gc.collect()
    assert outputs[0]() is None


def test_a_plan_fits_the_card_it_is_made_for_and_prefers_in_order(tiny_entry, monkeypatch):
    """At a tiny shape the fixed margin would be the whole card: it is set to 0 here (the share
    stays), so the arithmetic itself is what is checked, card by card, from roomy to too small."""
    monkeypatch.setattr(planning, "MARGIN_GIB", 0.0)
    smallest = planning.smallest_card("tiny", tiny_entry)
    full = tiny_entry["runs"]["0"]
    roomy = (total_bytes(full, 64, False, 0.0) / GIB) / (1 - planning.MARGIN_SHARE) * 1.01
    seen = []
    for card in (roomy, *(smallest * f for f in (20, 8, 4, 2, 1.3, 1.0))):
        plan = planning.make_plan("tiny", tiny_entry, card)
        assert _fits(plan, tiny_entry) == pytest.approx(plan.total_gib) and plan.total_gib <= planning.budget(card)
        assert plan.per_gpu_batch == 64 and plan.global_batch == 64  # never a smaller batch
        seen.append((plan.mode, plan.mask_ratio, plan.checkpointing, plan.chunk))
        assert plan.set_line().startswith("--set train.batch_size=64 --set train.grad_cache_chunk=")
    assert seen[0] == ("full", 0.0, False, 64)  # room for all: a full fine-tune, the whole batch at once
    assert seen[-1][0] == "lora" and seen[-1][3] == planning.MIN_CHUNK  # the leanest setting, at the smallest card
    order = [planning.CANDIDATES.index((m, r, c)) for m, r, c, _ in seen]
    assert order == sorted(order)  # a smaller card never gets a setting the order puts before a roomier card's
    with pytest.raises(planning.PlanError, match="the smallest card that fits has"):
        planning.make_plan("tiny", tiny_entry, smallest * 0.95)


def test_several_gpus_split_the_batch_and_hold_ddp_buckets(tiny_entry, monkeypatch):
    monkeypatch.setattr(planning, "MARGIN_GIB", 0.0)
    card = planning.smallest_card("tiny", tiny_entry) * 30
    one, four = planning.make_plan("tiny", tiny_entry, card), planning.make_plan("tiny", tiny_entry, card, gpus=4)
    assert four.per_gpu_batch == 16 and four.global_batch == one.global_batch == 64
    assert four.ddp_gib > 0 == one.ddp_gib and _fits(four, tiny_entry) == pytest.approx(four.total_gib)
    three = planning.make_plan("tiny", tiny_entry, card, gpus=3)
    assert three.per_gpu_batch == 22 and "makes it 66 (never less than asked)" in three.notes[0]


def test_another_global_batch_is_planned_and_a_smaller_one_says_what_it_costs(tiny_entry, monkeypatch):
    monkeypatch.setattr(planning, "MARGIN_GIB", 0.0)
    card = planning.smallest_card("tiny", tiny_entry, global_batch=256) * 1.2
    larger = planning.make_plan("tiny", tiny_entry, card, global_batch=256)
    assert larger.global_batch == larger.per_gpu_batch == 256 and larger.chunk < 256
    assert not any("below the recipe" in note for note in larger.notes)
    assert _fits(larger, tiny_entry) == pytest.approx(larger.total_gib) and larger.total_gib <= planning.budget(card)
    smaller = planning.make_plan("tiny", tiny_entry, card, gpus=2, global_batch=32)
    assert smaller.per_gpu_batch == 16 and "below the recipe's 64" in smaller.notes[0]
    assert "#396" in smaller.notes[0]


@pytest.mark.parametrize("args, fragments", [
    (["--preset", "cnclip-vit-h14", "--gpu-memory", "24"], ["--set train.batch_size=1024", "within"]),
    (["--preset", "configs/cnclip-vit-b16.yaml", "--gpu-memory", "80"], ["a full fine-tune", "train.lora.rank=0"]),
    (["--preset", "cnclip-vit-h14", "--gpu-memory", "80", "--gpus", "8"], ["128 pairs a GPU"]),
    (["--preset", "cnclip-vit-b16", "--gpu-memory", "24", "--global-batch", "1024"],
     ["--set train.batch_size=1024", "a global batch of 1024", "a gradient cache of"]),
])
def test_plan_on_the_published_shapes(tmp_path, args, fragments):
    accepted(muge("plan", *args, "--json", tmp_path / "plan.json"), *fragments)
    plan = json.loads((tmp_path / "plan.json").read_text())
    entry = planning.read_memory_model()["presets"][plan["preset"]]
    figures = entry["runs"]["0" if plan["mode"] == "full" else str(planning.LORA_RANK)]
    total = total_bytes(figures, plan["chunk"], plan["checkpointing"], plan["mask_ratio"], plan["gpus"]) / GIB
    assert total == pytest.approx(plan["total_gib"]) and total <= planning.budget(plan["gpu_memory_gib"])


def test_a_card_too_small_is_refused_naming_the_smallest_that_fits():
    result = refused(muge("plan", "--preset", "cnclip-vit-h14", "--gpu-memory", "4"),
                     "cnclip-vit-h14 does not fit a 4 GiB card", "the smallest card that fits has")
    smallest = float(result.output.split("the smallest card that fits has ")[1].split(" GiB")[0])
    accepted(muge("plan", "--preset", "cnclip-vit-h14", "--gpu-memory", str(smallest)))
    refused(muge("plan", "--preset", "cnclip-vit-nope", "--gpu-memory", "24"), "has no figures for it")


@pytest.mark.parametrize("content, message", [
    (None, "no memory model here; `make bench-scale` measures one"),
    ("{not json", "not a memory model (Expecting property name"),
    ('{"kind": "x"}', "not a memory model (no presets)"),
])
def test_a_missing_or_foreign_memory_model_is_named(tmp_path, monkeypatch, content, message):
    path = tmp_path / "memory_model.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setattr(planning, "MEMORY_MODEL", str(path))
    monkeypatch.setattr(planning.read_memory_model, "__defaults__", (str(path),))
    refused(muge("plan", "--preset", "cnclip-vit-b16", "--gpu-memory", "24"), f"{path}: {message}")
