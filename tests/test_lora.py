"""LoRA (`train.lora`): a step equals peft's own reference step, the frozen weights stay as they
were, a run resumes exactly, and its best.pt is the plain model with the adapters merged."""
import copy
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import accepted, muge, refused
from tiny import CNCLIP_SHAPED, tiny_config

from bench.shapes import setting
from model.config import LoraConfig, read_lora
from model.factory import build_from_arch, create_model, run_model
from model.lora import add_lora, merged_state_dict
from model.weights import load_checkpoint, safe_load
from train.guard import DivergenceGuard
from train.loss import ClipLoss
from train.optim import apply_freeze, create_optimizer
from train.precision import grad_scaler
from train.scheduler import create_scheduler
from train.step import StepParts, train_step

LR, CPU = 1e-2, torch.device("cpu")


def _batch(n: int = 6, size: int = 32, vocab: int = 60):
    g = torch.Generator().manual_seed(3)
    return {"pixels": torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g),
            "input_ids": torch.randint(5, vocab, (n, 10), generator=g), "attention_mask": torch.ones(n, 10).long(),
            "image_ids": torch.arange(n), "query_ids": torch.arange(n)}


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_a_lora_step_is_pefts_own(small_sample, variant):
    """Ours: `train.lora` through `add_lora`, `apply_freeze`, `create_optimizer` and `train_step`.
    Peft's: `get_peft_model` on the same ChineseCLIPModel (peft's own wrapping and freezing), the
    heads and logit scale trainable, one plain AdamW step on the same loss. Plain LoRA, rsLoRA
    (alpha / sqrt(rank)) and DoRA (a learned magnitude per output) alike."""
    import peft

    flags = {"use_rslora": variant == "rslora", "use_dora": variant == "dora"}
    cfg = tiny_config("chinese-clip", f"train.lr={{head: {LR}, text: {LR}, image: {LR}}}", "train.weight_decay=0",
                      "train.grad_clip=null", "train.warmup_steps=0", "train.lora.rank=4", "train.lora.alpha=8",
                      *(f"train.lora.{k}={str(v).lower()}" for k, v in flags.items()))
    torch.manual_seed(0)
    start, _ = create_model(cfg.model, 60)
    ours, theirs = copy.deepcopy(start), copy.deepcopy(start)
    torch.manual_seed(1)  # the adapters' random start (lora_A), drawn in the same order by both
    add_lora(ours, cfg.train.lora)
    apply_freeze(ours, cfg.train.freeze)
    optimizer = create_optimizer(ours, cfg.train)
    parts = StepParts(ClipLoss(), optimizer, create_scheduler(optimizer, 0, 10), grad_scaler("fp32", CPU), "fp32", CPU,
                      DivergenceGuard(5, CPU))
    torch.manual_seed(1)
    targets = start.lora_targets("text") + start.lora_targets("image")  # the family's default set
    wrapped = peft.get_peft_model(theirs.clip, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **flags))
    theirs.clip = wrapped
    heads = [p for n, p in wrapped.named_parameters() if n.endswith(("projection.weight", "logit_scale"))]
    for p in heads:
        p.requires_grad_(True)
    trained = [p for p in wrapped.parameters() if p.requires_grad]
    adapters = [p for n, p in wrapped.named_parameters() if p.requires_grad and ".lora_" in n]
    their_optimizer = torch.optim.AdamW([{"params": heads}, {"params": adapters, "lr": LR * cfg.train.lora.lr_ratio}],
                                        lr=LR, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)  # the default ratio

    for model in (ours, theirs):
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if hasattr(module, "attention_dropout"):  # transformers' attention takes it as a float
                module.attention_dropout = 0.0
    batch = _batch()
    loss, _ = train_step(parts, ours, batch)
    image, text, log_scale = theirs(batch["pixels"], batch["input_ids"], batch["attention_mask"])
    their_loss, _ = ClipLoss()(image, text, log_scale, batch["image_ids"], batch["query_ids"])
    their_loss.backward()
    their_optimizer.step()
    theirs.clamp_logit_scale()
    assert torch.allclose(loss, their_loss.detach(), atol=1e-6)
    our_state = {k.removeprefix("clip."): v for k, v in ours.state_dict().items()}
    their_state = {k.removeprefix("clip.base_model.model."): v for k, v in theirs.state_dict().items()}
    assert our_state.keys() == their_state.keys()
    changed = [k for k in our_state if not torch.equal(our_state[k], start.state_dict().get("clip." + k, our_state[k]))]
    assert changed and all(".lora_" in k or k.endswith(("projection.weight", "logit_scale")) for k in changed)
    for key in our_state:
        assert torch.allclose(our_state[key], their_state[key], atol=1e-6), key
    assert sum(1 for s in optimizer.state.values() if s) == len(trained)  # no optimizer state for frozen weights


LORA_RUN = ("train.epochs=2", "data.limit_pairs=96", "train.lora.rank=4", "train.ema=0.9",
            setting("model.config", CNCLIP_SHAPED))


@pytest.fixture(scope="module")
def lora_run(small_sample, tmp_path_factory):
    """Two epochs of LoRA, with an EMA of the weights (adapters included) scored each epoch, at a
    shape cn_clip's own `CLIP` builds."""
    from train.main import train_run

    out = tmp_path_factory.mktemp("lora") / "run"
    train_run(tiny_config("chinese-clip", *LORA_RUN), str(small_sample), str(out))
    return out


def _last_pt_model(run):
    """The run's last.pt as training holds it: the frozen weights with their peft adapters (not merged)."""
    last = load_checkpoint(str(run / "last.pt"))
    model = build_from_arch(last["arch"])
    add_lora(model, read_lora(last["config"], "last.pt"))
    model.load_state_dict(last["model"])
    return model.eval()


@pytest.mark.slow
def test_a_lora_runs_last_pt_goes_out_in_every_format(lora_run, small_sample, tmp_path):
    """`--checkpoint last` of a LoRA run merges its adapters as best.pt's are: the bundle passes its
    gate (and so does `--pretrained RUN/last.pt`), the transformers directory and the cn_clip file
    each embed as last.pt's model does, in their own libraries; the card says LoRA and names no
    path of this machine."""
    from tiny import cn_clip_of
    from transformers import ChineseCLIPModel

    model = _last_pt_model(lora_run)
    g = _batch(3, vocab=model.text_vocab_rows)
    with torch.no_grad():
        text, image = model.encode_text(g["input_ids"], g["attention_mask"]), model.encode_image(g["pixels"])
    fast = ["--parity-queries", "20", "--parity-gallery", "30"]
    accepted(muge("export", lora_run, "--checkpoint", "last", "--out", tmp_path / "bundle", "--data", small_sample,
                  *fast))
    assert json.loads((tmp_path / "bundle" / "manifest.json").read_text())["source_checkpoint"].endswith("last.pt")
    accepted(muge("export", "--pretrained", lora_run / "last.pt", "--out", tmp_path / "b2", "--data", small_sample,
                  *fast))
    accepted(muge("export", lora_run, "--checkpoint", "last", "--format", "hf", "--out", tmp_path / "hf"))
    hf = ChineseCLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
    accepted(muge("export", lora_run, "--checkpoint", "last", "--format", "cnclip", "--out", tmp_path / "x.pt"))
    cnclip = cn_clip_of(hf.config)
    cnclip.load_state_dict({k[len("module."):]: v for k, v in safe_load(str(tmp_path / "x.pt"))["state_dict"].items()})
    with torch.no_grad():
        pixels = model.pixels(g["pixels"])
        for theirs, ours in ((hf.get_text_features(input_ids=g["input_ids"], attention_mask=g["attention_mask"]), text),
                             (hf.get_image_features(pixel_values=pixels), image),
                             (cnclip.encode_text(g["input_ids"]), text), (cnclip.encode_image(pixels), image)):
            theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output
            assert torch.allclose(F.normalize(theirs, dim=-1), ours, atol=1e-5)
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    assert "rank 4, alpha 16.0" in card and "adapters merged" in card and "`last.pt`" in card
    assert str(tmp_path) not in card and str(lora_run) not in card


@pytest.mark.stage
def test_resuming_with_other_lora_settings_is_refused_naming_the_key(lora_run, runs, small_sample, tmp_path):
    run, full = tmp_path / "lora", tmp_path / "full"
    shutil.copytree(lora_run, run)
    shutil.copytree(runs["chinese-clip"], full)
    before = (run / "last.pt").read_bytes()
    for target, setting_, message in ((run, "train.lora.rank=8", "train.lora.rank=4 (now 8)"),
                                      (run, "train.lora.alpha=4", "train.lora.alpha=16.0 (now 4"),
                                      (run, "train.lora.text_targets=[query]", "train.lora.text_targets=None (now"),
                                      (run, "train.lora.rank=0", "train.lora.rank=4 (now 0)"),
                                      (full, "train.lora.rank=4", "train.lora.rank=0 (now 4)")):
        refused(muge("train", "--resume", target, "--data", small_sample, "--set", setting_), message,
                "resume with them, or start a new run")
    assert (run / "last.pt").read_bytes() == before


@pytest.mark.slow
def test_best_pt_is_the_plain_model_with_the_adapters_merged(lora_run, small_sample, tmp_path):
    last, best = load_checkpoint(str(lora_run / "last.pt")), load_checkpoint(str(lora_run / "best.pt"))
    assert any(".lora_" in k for k in last["model"]) and not any(".lora_" in k or "base_layer" in k
                                                                   for k in best["model"])
    plain = build_from_arch(best["arch"])
    assert list(best["model"]) == list(plain.state_dict())  # the plain architecture's keys, in its order
    model = build_from_arch(last["arch"])
    add_lora(model, read_lora(last["config"], "last.pt"))
    model.load_state_dict(last["model"])
    plain.load_state_dict(merged_state_dict(model))
    g = _batch(3, vocab=model.text_vocab_rows)
    with torch.no_grad():
        model.eval(), plain.eval()
        assert torch.allclose(model.encode_text(g["input_ids"], g["attention_mask"]),
                              plain.encode_text(g["input_ids"], g["attention_mask"]), atol=1e-5)
        assert torch.allclose(model.encode_image(g["pixels"]), plain.encode_image(g["pixels"]), atol=1e-5)
    bundle = tmp_path / "bundle"  # the merged model, through the gate, into predict
    assert muge("export", str(lora_run), "--out", str(bundle), "--data", str(small_sample), "--parity-queries", "30",
                "--parity-gallery", "40").exit_code == 0
    result = muge("predict", "--bundle", str(bundle), "--data", str(small_sample), "--split", "valid", "--out",
                  str(tmp_path / "valid.jsonl"), "--cache-dir", str(tmp_path / "cache"), "--workers", "0")
    assert result.exit_code == 0, result.output


def test_a_lora_run_goes_out_as_a_transformers_directory(lora_run, small_sample, tmp_path):
    """`--format hf` writes the merged model: plain weights, no adapter, and transformers' features
    equal the run's torch model."""
    from safetensors import safe_open
    from transformers import ChineseCLIPModel

    out = tmp_path / "hf"
    result = muge("export", str(lora_run), "--format", "hf", "--out", str(out), "--data", str(small_sample))
    assert result.exit_code == 0, result.output
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.keys() and not any(".lora_" in k or "base_layer" in k for k in f.keys())
    ours, theirs = run_model(str(lora_run)).model, ChineseCLIPModel.from_pretrained(str(out)).eval()
    g = _batch(3, vocab=ours.text_vocab_rows)
    with torch.no_grad():
        text = theirs.get_text_features(input_ids=g["input_ids"], attention_mask=g["attention_mask"])
        image = theirs.get_image_features(pixel_values=ours.pixels(g["pixels"]))
        for out_, mine in ((text, ours.encode_text(g["input_ids"], g["attention_mask"])),
                           (image, ours.encode_image(g["pixels"]))):
            features = out_ if isinstance(out_, torch.Tensor) else out_.pooler_output
            assert torch.allclose(torch.nn.functional.normalize(features, dim=-1), mine, atol=1e-5)


@pytest.mark.stage
def test_the_frozen_weights_stay_and_a_killed_lora_run_resumes_exactly(lora_run, small_sample, tmp_path,
                                                                      monkeypatch):
    import train.main
    from train.config import load_config
    from train.main import train_run

    cfg = tiny_config("chinese-clip", *LORA_RUN)

    def killed(history, path):
        if len(history) >= 2:  # after epoch 1's last.pt
            raise KeyboardInterrupt

    monkeypatch.setattr(train.main, "plot_curves", killed)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, str(small_sample), str(tmp_path / "b"))
    after_one = load_checkpoint(str(tmp_path / "b" / "last.pt"))
    monkeypatch.undo()
    train_run(load_config(str(tmp_path / "b" / "config.yaml")), str(small_sample), str(tmp_path / "b"), resume=True)
    whole, resumed = load_checkpoint(str(lora_run / "last.pt")), load_checkpoint(str(tmp_path / "b" / "last.pt"))
    def scores(history):  # everything but the speed
        return [{k: v for k, v in h.items() if k != "samples_per_s"} for h in history]

    assert scores(whole["history"]) == scores(resumed["history"]) and len(whole["history"]) == 3
    for key, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
        if ".lora_" not in key and key.startswith(("clip.text_model.encoder", "clip.vision_model.encoder")):
            assert torch.equal(value, after_one["model"][key]), f"{key}: a frozen weight changed"


@pytest.mark.parametrize("setting, message", [
    ("train.lora.rank=-1", "train.lora.rank=-1; expected 0 (off) or a positive rank"),
    ("train.lora.alpha=0", "train.lora.alpha=0"),
    ("train.lora.dropout=1", "train.lora.dropout=1"),
    ("train.lora.text_targets=[7]", "train.lora.text_targets=[7]; expected a list of layer names"),
    ("train.freeze.text_layers=1", "train.lora.rank=4 with train.freeze.text_layers"),
    ("train.lora.image_targets=[nothing_here]", "train.lora.image_targets=['nothing_here']: no image tower Linear "
                                                "layer is named nothing_here"),
    ("train.lora.rank=33", "train.lora.rank=33 is above the width of the adapted layers (32)"),  # the tiny towers'
    ("train.lora.rank=100000000", "train.lora.rank=100000000 is above the width"),  # never allocated
    ("train.lora.text_targets=[]", "no layer gets an adapter"),  # with image_targets=[] below
    ("model.image.name=resnet10t", "train.lora.rank=4, but no layer gets an adapter"),  # a CNN: no default target
])
def test_bad_lora_settings_are_refused_naming_the_key(small_sample, tmp_path, setting, message):
    from tiny import COMMON, TINY_BERT, TINY_CLIP

    from bench.shapes import setting as as_setting

    args = ["train", "--config", "configs/sample.yaml", "--data", str(small_sample), "--out", str(tmp_path / "r"),
            "--set", "model.family=chinese-clip",
            "--set", "model.text.tokenizer=char-vocab", "--set", as_setting("model.config", TINY_CLIP),
            "--set", "train.epochs=1", "--set", "data.limit_pairs=32"]
    extra = {"train.lora.text_targets=[]": ["train.lora.image_targets=[]"],
             "model.image.name=resnet10t": ["model.family=dual", as_setting("model.text.config", TINY_BERT),
                                            "train.lora.text_targets=[]"]}.get(setting, [])
    for item in COMMON + ["train.lora.rank=4", setting, *extra]:
        args += ["--set", item]
    refused(muge(*args), message)
    assert not os.path.exists(tmp_path / "r" / "best.pt")


def test_a_lora_last_pt_holds_the_weights_once_and_adamw_state_for_the_trained_alone(lora_run):
    """By its keys and tensors: last.pt holds every weight of the plain model once (a wrapped
    layer's as its `base_layer`), the adapters beside them, and AdamW moments for exactly what
    trained (the adapters, the heads, the multiplier), each of its parameter's shape; best.pt holds
    the plain model alone. (`muge bench scale --lora` writes these entries at the published shapes.)"""
    last, best = load_checkpoint(str(lora_run / "last.pt")), load_checkpoint(str(lora_run / "best.pt"))
    weights = last["model"]
    adapters = {k for k in weights if ".lora_" in k}
    as_plain = {k.replace(".base_layer.", "."): k for k in weights if k not in adapters}
    assert len(as_plain) == len(weights) - len(adapters)  # no weight under two names
    assert as_plain.keys() == best["model"].keys()  # every weight of the plain model, once
    assert {k.split(".lora_")[0] for k in adapters} == {k.split(".base_layer.")[0] for k in weights
                                                        if ".base_layer.weight" in k}  # one adapter a wrapped layer
    groups = last["optimizer"]["param_groups"]
    names = dict(zip((i for g in groups for i in g["params"]), (n for g in groups for n in g["names"])))
    state = last["optimizer"]["state"]
    trained = adapters | {k for k in weights if k.endswith(("projection.weight", "logit_scale"))}
    assert {names[i] for i in state} == trained
    for i, moments in state.items():
        assert moments["exp_avg"].shape == moments["exp_avg_sq"].shape == weights[names[i]].shape, names[i]


@pytest.mark.parametrize("family", ["chinese-clip", "dual"])
def test_adapters_get_gradients_through_checkpointed_layers(family):
    """Gradient checkpointing recomputes a block whose own weights are frozen: its adapters must
    still get their gradients (and a CNN image tower, which gets no adapters, trains whole)."""
    cfg = tiny_config(family, "model.grad_checkpointing=true", "train.lora.rank=4")
    torch.manual_seed(0)
    model, _ = create_model(cfg.model, 60)
    counts = add_lora(model, LoraConfig(rank=4, alpha=8.0))
    calls = []  # a checkpointed block's insides run twice: in the forward, and again in the backward
    next(model.tower_blocks("text")[0].children()).register_forward_hook(lambda *args: calls.append(1))
    assert counts == {"text": 12, "image": 12 if family == "chinese-clip" else 0}  # every Linear of 2 blocks
    apply_freeze(model, cfg.train.freeze)
    model.train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # away from zero, so that every adapter's A gets a gradient too
                p.normal_()
    g = _batch(2)
    image, text, scale = model(g["pixels"], g["input_ids"], g["attention_mask"])
    assert len(calls) == 1
    ((image @ text.T).sum() * scale.exp()).backward()
    assert len(calls) == 2  # checkpointing is on: the block was recomputed
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trained.items() if ".lora_" in n)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    if family == "dual":
        assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("image."))


@pytest.mark.stage
def test_lora_runs_of_one_start_make_a_soup(lora_run, small_sample, tmp_path):
    """Two LoRA runs from one start (another data seed): their best.pt files are plain models of
    one architecture, so `muge average` soups them as it soups full fine-tunes."""
    from train.average import average_runs
    from train.main import train_run

    other = tmp_path / "other"
    train_run(tiny_config("chinese-clip", *LORA_RUN, "train.data_seed=1"), str(small_sample), str(other))
    average_runs([str(lora_run), str(other)], str(tmp_path / "soup"), data_dir=str(small_sample))
    soup = load_checkpoint(str(tmp_path / "soup" / "best.pt"))
    a, b = (load_checkpoint(str(d / "best.pt"))["model"] for d in (lora_run, other))
    for key, value in soup["model"].items():
        assert ".lora_" not in key and torch.allclose(value, (a[key] + b[key]) / 2, atol=1e-6), key
    # their last.pt files: each one's adapters merged (peft's delta) before the mean, not the adapters averaged
    accepted(muge("average", lora_run, other, "--checkpoint", "last", "--out", tmp_path / "last-soup"))
    soup = load_checkpoint(str(tmp_path / "last-soup" / "best.pt"))["model"]
    a, b = (merged_state_dict(_last_pt_model(d)) for d in (lora_run, other))
    assert soup.keys() == a.keys()
    for key, value in soup.items():
        assert torch.allclose(value, (a[key] + b[key]) / 2, atol=1e-6), key


@pytest.mark.slow
def test_a_compiled_lora_model_computes_what_the_eager_one_does():
    cfg = tiny_config("chinese-clip", "train.lora.rank=4")
    torch.manual_seed(0)
    model, _ = create_model(cfg.model, 60)
    add_lora(model, LoraConfig(rank=4, alpha=8.0))
    apply_freeze(model, cfg.train.freeze)
    model.eval()  # no dropout: the two runs draw no random masks
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    g = _batch(2)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        image, text, scale = model(g["pixels"], g["input_ids"], g["attention_mask"])
        loss = (image @ text.T).sum() * scale.exp()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager = loss_and_grads()
    model.compile()
    compiled = loss_and_grads()
    assert torch.allclose(eager[0], compiled[0], atol=1e-5) and eager[1].keys() == compiled[1].keys()
    assert any(".lora_" in n for n in eager[1])
    for name, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][name], grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_the_merged_model_embeds_as_its_adapters_do(variant):
    """`merged_state_dict` (what best.pt holds): peft's delta, or DoRA's rescaled direction, merged
    into the plain architecture, which embeds as the adapted model does."""
    cfg = tiny_config("chinese-clip", "train.lora.rank=4", f"train.lora.use_rslora={str(variant == 'rslora').lower()}",
                      f"train.lora.use_dora={str(variant == 'dora').lower()}")
    torch.manual_seed(0)
    model, _ = create_model(cfg.model, 60, lora=cfg.train.lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(torch.randn_like(p) * 0.3)  # away from the start, where B A = 0 and DoRA's magnitude = |W|
    plain = build_from_arch(model.to_arch())
    plain.load_state_dict(merged_state_dict(model))
    g = _batch(3, vocab=60)
    with torch.no_grad():
        model.eval(), plain.eval()
        untouched = create_model(cfg.model, 60)[0].eval()
        assert not torch.allclose(model.encode_text(g["input_ids"], g["attention_mask"]),
                                  untouched.encode_text(g["input_ids"], g["attention_mask"]), atol=1e-3)
        assert torch.allclose(model.encode_text(g["input_ids"], g["attention_mask"]),
                              plain.encode_text(g["input_ids"], g["attention_mask"]), atol=1e-5)
        assert torch.allclose(model.encode_image(g["pixels"]), plain.encode_image(g["pixels"]), atol=1e-5)


DEFAULT_TARGETS = {"chinese-clip": "all-linear", "dual": "all-linear"}  # each family's `train.lora.targets` where null


@pytest.mark.parametrize("family", ["chinese-clip", "dual"])
def test_each_family_names_its_target_sets_and_its_default(family):
    """`train.lora.targets`: qv, attention and all-linear name growing sets of each tower's Linear
    layers (a timm ViT's fused qkv adapts its key with qv; a CNN has none), and null is the
    family's own default."""
    from model.lora import plan_lora

    vit = ["model.image.name=vit_tiny_patch16_224", "model.image.kwargs={img_size: 32, patch_size: 8, depth: 2, "
           "embed_dim: 32, num_heads: 2}"] if family == "dual" else []
    model, _ = create_model(tiny_config(family, *vit).model, 60)
    counts = {which: {k: len(v) for k, v in plan_lora(model, LoraConfig(rank=4, targets=which)).items()}
              for which in ("qv", "attention", "all-linear")}
    layers = 2  # each tiny tower's blocks
    assert counts["qv"] == {"text": 2 * layers, "image": (2 if family == "chinese-clip" else 1) * layers}
    assert counts["attention"] == {"text": 4 * layers, "image": (4 if family == "chinese-clip" else 2) * layers}
    assert counts["all-linear"] == {"text": 6 * layers, "image": (6 if family == "chinese-clip" else 4) * layers}
    default = plan_lora(model, LoraConfig(rank=4))
    assert {k: len(v) for k, v in default.items()} == counts[DEFAULT_TARGETS[family]]
    assert plan_lora(model, LoraConfig(rank=4, text_targets=["query"], targets="all-linear"))["text"] == [
        n for n, _ in model.named_modules() if n.endswith(".query")]  # a tower's own list wins


def test_a_run_saved_before_the_targets_key_keeps_the_settings_it_trained_with():
    """A `train.lora` saved without `targets` (released versions wrote none) trained query and value
    at the tower's rate: read back so, not as today's defaults, so its last.pt merges and a resume
    at other settings is refused."""
    from model.config import read_lora

    released = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "text_targets": None, "image_targets": None}
    was = read_lora({"train": {"lora": released}}, "old/last.pt")
    assert (was.targets, was.lr_ratio, was.rank) == ("qv", 1.0, 8)
    now = read_lora({"train": {"lora": {**released, "targets": None}}}, "new/last.pt")
    assert (now.targets, now.lr_ratio) == (None, 10.0) and read_lora({"train": {}}, "x").rank == 0


def test_lora_plus_gives_the_b_matrices_their_own_rate():
    cfg = tiny_config("chinese-clip", "train.lora.rank=4", "train.lora.lr_ratio=3", "train.lora.b_lr_ratio=16",
                      "train.lr={head: 1.0e-3, text: 1.0e-3, image: 2.0e-3}")
    model, _ = create_model(cfg.model, 60, lora=cfg.train.lora)
    apply_freeze(model, cfg.train.freeze)
    groups = create_optimizer(model, cfg.train).param_groups
    rate = {n: g["lr"] for g in groups for n in g["names"]}
    for name in (n for n in rate if ".lora_A." in n):
        plain = rate[name] / 3  # the layer's own rate, layer decay included
        assert rate[name.replace(".lora_A.", ".lora_B.")] == pytest.approx(plain * 3 * 16), name
    assert rate["clip.logit_scale"] == 1e-3


@pytest.mark.parametrize("setting, message", [
    ("train.lora.lr_ratio=0", "train.lora.lr_ratio=0.0; expected a positive finite ratio"),
    ("train.lora.b_lr_ratio=-1", "train.lora.b_lr_ratio=-1.0; expected a positive finite ratio"),
    ("train.lora.lr_ratio=.inf", "train.lora.lr_ratio=inf"),
    ("train.lora.targets=everything", "train.lora.targets='everything': expected one of qv, attention, all-linear"),
    ("train.lora.use_dora=maybe", "train.lora.use_dora='maybe': expected"),
])
def test_the_new_lora_keys_are_refused_when_wrong_naming_the_key(setting, message):
    from train.config import ConfigError

    with pytest.raises(ConfigError) as refusal:
        tiny_config("chinese-clip", "train.lora.rank=4", setting)
    assert message in str(refusal.value)
