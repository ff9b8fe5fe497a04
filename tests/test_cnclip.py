"""The chinese-clip family against Chinese-CLIP's own code (`cn_clip`, installed by `make setup`):
its checkpoint files in, its tokens, embeddings and training step reproduced on the same weights,
its augmentation, its larger shapes through the whole chain."""
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from conftest import accepted, muge, refused
from PIL import Image

from competition import ImageTSV, read_queries, resize_image
from model.cnclip import infer_architecture, read_checkpoint, to_hf_state_dict

try:
    import cn_clip.clip as cn_clip
except ImportError:  # the tests that compare with it are skipped; the others run
    cn_clip = None
needs_cn_clip = pytest.mark.skipif(cn_clip is None, reason="cn_clip is installed by `make setup` "
                                                            "(pip --no-deps cn-clip)")
VOCAB = os.path.join(os.path.dirname(cn_clip.__file__), "vocab.txt") if cn_clip else None
# long, mixed-case Latin, full-width punctuation and digits, emoji, spaces, curly quotes, a 150-letter word
HARD_TEXTS = ["适用于苹果iPhone15ProMax手机壳新款全包防摔硅胶软壳男女款情侣潮牌高级感磨砂透明保护套超薄",
              "Nike Air Max 男鞋 ＡＢＣ１２３，限量版！", "“网红”同款 ins风   小众设计 😀🔥", "ＴＳＨＩＲＴ　白色 T恤",
              "x" * 150 + " 长裤", "  前后空格  "]


def cn_clip_text(text: str) -> str:
    """cn_clip/eval/data.py:23 (and cn_clip/training/data.py:31) `_preprocess_text`, applied before
    `tokenize` at training and evaluation alike; inlined because those modules import lmdb."""
    return text.lower().replace("\u201c", '"').replace("\u201d", '"')


def tiny_cn_clip(seed: int = 0, dropout: float = 0.0, vision_layers=2):
    """A tiny random `cn_clip.clip.model.CLIP` at 224 px (patch 32: 7 x 7 patches) with the full
    Chinese vocabulary, so that its own `tokenize` feeds it."""
    from cn_clip.clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(embed_dim=32, image_resolution=224, vision_layers=vision_layers, vision_width=64,
                 vision_patch_size=32, vocab_size=21128, text_attention_probs_dropout_prob=dropout,
                 text_hidden_act="gelu", text_hidden_dropout_prob=dropout, text_hidden_size=64,
                 text_initializer_range=0.02, text_intermediate_size=128, text_max_position_embeddings=64,
                 text_num_attention_heads=1, text_num_hidden_layers=2, text_type_vocab_size=2)
    with torch.no_grad():  # cn_clip initialises some tensors to constants; make every tensor matter
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(torch.randn_like(p) * 0.02)
    return model.float()


def save_like_training(model, path) -> str:
    """As cn_clip/training/main.py saves `epoch_latest.pt`: DDP's `module.` prefixes, beside the
    optimizer state and plain data."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    torch.save({"epoch": 3, "step": 735, "name": "muge_finetune", "optimizer": optimizer.state_dict(),
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_cn_clip()
    path = save_like_training(model, tmp_path_factory.mktemp("cnclip") / "epoch_latest.pt")
    return model.eval(), path


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    shutil.copy(VOCAB, d / "vocab.txt")
    return d


def cn_clip_rankings(model, queries, tsv) -> list[list[int]]:
    """Chinese-CLIP's own way: its `image_transform` and `tokenize` (context 52), `encode_*`,
    normalised features, every score sorted."""
    from cn_clip.clip import image_transform, tokenize

    transform = image_transform(224)
    with torch.no_grad():
        images = torch.cat([model.encode_image(transform(Image.fromarray(resize_image(tsv.load(i), 224)))[None])
                            for i in tsv.ids.tolist()])
        texts = model.encode_text(tokenize([cn_clip_text(q.text) for q in queries], 52))
    images, texts = (torch.nn.functional.normalize(x, dim=-1).numpy() for x in (images, texts))
    order = np.argsort(-(texts @ images.T), axis=1, kind="stable")[:, :10]
    return [tsv.ids[row].tolist() for row in order]


# -- its files in --------------------------------------------------------------------------------------
@needs_cn_clip
def test_a_training_checkpoint_maps_onto_chinese_clip_model_exactly(checkpoint):
    model, path = checkpoint
    state = read_checkpoint(path)
    arch = infer_architecture(state, path)
    assert {k: arch[k] for k in ("image_resolution", "vision_patch_size", "vision_width", "vision_layers",
                                 "vision_heads", "text_hidden_size", "text_num_hidden_layers", "embed_dim")} == \
        {"image_resolution": 224, "vision_patch_size": 32, "vision_width": 64, "vision_layers": 2, "vision_heads": 1,
         "text_hidden_size": 64, "text_num_hidden_layers": 2, "embed_dim": 32}
    from transformers import ChineseCLIPModel

    from model.cnclip import hf_config

    hf = ChineseCLIPModel(hf_config(arch))
    mapped = to_hf_state_dict(state, path)
    assert set(mapped) == set(hf.state_dict()) and all(mapped[k].shape == v.shape for k, v in hf.state_dict().items())


def test_published_shapes_are_recognised():
    """Heads from the width as cn_clip's model configs give them: 64 wide, 80 for ViT-H/14's 1280."""
    from tiny import with_layers

    from bench.shapes import CNCLIP_SHAPES

    for name, shape in CNCLIP_SHAPES.items():
        from transformers import ChineseCLIPConfig

        config = ChineseCLIPConfig(**with_layers(shape, 1))
        vision, text = config.vision_config, config.text_config
        grid = vision.image_size // vision.patch_size
        fake = {"visual.conv1.weight": torch.empty(vision.hidden_size, 3, vision.patch_size, vision.patch_size),
                "visual.positional_embedding": torch.empty(grid * grid + 1, vision.hidden_size),
                "visual.transformer.resblocks.0.ln_1.weight": torch.empty(1),
                "visual.proj": torch.empty(vision.hidden_size, config.projection_dim),
                "text_projection": torch.empty(text.hidden_size, config.projection_dim), "logit_scale": torch.empty(()),
                "bert.embeddings.word_embeddings.weight": torch.empty(text.vocab_size, text.hidden_size),
                "bert.embeddings.position_embeddings.weight": torch.empty(512, text.hidden_size),
                "bert.embeddings.token_type_embeddings.weight": torch.empty(2, text.hidden_size),
                "bert.encoder.layer.0.intermediate.dense.weight": torch.empty(text.intermediate_size, text.hidden_size)}
        arch = infer_architecture(fake, name)
        assert arch["vision_heads"] == vision.num_attention_heads and arch["image_resolution"] == vision.image_size
        assert arch["text_num_attention_heads"] == text.num_attention_heads, name


@needs_cn_clip
def test_tokens_are_chinese_clips_own(vocab_dir, small_sample, tmp_path):
    from cn_clip.clip import tokenize

    from model.tokenizer import prepare_tokenizer

    ours = prepare_tokenizer(str(vocab_dir), None, "", str(tmp_path), 52, "cn-clip")
    texts = HARD_TEXTS + [q.text for q in read_queries(small_sample / "MR_valid_queries.jsonl")]
    ids, mask = ours(texts)
    theirs = tokenize([cn_clip_text(t) for t in texts], 52).numpy()
    assert ids.shape[1] <= 52 and (theirs[:, ids.shape[1]:] == 0).all()
    np.testing.assert_array_equal(ids * mask, theirs[:, :ids.shape[1]])
    np.testing.assert_array_equal(mask, (theirs[:, :ids.shape[1]] != 0).astype(mask.dtype))


@pytest.mark.slow
@needs_cn_clip
def test_embeddings_of_the_exported_bundle_are_chinese_clips(checkpoint, vocab_dir, small_sample, tmp_path,
                                                              monkeypatch):
    """The bundle's fp32 graphs against cn_clip's `encode_image` / `encode_text` with its own
    `image_transform` and `tokenize`, on the sample's valid images and queries and on hard texts.
    The export builds the model in memory: it makes no directory but the bundle's build (and
    folders inside it) and saves no checkpoint."""
    import tempfile

    from cn_clip.clip import image_transform, tokenize

    from predict.runtime import BundleEncoders, RuntimeChoice

    model, path = checkpoint
    bundle = tmp_path / "bundle"
    made, real_mkdtemp = [], tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(real_mkdtemp(*a, **k)) or made[-1])
    monkeypatch.setattr(torch, "save", lambda *a, **k: pytest.fail(f"export --pretrained saved {a[1]!r}"))
    accepted(muge("export", "--pretrained", path, "--tokenizer", vocab_dir, "--out", bundle, "--data", small_sample,
                  "--parity-queries", "40", "--parity-gallery", "60"))
    monkeypatch.undo()
    ours = [d for d in made if d.startswith(str(tmp_path) + os.sep)]
    build = [d for d in ours if os.path.basename(d).startswith(".bundle.")]
    assert len(build) == 1 and all(d == build[0] or d.startswith(build[0] + os.sep) for d in ours), ours
    assert not [d for d in made if os.path.exists(d)], made  # ONNX Runtime's own scratch (its optimizer's) is gone
    assert sorted(os.listdir(tmp_path)) == ["bundle"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    source = manifest["source_pretrained"]
    assert source["format"] == "cn_clip checkpoint" and len(source["sha256"]) == 64
    assert source["architecture"]["vision_width"] == 64 and manifest["text_normalization"] == "cn-clip"
    enc = BundleEncoders(str(bundle), choice=RuntimeChoice(("CPUExecutionProvider",), False), batch_size=8)
    tsv = ImageTSV(str(small_sample / "MR_valid_imgs.tsv"))
    ids = tsv.ids[:24].tolist()
    ours = enc.encode_images(np.stack([resize_image(tsv.load(i), 224) for i in ids]))
    transform = image_transform(224)
    with torch.no_grad():
        theirs = model.encode_image(torch.stack([transform(tsv.load(i)) for i in ids]))
    np.testing.assert_allclose(ours, torch.nn.functional.normalize(theirs, dim=-1).numpy(), atol=1e-4)
    texts = HARD_TEXTS + [q.text for q in read_queries(small_sample / "MR_valid_queries.jsonl")]
    with torch.no_grad():
        theirs = model.encode_text(tokenize([cn_clip_text(t) for t in texts], 52))
    np.testing.assert_allclose(enc.encode_text(texts), torch.nn.functional.normalize(theirs, dim=-1).numpy(),
                               atol=1e-4)


@pytest.mark.slow
@needs_cn_clip
def test_a_cn_clip_checkpoint_predicts_and_trains_from_chinese_clips_own_rankings(checkpoint, vocab_dir,
                                                                                  small_sample, tmp_path, caplog):
    """The acceptance test: export with `--pretrained X.pt --tokenizer DIR`, predict valid, and
    compare with cn_clip's rankings; then the B/16 preset fine-tuning from X.pt scores the same
    untrained valid MR."""
    from conftest import overlap, submission_lists

    from competition import score_predictions

    model, path = checkpoint
    bundle = tmp_path / "bundle"
    accepted(muge("export", "--pretrained", path, "--tokenizer", vocab_dir, "--out", bundle, "--data", small_sample,
                  "--parity-queries", "40", "--parity-gallery", "60"))
    out = tmp_path / "valid.jsonl"
    result = accepted(muge("predict", "--bundle", bundle, "--data", small_sample, "--split", "valid", "--out", out,
                           "--cache-dir", tmp_path / "cache", "--workers", "0"))
    ours = json.loads(result.output.strip().splitlines()[-1])
    queries = read_queries(small_sample / "MR_valid_queries.jsonl")
    theirs = cn_clip_rankings(model, queries, ImageTSV(str(small_sample / "MR_valid_imgs.tsv")))
    assert overlap(submission_lists(out), theirs) >= 0.99
    their_mr = score_predictions(queries, {q.query_id: r for q, r in zip(queries, theirs)}).mean_recall
    assert abs(ours["mean_recall"] - their_mr) <= 0.5
    caplog.clear()
    accepted(muge("train", "--config", "configs/cnclip-vit-b16.yaml", "--data", small_sample, "--out", tmp_path / "run",
                  "--set", f"model.name={path}", "--set", f"model.text.tokenizer={vocab_dir}",
                  "--set", "train.epochs=1", "--set", "train.compile=false", "--set", "data.workers=0",
                  "--set", "train.batch_size=16", "--set", "data.limit_pairs=32", "--set", "eval.batch_size=64"))
    untrained = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert untrained["epoch"] == 0 and abs(untrained["mean_recall"] - their_mr) <= 0.5


@pytest.mark.slow
@needs_cn_clip
def test_without_a_tokenizer_the_cn_clip_vocabulary_is_used(checkpoint, small_sample, tmp_path):
    _, path = checkpoint
    accepted(muge("export", "--pretrained", path, "--out", tmp_path / "b", "--data", small_sample,
                  "--parity-queries", "20", "--parity-gallery", "40"))
    with open(tmp_path / "b" / "tokenizer" / "vocab.txt", encoding="utf-8") as ours, open(VOCAB, encoding="utf-8") as v:
        assert ours.read() == v.read()


@needs_cn_clip
def test_a_config_whose_image_size_differs_from_the_weights_is_refused(checkpoint, vocab_dir, small_sample, tmp_path):
    _, path = checkpoint
    refused(muge("train", "--config", "configs/cnclip-vit-b16.yaml", "--data", small_sample, "--out", tmp_path / "r",
                 "--set", f"model.name={path}", "--set", f"model.text.tokenizer={vocab_dir}",
                 "--set", "data.image_size=336"),
            "data.image_size=336, but the model's vision tower takes 224 px images")
    assert not (tmp_path / "r").exists()


@needs_cn_clip
@pytest.mark.parametrize("make, message", [
    (lambda d: torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, d / "x.pt"),
     "not a Chinese-CLIP ViT checkpoint"),
    (lambda d: (d / "x.pt").write_bytes(open(save_like_training(tiny_cn_clip(), d / "y.pt"), "rb").read()[:4000]),
     "not a readable Chinese-CLIP checkpoint, truncated or corrupt"),
    (lambda d: torch.save({"state_dict": {"x": Evil(str(d / "pwned"))}}, d / "x.pt"), "refused: it holds pickled"),
    (lambda d: torch.save([1, 2], d / "x.pt"), "not a Chinese-CLIP checkpoint"),
    (lambda d: torch.save({"state_dict": {**tiny_cn_clip().state_dict(), "extra.weight": torch.zeros(1)}}, d / "x.pt"),
     "1 tensors are not Chinese-CLIP's (extra.weight)"),
    (lambda d: torch.save({"state_dict": tiny_resnet_cn_clip().state_dict()}, d / "x.pt"),
     "a ResNet (RN50) Chinese-CLIP: transformers has no ResNet Chinese-CLIP"),
    (lambda d: torch.save({"state_dict": {k: v for k, v in tiny_cn_clip().state_dict().items()
                                          if k not in MISSING}}, d / "x.pt"),
     "not a whole Chinese-CLIP checkpoint: it lacks 2 of the tensors its shape has (bert.encoder.layer.1.output."
     "dense.bias, visual.transformer.resblocks.0.attn.in_proj_weight)"),  # named as cn_clip names them
], ids=["another-model", "truncated", "pickled-code", "not-a-dict", "extra-tensor", "rn50", "missing-tensors"])
def test_a_malformed_checkpoint_gets_one_clear_error(small_sample, tmp_path, make, message):
    make(tmp_path)
    refused(muge("export", "--pretrained", tmp_path / "x.pt", "--tokenizer", VOCAB.rsplit("/", 1)[0], "--out",
                 tmp_path / "b", "--data", small_sample), f"{tmp_path / 'x.pt'}", message, "no bundle written")
    assert not (tmp_path / "b").exists() and not (tmp_path / "pwned").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".pretrained-")]


MISSING = ("visual.transformer.resblocks.0.attn.in_proj_weight", "bert.encoder.layer.1.output.dense.bias")


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def tiny_resnet_cn_clip():
    from cn_clip.clip.model import CLIP

    return CLIP(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8, vision_patch_size=None,
                vocab_size=100, text_attention_probs_dropout_prob=0.0, text_hidden_act="gelu",
                text_hidden_dropout_prob=0.0, text_hidden_size=64, text_initializer_range=0.02,
                text_intermediate_size=128, text_max_position_embeddings=64, text_num_attention_heads=1,
                text_num_hidden_layers=1, text_type_vocab_size=2)


# -- its training step -----------------------------------------------------------------------------------
LR, WD, WARMUP, TOTAL = 1e-3, 0.1, 2, 10  # large enough for one step to move every weight visibly


def _batch(small_sample, n: int, repeat_image: bool = False):
    """n (query, positive image) pairs of the sample's train split, no image or query twice, or
    (`repeat_image`) the first image again as the last pair's."""
    from cn_clip.clip import image_transform, tokenize

    queries = read_queries(small_sample / "MR_train_queries.jsonl")
    tsv = ImageTSV(str(small_sample / "MR_train_imgs.tsv"))
    pairs, seen = [], set()
    for q in queries:
        if q.item_ids[0] not in seen:
            pairs.append((q, q.item_ids[0]))
            seen.add(q.item_ids[0])
        if len(pairs) == n:
            break
    if repeat_image:
        pairs[-1] = (pairs[-1][0], pairs[0][1])
    images = [resize_image(tsv.load(i), 224) for _, i in pairs]
    transform = image_transform(224)
    theirs = (torch.stack([transform(Image.fromarray(x)) for x in images]),
              tokenize([cn_clip_text(q.text) for q, _ in pairs], 52))
    return pairs, np.stack(images), theirs


def _their_step(model, images, texts, mask_ratio: float = 0.0):
    """One step of cn_clip/training: its get_loss with gathered features (a one-process group),
    its AdamW groups (main.py:147-166), cosine_lr (scheduler.py), the logit-scale clamp (train.py:262)."""
    import argparse

    import torch.distributed as dist
    from cn_clip.training.scheduler import cosine_lr
    from cn_clip.training.train import get_loss

    exclude = lambda n: "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731 (main.py:147)
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n)], "weight_decay": 0.0},
                                   {"params": [p for n, p in named if not exclude(n)], "weight_decay": WD}],
                                  lr=LR, betas=(0.9, 0.98), eps=1e-6)
    scheduler = cosine_lr(optimizer, LR, WARMUP, TOTAL)
    args = argparse.Namespace(accum_freq=1, distillation=False, mask_ratio=mask_ratio, aggregate=True,
                              gather_with_grad=False,
                              local_device_rank=0, report_training_batch_acc=False)
    model.train()
    scheduler(0)
    optimizer.zero_grad()
    assert dist.is_initialized() and dist.get_world_size() == 1
    torch.manual_seed(7)  # the FLIP masks
    loss, _ = get_loss(model, images, texts, torch.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(), args)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in named}
    optimizer.step()
    model.logit_scale.data = torch.clamp(model.logit_scale.data, 0, 4.6052)
    return loss.detach(), grads


def _our_step(path, pixels, ids, mask, image_ids, query_ids, mask_ratio: float = 0.0):
    """One step of ours: the chinese-clip family from the same file, ClipLoss, our optimizer (its
    betas, eps and lr; our no-decay rule), our schedule, our clamp."""
    from tiny import tiny_config

    from model.factory import create_model
    from train.guard import DivergenceGuard
    from train.loss import ClipLoss
    from train.optim import create_optimizer
    from train.precision import grad_scaler
    from train.scheduler import create_scheduler
    from train.step import StepParts, train_step

    cfg = tiny_config("chinese-clip", f"model.name={path}", f"train.lr={{head: {LR}, text: {LR}, image: {LR}}}",
                      f"train.weight_decay={WD}", "train.betas=[0.9, 0.98]", "train.eps=1.0e-6",
                      f"train.warmup_steps={WARMUP}", "train.grad_clip=null", "data.image_size=224")
    model, _ = create_model(cfg.model)
    for module in model.modules():  # cn_clip's tiny model was built without dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attention_dropout"):  # transformers' attention takes it as a float
            module.attention_dropout = 0.0
    optimizer = create_optimizer(model, cfg.train)

    cpu = torch.device("cpu")
    parts = StepParts(ClipLoss(), optimizer, create_scheduler(optimizer, WARMUP, TOTAL), grad_scaler("fp32", cpu),
                      "fp32", cpu, DivergenceGuard(5, cpu), cfg.train.grad_clip, cfg.train.grad_cache_chunk)
    batch = {"pixels": torch.from_numpy(pixels), "input_ids": torch.from_numpy(ids),
             "attention_mask": torch.from_numpy(mask), "image_ids": torch.tensor(image_ids),
             "query_ids": torch.tensor(query_ids)}
    grads = {}
    model.train()
    model.set_mask_ratio(mask_ratio)
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, p.grad.detach().clone()))
             for n, p in model.clip.named_parameters()]
    torch.manual_seed(7)  # the FLIP masks, drawn as cn_clip draws them
    loss, _ = train_step(parts, model, batch)
    for h in hooks:
        h.remove()
    return loss, grads, model.clip.state_dict()


@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@needs_cn_clip
@pytest.mark.parametrize("mask_ratio", [0.0, 0.5])
def test_one_training_step_is_chinese_clips_own(small_sample, vocab_dir, tmp_path, monkeypatch, one_process_group,
                                                mask_ratio):
    """With FLIP masking (`--mask-ratio 0.5` there, `train.mask_ratio` here) too: the same patches
    dropped from the same seed, the same loss, gradients and weights."""
    from model.tokenizer import prepare_tokenizer

    model = tiny_cn_clip(seed=1)
    path = save_like_training(model, tmp_path / "start.pt")
    pairs, pixels, (images, texts) = _batch(small_sample, 12)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # get_loss moves its labels to a GPU
    their_loss, their_grads = _their_step(model, images, texts, mask_ratio)
    tokenizer = prepare_tokenizer(str(vocab_dir), None, "", str(tmp_path), 52, "cn-clip")
    ids, mask = tokenizer([q.text for q, _ in pairs])
    our_loss, our_grads, our_weights = _our_step(path, pixels, ids, mask, [i for _, i in pairs],
                                                 [q.query_id for q, _ in pairs], mask_ratio)
    assert abs(float(our_loss) - float(their_loss)) < 1e-5
    for name, grad in to_hf_state_dict(their_grads).items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-5, rtol=0, msg=name)
    theirs = to_hf_state_dict(dict(model.state_dict()))
    before = to_hf_state_dict(read_checkpoint(path))
    # where the choice differs on purpose: cn_clip's exclusion rule ("ln" in the name) misses BERT's
    # LayerNorm weights and decays them (and the ViT's 1-D class embedding); we decay no 1-D tensor
    decayed_by_them = [k for k in theirs if k.endswith("LayerNorm.weight") or k.endswith("class_embedding")]
    assert len(decayed_by_them) == 1 + 2 * 2 + 1  # embeddings + 2 per text layer + the class embedding
    lr0 = LR * 1 / WARMUP
    for name, value in theirs.items():
        if name in decayed_by_them:
            torch.testing.assert_close(our_weights[name] - lr0 * WD * before[name], value, atol=1e-6, rtol=0)
            assert (our_weights[name] - value).abs().max() > 1e-5  # the difference is there to see
        else:
            torch.testing.assert_close(our_weights[name], value, atol=1e-5, rtol=0, msg=name)


@needs_cn_clip
def test_a_repeated_image_is_no_negative_for_us(small_sample, vocab_dir, tmp_path, monkeypatch, one_process_group):
    """Where our loss differs on purpose: a batch holding one image twice (a query with two
    positives, an image two queries share). cn_clip scores the copy as a negative of its twin;
    our multi-positive loss leaves it out, so the loss is lower."""
    from model.tokenizer import prepare_tokenizer
    from train.loss import clip_loss

    model = tiny_cn_clip(seed=2)
    path = save_like_training(model, tmp_path / "start.pt")
    pairs, pixels, (images, texts) = _batch(small_sample, 8, repeat_image=True)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    their_loss, _ = _their_step(model, images, texts)
    tokenizer = prepare_tokenizer(str(vocab_dir), None, "", str(tmp_path), 52, "cn-clip")
    ids, mask = tokenizer([q.text for q, _ in pairs])
    image_ids = [i for _, i in pairs]
    our_loss, _, _ = _our_step(path, pixels, ids, mask, image_ids, [q.query_id for q, _ in pairs])
    assert float(our_loss) < float(their_loss) - 1e-3
    # and with the duplicate's mask removed (every other pair a negative), ours is theirs again
    from tiny import tiny_config

    from model.factory import create_model

    ours, _ = create_model(tiny_config("chinese-clip", f"model.name={path}", "data.image_size=224").model)
    ours.eval()  # no dropout: cn_clip's tiny model has none
    with torch.no_grad():
        img = ours.encode_image(torch.from_numpy(pixels))
        txt = ours.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
        unmasked = clip_loss(img, txt, ours.logit_scale.exp(), torch.arange(8), torch.arange(8))
    assert abs(float(unmasked) - float(their_loss)) < 1e-5


# -- its augmentation --------------------------------------------------------------------------------------
def test_our_auto_augment_gives_timms_pixels_for_a_seed(small_sample):
    """cn_clip/training/data.py:71-83 builds, for --use-augment, timm's `create_transform` with these
    arguments (and an RGB conversion, a no-op on RGB images); our uint8 pixels, normalised as the
    model's first layer does, are its tensors."""
    from timm.data import create_transform

    from model.layers import CLIP_MEAN, CLIP_STD
    from train.config import Augment
    from train.transform import augment_image

    theirs = create_transform(input_size=224, scale=(0.9, 1.0), is_training=True, color_jitter=None,
                              auto_augment="original", interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD)
    tsv = ImageTSV(str(small_sample / "MR_train_imgs.tsv"))
    aug = Augment(random_resized_crop=[0.9, 1.0], hflip=0.5, auto_augment="original")
    mean, std = np.array(CLIP_MEAN)[:, None, None], np.array(CLIP_STD)[:, None, None]
    outputs = []
    for k, img_id in enumerate(tsv.ids[:12].tolist()):
        img = tsv.load(img_id)
        rng = np.random.default_rng([0, 0, k])
        ours = augment_image(img, aug, 224, "squash", rng)
        seed = int(np.random.default_rng([0, 0, k]).integers(2**63))  # the seed augment_image drew
        random.seed(seed)
        torch.manual_seed(seed)
        expected = theirs(img).numpy()
        np.testing.assert_allclose((ours.transpose(2, 0, 1) / 255.0 - mean) / std, expected, atol=1e-5)
        outputs.append(ours)
    assert ours.dtype == np.uint8 and ours.shape == (224, 224, 3)
    assert len({o.tobytes() for o in outputs}) == len(outputs)  # seeds differ, augmentations differ


def test_auto_augment_leaves_the_trainers_rng_alone(small_sample):
    from train.config import Augment
    from train.transform import augment_image

    img = ImageTSV(str(small_sample / "MR_train_imgs.tsv")).load(
        int(ImageTSV(str(small_sample / "MR_train_imgs.tsv")).ids[0]))
    torch.manual_seed(5)
    random.seed(5)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(5)
    random.seed(5)
    augment_image(img, Augment(random_resized_crop=[0.9, 1.0], auto_augment="original"), 224, "squash",
                  np.random.default_rng(0))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


# -- its larger models, one layer a tower, through the whole chain ---------------------------------------------
@pytest.fixture(scope="module")
def mini_sample(tmp_path_factory):
    """20 images a split: a ViT-L layer at 336 px costs a tenth of a second an image on a CPU."""
    from competition.sample import make_sample

    out = tmp_path_factory.mktemp("mini")
    make_sample(out, seed=2, n_train_queries=40, n_eval_queries=10, gallery_size=20, workers=1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["cnclip-vit-l14", "cnclip-vit-l14-336", "cnclip-vit-h14"])
def test_the_larger_presets_run_train_export_and_predict(preset, mini_sample, tmp_path):
    small_sample = mini_sample
    from tiny import with_layers

    from bench.shapes import CNCLIP_SHAPES, setting
    from train.config import load_config

    cfg = load_config(f"configs/{preset}.yaml")
    assert cfg.model.grad_checkpointing and cfg.train.batch_size == 1024 and cfg.train.grad_cache_chunk
    size = cfg.data.image_size
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    accepted(muge("train", "--config", f"configs/{preset}.yaml", "--data", small_sample, "--out", run,
                  "--set", "model.name=null", "--set", "model.text.tokenizer=char-vocab",
                  "--set", setting("model.config", with_layers(CNCLIP_SHAPES[preset], 1)),
                  "--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "train.grad_cache_chunk=2",
                  "--set", "data.limit_pairs=8", "--set", "data.workers=0", "--set", "train.compile=false",
                  "--set", "eval.untrained=false", "--set", "eval.batch_size=32"))
    accepted(muge("export", run, "--out", bundle, "--data", small_sample, "--parity-queries", "10",
                  "--parity-gallery", "20", "--parity-batch", "10"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["image_size"] == size and manifest["parity"]["passed"]
    out = tmp_path / "test.jsonl"
    accepted(muge("predict", "--bundle", bundle, "--data", small_sample, "--split", "test", "--out", out,
                  "--cache-dir", tmp_path / "cache", "--workers", "0", "--batch-size", "10"))
    from competition import check_submission

    assert check_submission(small_sample / "MR_test_queries.jsonl", out).ok


# -- the run around the step --------------------------------------------------------------------------------
@pytest.mark.stage
@needs_cn_clip
def test_a_fine_tune_that_ends_worse_keeps_its_pretrained_start(checkpoint, vocab_dir, small_sample, tmp_path,
                                                                monkeypatch, caplog):
    import logging

    import train.main as main
    from model.weights import load_checkpoint

    _, path = checkpoint
    scripted = iter([50.0, 40.0])  # the start, then epoch 1, worse
    real = main.valid_scores
    monkeypatch.setattr(main, "valid_scores", lambda *a, **k: {**real(*a, **k), "mean_recall": next(scripted)})
    caplog.set_level(logging.INFO, logger="train.main")
    accepted(muge("train", "--config", "configs/cnclip-vit-b16.yaml", "--data", small_sample, "--out", tmp_path / "r",
                  "--set", f"model.name={path}", "--set", f"model.text.tokenizer={vocab_dir}", "--set",
                  "train.epochs=1", "--set", "train.compile=false", "--set", "data.workers=0",
                  "--set", "train.batch_size=16", "--set", "data.limit_pairs=32"))
    best = load_checkpoint(str(tmp_path / "r" / "best.pt"))
    assert best["epoch"] == 0 and best["metrics"]["weights"] == "start" and best["metrics"]["mean_recall"] == 50.0
    start = to_hf_state_dict(read_checkpoint(path))
    for name, value in start.items():
        assert torch.equal(best["model"]["clip." + name], value), name
    assert "best.pt holds the pretrained start, untrained" in caplog.text


@pytest.mark.stage
def test_tensorboard_gets_the_runs_scalars(small_sample, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tiny import tiny_config

    from train.main import train_run

    train_run(tiny_config("dual", "train.epochs=2", "train.tensorboard=true", "train.ema=0.9", "train.log_every=2",
                          "data.limit_pairs=96"),
        str(small_sample), str(tmp_path / "r"))
    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/inverse_temperature", "train/samples_per_s", "lr/head", "lr/text", "lr/image",
            "valid/mean_recall", "valid/r1", "valid_ema/mean_recall", "train/epoch_loss"} <= tags
    assert [e.step for e in events.Scalars("valid/mean_recall")] == [0, 1, 2]
    history = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("valid/mean_recall")] == pytest.approx([h["mean_recall"] for h in history])


# -- shapes Chinese-CLIP does not publish -------------------------------------------------------------
@pytest.mark.slow
@needs_cn_clip
def test_heads_the_tensors_cannot_tell_are_refused_warned_or_given(small_sample, vocab_dir, tmp_path, caplog):
    """A text tower 32 wide (32-wide heads): 64-wide heads cannot split it, so the export is
    refused naming --attention-heads; given them, the bundle embeds as cn_clip does. A shape with
    64-wide heads that is not published is exported with a warning that names the heads taken."""
    import logging

    from cn_clip.clip import tokenize
    from cn_clip.clip.model import CLIP

    torch.manual_seed(3)
    model = CLIP(embed_dim=32, image_resolution=224, vision_layers=1, vision_width=64, vision_patch_size=32,
                 vocab_size=21128, text_attention_probs_dropout_prob=0.0, text_hidden_act="gelu",
                 text_hidden_dropout_prob=0.0, text_hidden_size=32, text_initializer_range=0.02,
                 text_intermediate_size=64, text_max_position_embeddings=64, text_num_attention_heads=1,
                 text_num_hidden_layers=1, text_type_vocab_size=2).float().eval()
    path = save_like_training(model, tmp_path / "narrow.pt")
    common = ["--tokenizer", vocab_dir, "--data", small_sample, "--parity-queries", "20", "--parity-gallery", "40"]
    refused(muge("export", "--pretrained", path, "--out", tmp_path / "b0", *common),
            str(path), "text tower is 32 wide", "--attention-heads")
    assert not (tmp_path / "b0").exists()
    refused(muge("export", "--pretrained", path, "--out", tmp_path / "b1", "--attention-heads", "1", *common),
            "--attention-heads")
    accepted(muge("export", "--pretrained", path, "--out", tmp_path / "b2", "--attention-heads", "1,1", *common))
    from predict.runtime import BundleEncoders

    texts = [q.text for q in read_queries(small_sample / "MR_valid_queries.jsonl")][:16]
    with torch.no_grad():
        theirs = model.encode_text(tokenize([cn_clip_text(t) for t in texts], 52))
    theirs = torch.nn.functional.normalize(theirs, dim=-1)
    ours = BundleEncoders(str(tmp_path / "b2"), device="cpu").encode_text(texts)
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="model.cnclip"):
        accepted(muge("export", "--pretrained", save_like_training(tiny_cn_clip(), tmp_path / "tiny.pt"), "--out",
                      tmp_path / "b3", *common))
    assert "not a shape Chinese-CLIP publishes" in caplog.text and "taken as 1 (vision) and 1 (text)" in caplog.text


@needs_cn_clip
def test_export_flags_that_a_pretrained_file_ignores_are_refused(checkpoint, small_sample, tmp_path):
    _, path = checkpoint
    refused(muge("export", "--pretrained", path, "--checkpoint", "last", "--out", tmp_path / "b", "--data",
                 small_sample), "--checkpoint")
    refused(muge("export", tmp_path, "--attention-heads", "1,1", "--out", tmp_path / "b", "--data", small_sample),
            "--attention-heads goes with --pretrained")


# -- tokenizers and files, round 4 --------------------------------------------------------------------
def _export_pretrained(path, small_sample, out, *extra):
    return muge("export", "--pretrained", path, "--out", out, "--data", small_sample, "--parity-queries", "20",
                "--parity-gallery", "40", *extra)


@needs_cn_clip
def test_bad_tokenizers_for_a_cn_clip_file_get_one_clear_error(checkpoint, small_sample, tmp_path):
    """Each names the user's file or flag (never the staging run), and writes no bundle."""
    _, path = checkpoint
    vocab = open(VOCAB, encoding="utf-8").read().splitlines()
    cases = {}
    d = tmp_path / "nospecials"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(t for t in vocab if t not in ("[CLS]", "[SEP]")) + "\n", encoding="utf-8")
    cases[d] = [str(d / "vocab.txt"), "lacks BERT's special tokens [CLS], [SEP]"]
    d = tmp_path / "gbk"
    d.mkdir()
    (d / "vocab.txt").write_bytes("\n".join(vocab).encode("gb18030"))
    cases[d] = [str(d / "vocab.txt"), "not UTF-8"]
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(vocab[:127]) + "\n", encoding="utf-8")
    cases[d] = [f"--tokenizer {d}", "the tokenizer has 127 tokens, the text tower's embedding 21128 rows"]
    cases["char-vocab"] = ["char-vocab builds a vocabulary from the training queries"]
    cases[tmp_path / "missing"] = [str(tmp_path / "missing"), "not found"]
    os.symlink("/dev/zero", tmp_path / "zero")
    cases[tmp_path / "zero"] = [str(tmp_path / "zero"), "not a regular file or a directory"]
    for tokenizer, fragments in cases.items():
        out = tmp_path / "bundle"
        result = refused(_export_pretrained(path, small_sample, out, "--tokenizer", tokenizer), *fragments)
        assert ".pretrained-" not in result.output, result.output
        assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no staging left


@pytest.mark.slow
@needs_cn_clip
def test_cn_clips_vocab_directory_may_hold_a_readme(checkpoint, small_sample, tmp_path):
    _, path = checkpoint
    d = tmp_path / "vocab"
    d.mkdir()
    shutil.copy(VOCAB, d / "vocab.txt")
    (d / "README.md").write_text("Chinese-CLIP's vocabulary\n")
    accepted(_export_pretrained(path, small_sample, tmp_path / "bundle", "--tokenizer", d))


@pytest.mark.stage
@needs_cn_clip
def test_a_fine_tune_resumes_after_its_start_file_moved_and_dual_presets_refuse_one(checkpoint, vocab_dir,
                                                                                    small_sample, tmp_path,
                                                                                    monkeypatch):
    """A 2-epoch fine-tune stopped after epoch 1 (Ctrl-C), its start file then gone: the resume
    rebuilds the model from last.pt alone, and ends exactly where the uninterrupted run ends."""
    import train.main

    _, path = checkpoint
    start = tmp_path / "start.pt"
    shutil.copy(path, start)
    common = ["--config", "configs/cnclip-vit-b16.yaml", "--data", small_sample, "--set", f"model.name={start}",
              "--set", f"model.text.tokenizer={vocab_dir}", "--set", "train.epochs=2", "--set", "train.compile=false",
              "--set", "data.workers=0", "--set", "train.batch_size=16", "--set", "data.limit_pairs=32",
              "--set", "eval.batch_size=64"]
    accepted(muge("train", *common, "--out", tmp_path / "whole"))
    real = train.main.train_one_epoch

    def interrupted(training, model, epoch, step, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(training, model, epoch, step, **kwargs)

    monkeypatch.setattr(train.main, "train_one_epoch", interrupted)
    run = tmp_path / "run"
    assert muge("train", *common, "--out", run).exit_code != 0
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()
    start.unlink()  # every weight the resume needs is in last.pt
    result = accepted(muge("train", "--resume", run, "--data", small_sample))
    assert "best valid MR" in result.output
    def figures(d):  # all but the speed, which no two runs share
        return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
                for line in (d / "metrics.jsonl").read_text().splitlines()]

    assert [r["epoch"] for r in figures(run)] == [0, 1, 2] and figures(run) == figures(tmp_path / "whole")
    refused(muge("train", "--config", "configs/sample.yaml", "--data", small_sample, "--out", tmp_path / "dual",
                 "--set", f"model.name={path}"), "model.family=dual does not use")


# -- FLIP patch masking ---------------------------------------------------------------------------------
@needs_cn_clip
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_a_masked_image_embedding_is_chinese_clips_own(checkpoint, small_sample, ratio):
    """Our masked embedding (training mode, `train.mask_ratio`) against cn_clip's
    `encode_image(image, mask_ratio)`, same weights, images and seed; evaluation never masks."""
    from model.config import ModelConfig
    from model.factory import create_model

    model, path = checkpoint
    _, pixels, (images, _) = _batch(small_sample, 6)
    ours, _ = create_model(ModelConfig(family="chinese-clip", name=str(path)))
    ours.train().set_mask_ratio(ratio)
    with torch.no_grad():
        torch.manual_seed(11)
        got = ours.encode_image(torch.from_numpy(pixels))
        torch.manual_seed(11)
        want = torch.nn.functional.normalize(model.encode_image(images, ratio), dim=-1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        unmasked = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        assert (got - unmasked).abs().max() > 1e-3  # the masking is there to see
        ours.eval()
        torch.testing.assert_close(ours.encode_image(torch.from_numpy(pixels)), unmasked, atol=1e-5, rtol=0)
