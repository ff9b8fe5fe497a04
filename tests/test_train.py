import math
import os
import re

import numpy as np
import pytest
import torch
from tiny import tiny_config

from model.factory import create_model
from model.tokenizer import prepare_tokenizer
from train.config import ConfigError, load_config
from train.data import PairDataset, train_loader
from train.loss import ClipLoss, clip_loss, duplicate_mask
from train.optim import apply_freeze, create_optimizer, lr_scale
from train.scheduler import create_scheduler, lr_factor


def _setup(small_sample, tmp_path, family, *overrides):
    cfg = tiny_config(family, *overrides)
    tok = prepare_tokenizer("char-vocab", None, str(small_sample / "MR_train_queries.jsonl"), str(tmp_path),
                            cfg.data.max_text_length)
    torch.manual_seed(0)
    model, arch = create_model(cfg.model, tok.vocab_size)
    ds = PairDataset(str(small_sample / "MR_train_queries.jsonl"), str(small_sample / "MR_train_imgs.tsv"), cfg)
    return cfg, tok, model, arch, ds


@pytest.mark.stage
@pytest.mark.parametrize("family", ["dual", "chinese-clip"])
def test_each_family_trains_and_loss_falls(small_sample, tmp_path, family):
    cfg, tok, model, _, ds = _setup(small_sample, tmp_path, family, "train.batch_size=16")
    batch = next(iter(train_loader(ds, tok, cfg, 0, 1, torch.device("cpu"))))
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape[1:] == (32, 32, 3)
    assert (batch["input_ids"][:, 1] != 1).any()  # real tokens, not all [UNK]
    opt = create_optimizer(model, cfg.train)
    crit = ClipLoss()
    losses = []
    for _ in range(40):
        img, txt, log_scale = model(batch["pixels"], batch["input_ids"], batch["attention_mask"])
        assert torch.allclose(img.norm(dim=-1), torch.ones(len(img)), atol=1e-5)
        loss, value = crit(img, txt, log_scale, batch["image_ids"], batch["query_ids"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(value.item())
    assert np.mean(losses[-5:]) < 0.85 * losses[0], losses


def test_multi_positive_mask_and_loss():
    image_ids = torch.tensor([10, 11, 10, 12])
    query_ids = torch.tensor([1, 2, 3, 2])
    mask = duplicate_mask(image_ids, query_ids)
    expected = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    # a duplicate positive scoring as high as the true pair is not penalised as a negative
    f = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0], [0, 0, 1.0]]), dim=-1)
    t = f.clone()
    t[3] = torch.tensor([0, 0, 1.0])
    scale = torch.tensor(20.0)
    with_mask = clip_loss(f, t, scale, image_ids, query_ids)
    without = clip_loss(f, t, scale, torch.arange(4), torch.arange(4))
    assert with_mask < 0.01 and without > 0.3  # two rows at log(2) each way


def test_label_smoothing_and_hard_negative_terms_are_finite():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    ids = torch.tensor([1, 1, 2, 3, 4, 5])
    img[1] = txt[0] = img[0]  # pairs 0 and 1 share their image: each other's hardest "negative", never counted
    base = clip_loss(img, txt, torch.tensor(10.0), ids, torch.arange(6))
    smooth = clip_loss(img, txt, torch.tensor(10.0), ids, torch.arange(6), label_smoothing=0.1)
    hard = clip_loss(img, txt, torch.tensor(10.0), ids, torch.arange(6), hard_negative_margin=0.2,
                     hard_negative_weight=0.7)

    def smoothed(logits, s):  # per row: (1 - s) x the positive's NLL + s x the mean NLL over the entries kept
        total = 0.0
        for i, row in enumerate(logits):
            kept = [j for j in range(6) if j == i or ids[j] != ids[i]]  # a shared image is no negative
            top = max(row[j] for j in kept)
            lse = top + math.log(sum(math.exp(row[j] - top) for j in kept))
            total += (1 - s) * (lse - row[i]) + s * sum(lse - row[j] for j in kept) / len(kept)
        return total / 6

    logits = (10.0 * txt @ img.T).tolist()
    for s, loss in ((0.0, base), (0.1, smooth)):
        by_hand = 0.5 * (smoothed(logits, s) + smoothed([list(c) for c in zip(*logits)], s))
        assert float(loss) == pytest.approx(by_hand, rel=1e-5), s

    def hinge(sims):  # each row's hardest negative (not itself, not a positive: same image) within the margin
        terms = [max(0.0, 0.2 - sims[i][i] + max(sims[i][j] for j in range(6) if j != i and ids[j] != ids[i]))
                 for i in range(6)]
        return sum(terms) / 6

    sims = (txt @ img.T).tolist()
    expected = 0.7 * 0.5 * (hinge(sims) + hinge([list(col) for col in zip(*sims)]))
    assert expected > 0.05  # random features: the margin is violated, so the term is really tested
    assert float(hard - base) == pytest.approx(expected, rel=1e-5)


def test_llrd_groups_and_no_decay(small_sample, tmp_path):
    cfg, _, model, _, _ = _setup(small_sample, tmp_path, "dual", "train.layer_decay=0.5")
    opt = create_optimizer(model, cfg.train)
    by_name = {n: g for g in opt.param_groups for n in g["names"]}
    # text tower: 2 layers -> embeddings 0, layers 1-2, top = 2
    assert by_name["text.encoder.layer.1.attention.self.query.weight"]["lr"] == pytest.approx(1e-3 * 0.5)
    assert by_name["text.encoder.layer.0.attention.self.query.weight"]["lr"] == pytest.approx(1e-3 * 0.25)
    assert by_name["text.embeddings.word_embeddings.weight"]["lr"] == pytest.approx(1e-3 * 0.125)
    assert by_name["text_proj.0.weight"]["lr"] == pytest.approx(2e-3)
    assert by_name["logit_scale"]["weight_decay"] == 0 and by_name["text_proj.0.bias"]["weight_decay"] == 0
    assert by_name["text.embeddings.LayerNorm.weight"]["weight_decay"] == 0
    assert by_name["text_proj.0.weight"]["weight_decay"] == cfg.train.weight_decay
    image_lrs = sorted({g["lr"] for g in opt.param_groups if g["group"] == "image"})
    assert len(image_lrs) > 2 and image_lrs[-1] <= 2e-3
    assert lr_scale(3, 2, 0.5) == 1.0 and lr_scale(0, 2, 0.5) == 0.125


def test_freezing_and_progressive_unfreeze(small_sample, tmp_path):
    cfg, tok, model, _, ds = _setup(small_sample, tmp_path, "dual", "train.freeze.text_layers=1",
                                    "train.freeze.image_stages=1", "train.freeze.schedule={1: {text_layers: 2}}")
    apply_freeze(model, cfg.train.freeze, epoch=0)
    opt = create_optimizer(model, cfg.train)
    batch = next(iter(train_loader(ds, tok, cfg, 0, 1, torch.device("cpu"))))
    img, txt, s = model(batch["pixels"], batch["input_ids"], batch["attention_mask"])
    ClipLoss()(img, txt, s, batch["image_ids"], batch["query_ids"])[0].backward()
    opt.step()
    params = dict(model.named_parameters())
    frozen = ["text.embeddings.word_embeddings.weight", "text.encoder.layer.0.attention.self.query.weight",
              "image.conv1.0.weight", "image.layer3.0.conv1.weight"]
    trainable = ["text.encoder.layer.1.attention.self.query.weight", "image.layer4.0.conv1.weight",
                 "text_proj.0.weight", "logit_scale"]
    for name in frozen:
        assert params[name].grad is None and params[name] not in opt.state, name
    for name in trainable:
        assert params[name].grad is not None and params[name] in opt.state, name
    apply_freeze(model, cfg.train.freeze, epoch=1)  # schedule: whole text tower from epoch 1
    assert params["text.encoder.layer.0.attention.self.query.weight"].requires_grad
    assert not params["image.layer3.0.conv1.weight"].requires_grad


def test_param_layout_chinese_clip(small_sample, tmp_path):
    _, _, model, _, _ = _setup(small_sample, tmp_path, "chinese-clip")
    layout = model.param_layout()
    assert layout["clip.text_model.encoder.layer.1.attention.self.query.weight"] == ("text", 2, 2)
    assert layout["clip.vision_model.encoder.layers.0.mlp.fc1.weight"] == ("image", 1, 2)
    assert layout["clip.vision_model.embeddings.patch_embedding.weight"][:2] == ("image", 0)
    assert layout["clip.visual_projection.weight"][0] == "head"


def test_warmup_cosine_values():
    assert lr_factor(0, 10, 110, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 10, 110, 0.0) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, 0.0) == pytest.approx(0.5)
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = create_scheduler(opt, 4, 20, 0.0)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and seen[-1] < 0.01


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown config key train.epoch; valid keys under train: accum_steps"),
    ("model.txt.name=x", "unknown config key model.txt"),
    ("model.family=clip", "model.family='clip'; expected one of chinese-clip, dual"),
    ("model.text.pooling=max", "model.text.pooling='max': expected one of cls, mean, mean_max, attentive"),
    ("data.resize_rule=crop", "data.resize_rule='crop': expected one of squash, shorter-crop"),
    ("train.precision=fp8", "train.precision='fp8': expected one of auto, fp32, bf16, fp16"),
    ("train.data_seed=-1", "train.data_seed=-1; expected an integer >= 0"),
    ("train=0", "override train=0: train is a section (epochs, batch_size"),
    ("train.lr=null", "override train.lr=null: train.lr is a section (head, text, image)"),
    ("data.augment=false", "override data.augment=false: data.augment is a section"),
    ("train.batch_size=0", "train.batch_size=0; expected a positive integer"),
    ("train.grad_cache_chunk=5", "must divide train.batch_size"),
    ("train.epochs=2.5", "train.epochs=2.5: expected int"),
    ("train.epochs=true", "train.epochs=True: expected int"),
    ("train.grad_clip=yes", "train.grad_clip=True: expected float or null"),
    ("model.text.config=[1]", "model.text.config=[1]: expected a mapping"),
    ("data.augment.random_resized_crop=0.5", "expected a list"),
])
def test_bad_config_keys(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/sample.yaml", [override])
    assert message in str(err.value)


def test_the_schema_names_the_choices_the_model_implements():
    """The config owns the choices (`Literal` types); the model has one implementation of each."""
    from typing import get_args

    from competition.preprocess import RESIZE_RULES
    from model.config import Head, Pooling, ResizeRule
    from model.factory import FAMILIES
    from model.layers import HEADS, POOLINGS, TextPool, projection_head

    assert {"dual", "chinese-clip"} <= set(FAMILIES) and get_args(ResizeRule) == RESIZE_RULES
    assert HEADS == get_args(Head) and POOLINGS == get_args(Pooling)
    # each pooling, by its definition, on a batch whose padded positions hold values no pooling may see
    hidden, mask = torch.randn(2, 4, 8), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    hidden[mask == 0] = 1e4
    valid = [hidden[b, :int(mask[b].sum())] for b in range(2)]
    mean = torch.stack([v.mean(0) for v in valid])
    expected = {"cls": hidden[:, 0], "mean": mean,
                "mean_max": torch.cat([mean, torch.stack([v.amax(0) for v in valid])], dim=-1)}
    for kind in POOLINGS:
        pool = TextPool(kind, 8)
        out = pool(hidden, mask)
        assert out.shape == (2, pool.out_dim), kind
        if kind == "attentive":  # a learned softmax over the valid positions: a convex mix of them
            weights = [pool.score(v).squeeze(-1).softmax(0) for v in valid]
            expected[kind] = torch.stack([(w[:, None] * v).sum(0) for w, v in zip(weights, valid)])
        torch.testing.assert_close(out, expected[kind], msg=kind)
    for kind in HEADS:
        assert projection_head(kind, 8, 4, 0.0)(torch.zeros(2, 8)).shape == (2, 4)


def test_a_mapping_override_merges_into_the_preset_section():
    """`--set train.lr={text: 1e-4}` changes one rate and keeps the preset's others."""
    preset = load_config("configs/sample.yaml")
    cfg = load_config("configs/sample.yaml", ["train.lr={text: 1.0e-4}", "data.augment={hflip: 0.0}"])
    assert cfg.train.lr.text == 1e-4 and cfg.train.lr.head == preset.train.lr.head != 1e-3  # not the default
    assert cfg.data.augment.hflip == 0.0
    assert cfg.data.augment.random_resized_crop == preset.data.augment.random_resized_crop == [0.6, 1.0]


@pytest.mark.parametrize("text, message", [("- a\n- b\n", "a preset is a mapping of sections (model, data, train, "
                                                            "eval), not a list"),
                                           ("3\n", "not a int"), ("", "an empty preset"),
                                           ("model: [\n", "not valid YAML")])
def test_a_preset_is_a_mapping(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(str(path), ["train.epochs=1"])


def test_config_numbers_are_coerced_to_their_fields():
    """YAML 1.1 (PyYAML) reads 3e-4 as a string and 1 as an int: float fields get floats."""
    cfg = load_config("configs/sample.yaml", ["train.lr.head=3e-4", "train.weight_decay=1", "train.grad_clip=null"])
    assert cfg.train.lr.head == 3e-4 and isinstance(cfg.train.weight_decay, float) and cfg.train.grad_clip is None


def test_the_presets_say_what_their_comments_and_the_docs_say():
    """Each preset loads (every key known, every value typed) and holds the recipe it is named for:
    the published shapes' Chinese-CLIP recipe (lr 5e-5, wd 0.001, warmup 100, 52 tokens, its
    normalisation and vocabulary), the dual plan's towers, the samples' tiny CPU models."""
    import glob

    presets = sorted(os.path.basename(p)[:-5] for p in glob.glob("configs/*.yaml"))
    assert presets == ["bert-convnext", "cnclip-vit-b16", "cnclip-vit-h14", "cnclip-vit-l14", "cnclip-vit-l14-336",
                       "sample", "sample-clip"]
    cfgs = {name: load_config(f"configs/{name}.yaml") for name in presets}
    for name in presets[1:5]:
        cfg = cfgs[name]
        assert cfg.model.family == "chinese-clip" and cfg.model.name, name
        assert (cfg.train.lr.text, cfg.train.lr.image, cfg.train.weight_decay, cfg.train.warmup_steps) == \
            (5e-5, 5e-5, 0.001, 100), name
        assert cfg.data.max_text_length == 52 and cfg.data.text_normalization == "cn-clip", name
        assert (cfg.train.betas, cfg.train.eps) == ([0.9, 0.98], 1e-6), name
    assert cfgs["cnclip-vit-l14-336"].data.image_size == 336 and cfgs["cnclip-vit-b16"].data.image_size == 224
    assert cfgs["bert-convnext"].model.image.name == "convnext_tiny" and cfgs["bert-convnext"].model.family == "dual"
    assert cfgs["sample"].model.text.name is None and cfgs["sample"].model.image.name == "resnet10t"
    clip = cfgs["sample-clip"].model
    assert clip.family == "chinese-clip" and clip.name is None and clip.config["vision_config"]["image_size"] == \
        cfgs["sample-clip"].data.image_size == 64


def test_persistent_workers_see_each_epoch(small_sample, tmp_path):
    """Workers outlive epochs; the epoch reaches them with every index, so each epoch's batch is
    the one the dataset gives for (epoch, i), and epochs differ (augmentation is seeded by both)."""
    cfg, tok, _, _, ds = _setup(small_sample, tmp_path, "dual", "data.workers=1", "data.augment.hflip=0.5")
    loader = train_loader(ds, tok, cfg, 0, 1, torch.device("cpu"), pad_to=cfg.data.max_text_length)
    assert loader.persistent_workers
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        batch = next(iter(loader))
        keys = list(loader.sampler)[:cfg.train.batch_size]
        assert all(k[0] == epoch for k in keys)
        assert np.array_equal(batch["pixels"].numpy(), np.stack([ds[k][0] for k in keys]))
        assert batch["input_ids"].shape[1] == cfg.data.max_text_length  # pad_to: one static text shape
    assert not np.array_equal(ds[(0, 5)][0], ds[(1, 5)][0])
