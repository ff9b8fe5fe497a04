"""Scale-out equivalences: DDP over gloo vs one process, gradient caching vs the full batch,
and a real `torchrun` launch with resume."""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import tiny_config

from model.factory import create_model
from train.guard import DivergenceGuard
from train.loss import ClipLoss
from train.scheduler import create_scheduler
from train.step import StepParts, train_step

CPU = torch.device("cpu")
NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)
TINY_VIT = ("model.image.kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2, "
            "drop_rate: 0.1, proj_drop_rate: 0.1}")
NO_DROPOUT = {"dual": ["model.text.config.hidden_dropout_prob=0.0",
                       "model.text.config.attention_probs_dropout_prob=0.0", "model.image.kwargs.drop_rate=0.0",
                       "model.image.kwargs.proj_drop_rate=0.0", "model.head_dropout=0.0"],
              "chinese-clip": ["model.config.text_config.hidden_dropout_prob=0.0",
                               "model.config.text_config.attention_probs_dropout_prob=0.0"]}


def _model(family: str, dropout: bool):
    """A tiny model without BatchNorm (a ViT image tower for `dual`): chunked or per-rank forwards
    are then the same function as the full-batch forward."""
    overrides = ["model.image.name=vit_tiny_patch16_224", TINY_VIT] if family == "dual" else []
    if not dropout:
        overrides += NO_DROPOUT[family]
    cfg = tiny_config(family, *overrides)
    torch.manual_seed(0)
    model, _ = create_model(cfg.model, vocab_size=64)
    return model.train()


def _batch(n: int = 12, seed: int = 0) -> dict:
    """n pairs with a shared image (pairs 1 and 7) and a shared query (pairs 2 and 8): the
    multi-positive mask has to work across what would be two ranks' halves."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (n, 10), generator=g)
    mask = (torch.arange(10)[None, :] < torch.randint(3, 11, (n, 1), generator=g)).long()
    image_ids, query_ids = torch.arange(100, 100 + n), torch.arange(n)
    image_ids[7], query_ids[8] = image_ids[1], query_ids[2]
    return {"pixels": torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g),
            "input_ids": ids * mask, "attention_mask": mask, "image_ids": image_ids, "query_ids": query_ids}


def _step(model, batch, chunk=None, loss="infonce"):
    """(loss, gradients) of one `train_step`: the gradients as the optimizer is handed them (after
    DDP's all-reduce), read by a step pre-hook; its learning rate is 0, so the weights stay. The
    loss's own parameters (the sigmoid loss's bias) are read too, as `loss.NAME`."""
    model.zero_grad(set_to_none=True)
    criterion = ClipLoss(kind=loss)
    names = {p: n for n, p in model.named_parameters()} | {p: f"loss.{n}" for n, p in criterion.named_parameters()}
    optimizer, grads = torch.optim.SGD(list(names), lr=0.0), {}
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: grads.update(
        {names[p]: p.grad.clone() for p in names if p.grad is not None}))
    parts = StepParts(criterion, optimizer, create_scheduler(optimizer, 0, 10), NO_SCALER, "fp32", CPU,
                      DivergenceGuard(5, CPU), grad_cache_chunk=chunk)
    torch.manual_seed(1)  # dropout masks
    loss, _ = train_step(parts, model, batch)
    return float(loss), grads


def _assert_same(a, b, atol=1e-5):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert loss_a == pytest.approx(loss_b, abs=atol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 20
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["dual", "chinese-clip"])
def test_grad_cache_gradients_equal_the_full_batch_step(family):
    model = _model(family, dropout=False)
    batch = _batch()
    full = _step(model, batch)
    for chunk in (4, 5):  # 5: a short last chunk
        _assert_same(_step(model, batch, chunk), full)
    assert full[1]["logit_scale" if family == "dual" else "clip.logit_scale"].abs().item() > 0


def _chunks_in_memory(model, batch, chunk):
    """The reference for dropout: chunk-wise forwards with grad, all activations kept, one loss."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    outs = [model(batch["pixels"][i:i + chunk], batch["input_ids"][i:i + chunk], batch["attention_mask"][i:i + chunk])
            for i in range(0, len(batch["pixels"]), chunk)]
    loss, value = ClipLoss()(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), outs[0][2],
                             batch["image_ids"], batch["query_ids"])
    loss.backward()
    return float(value), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_cache_replays_dropout_masks():
    """With dropout on, the grad pass must see the masks of the no-grad pass (RNG replayed)."""
    model = _model("dual", dropout=True)
    batch = _batch()
    _assert_same(_step(model, batch, chunk=4), _chunks_in_memory(model, batch, 4))
    plain = _step(model, batch)
    assert abs(plain[0] - _step(model, batch, chunk=4)[0]) > 1e-4  # dropout is really on


@pytest.mark.parametrize("family", ["dual", "chinese-clip"])
def test_grad_cache_replays_flip_masks(family):
    """FLIP masking (a timm ViT's patch dropout, Chinese-CLIP's masking): the grad pass drops the
    patches the no-grad pass dropped (RNG replayed), so the step equals chunk-wise forwards."""
    model = _model(family, dropout=False)
    model.set_mask_ratio(0.5)
    batch = _batch()
    _assert_same(_step(model, batch, chunk=4), _chunks_in_memory(model, batch, 4))
    masked = _step(model, batch)
    model.set_mask_ratio(0.0)
    assert abs(masked[0] - _step(model, batch)[0]) > 1e-4  # the masking is really on


def test_grad_cache_restores_batchnorm_statistics():
    """BN towers: the no-grad pass must not update running statistics a second time."""
    cfg = tiny_config("dual")
    torch.manual_seed(0)
    model = create_model(cfg.model, vocab_size=64)[0].train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    _step(model, _batch(), chunk=6)
    counts = {n: int(b) for n, b in model.named_buffers() if n.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {2}  # two chunks, each counted once
    assert any(not torch.equal(before[n], b) for n, b in model.named_buffers() if n.endswith("running_mean"))


@contextlib.contextmanager
def _gloo_rank(rank: int, world: int, init_file: str):
    """This process as gloo rank `rank` of `world`; yields its slice of `_batch()`."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        full = _batch()
        half = len(full["pixels"]) // world
        yield {k: v[rank * half:(rank + 1) * half] for k, v in full.items()}
    finally:
        dist.destroy_process_group()


def _save_step(result, path):
    loss, grads = result
    torch.save((loss, {n.removeprefix("module."): g for n, g in grads.items()}), path)


DDP_CASES = (("dual", None, "infonce"), ("chinese-clip", 3, "infonce"),  # 3: gradient caching under DDP too
             ("dual", None, "sigmoid"), ("chinese-clip", 3, "sigmoid"))  # SigLIP's loss, its bias across ranks


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str):
    from torch.nn.parallel import DistributedDataParallel

    with _gloo_rank(rank, world, init_file) as local:
        for family, chunk, loss in DDP_CASES:
            ddp = DistributedDataParallel(_model(family, dropout=False))
            _save_step(_step(ddp, local, chunk, loss), os.path.join(out_dir, f"{family}-{loss}-rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_on_the_union(tmp_path):
    """Two gloo ranks on halves A and B: the same loss and gradients as one process on A+B, with
    either loss (the sigmoid loss's bias included)."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    for family, _, loss in DDP_CASES:
        single = _step(_model(family, dropout=False), _batch(), loss=loss)
        assert ("loss.bias" in single[1]) == (loss == "sigmoid")
        for rank in (0, 1):
            _assert_same(torch.load(tmp_path / f"{family}-{loss}-rank{rank}.pt"), single)


def open_clip_siglip(image, text, logit_scale, logit_bias):
    """open_clip's `SigLipLoss` on one process (its `get_ground_truth`, `get_logits`, `_loss`, read
    from its code): +1 on the diagonal, -1 elsewhere, the sum over the batch size."""
    logits = logit_scale * image @ text.T + logit_bias
    labels = 2 * torch.eye(len(image)) - torch.ones(len(image), len(image))
    return -torch.nn.functional.logsigmoid(labels * logits).sum() / image.shape[0]


def test_the_sigmoid_loss_is_siglips():
    """Ours against open_clip's formula: the loss and its gradients (features, scale, bias), with
    SigLIP's start (t' = log 10, b = -10); and a repeated image or query is a positive, not a
    negative."""
    g = torch.Generator().manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1).requires_grad_()
                   for _ in range(2))
    log_scale = torch.tensor(2.302585092994046, requires_grad=True)  # log 10
    ours = ClipLoss(kind="sigmoid")
    assert float(ours.bias.detach()) == -10.0
    loss, _ = ours(image, text, log_scale, torch.arange(8), torch.arange(8))
    mine = torch.autograd.grad(loss, (image, text, log_scale, ours.bias))
    ref_bias = torch.tensor(-10.0, requires_grad=True)
    theirs = open_clip_siglip(image, text, log_scale.exp(), ref_bias)
    assert abs(float(loss) - float(theirs)) < 1e-6
    for a, b in zip(mine, torch.autograd.grad(theirs, (image, text, log_scale, ref_bias))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    same_image = torch.arange(8)
    same_image[5] = 2  # pairs 2 and 5 share an image: (text 5, image 2) is a positive too
    repeated, _ = ours(image, text, log_scale, same_image, torch.arange(8))
    logits = 10 * image @ text.T - 10
    assert float(repeated) == pytest.approx(float(theirs) + float(
        torch.nn.functional.logsigmoid(-logits[2, 5]) - torch.nn.functional.logsigmoid(logits[2, 5])
        + torch.nn.functional.logsigmoid(-logits[5, 2]) - torch.nn.functional.logsigmoid(logits[5, 2])) / 8, abs=1e-5)


def _unfreeze_worker(rank: int, world: int, init_file: str, out_dir: str):
    """A freezing schedule under DDP, as `train.main` runs it: the wrapper is rebuilt when the
    trainable set changes, so the newly unfrozen parameters' gradients are all-reduced too."""
    from train.config import FreezeConfig
    from train.distributed import World
    from train.main import wrap_ddp
    from train.optim import apply_freeze

    with _gloo_rank(rank, world, init_file) as local:
        model, here = _model("dual", dropout=False), World(rank, rank, world)
        trainable = apply_freeze(model, FreezeConfig(text_layers=1, image_stages=1), 0)
        ddp = wrap_ddp(model, here, CPU)
        _step(ddp, local)  # a frozen epoch
        now = apply_freeze(model, FreezeConfig(text_layers=1, image_stages=1, schedule={1: {"text_layers": 99,
                                                                                           "image_stages": 99}}), 1)
        assert now != trainable
        ddp = wrap_ddp(model, here, CPU)
        _save_step(_step(ddp, local), os.path.join(out_dir, f"unfrozen-rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_after_unfreezing_equals_one_process(tmp_path):
    """Without rebuilding DDP, the parameters frozen when it was built would keep each rank's own
    gradient (never averaged) and the ranks would drift apart."""
    import torch.multiprocessing as mp

    mp.spawn(_unfreeze_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    single = _step(_model("dual", dropout=False), _batch())
    for rank in (0, 1):
        _assert_same(torch.load(tmp_path / f"unfrozen-rank{rank}.pt"), single)


@pytest.mark.slow
def test_torchrun_trains_resumes_and_only_rank0_writes(small_sample, tmp_path):
    from model.weights import load_checkpoint
    from train.config import save_config

    preset = tmp_path / "tiny.yaml"
    save_config(tiny_config("dual", "train.batch_size=16", "eval.untrained=false"), str(preset))
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "train.cli"]
    # pinned to CPU/gloo: the same two-process run on a CPU box and on a one-GPU box
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "CUDA_VISIBLE_DEVICES": ""}
    first = subprocess.run(torchrun + ["--config", str(preset), "--data", str(small_sample), "--out", str(out),
                                       "--set", "train.epochs=1"], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("best valid MR") == 2  # each rank returns; rank 0 alone evaluated
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1]
    from model.factory import build_from_arch
    from train.evaluate import EvalSettings, evaluate

    best = load_checkpoint(str(out / "best.pt"))  # rank 0 scored the weights all ranks trained
    model = build_from_arch(best["arch"])
    model.load_state_dict(best["model"])
    from competition.preprocess import TextTokenizer

    score = evaluate(model, TextTokenizer(out / "tokenizer", 24), str(small_sample / "MR_valid_queries.jsonl"),
                     str(small_sample / "MR_valid_imgs.tsv"), EvalSettings(32, "squash", 64, 0, torch.device("cpu")))
    assert history[0]["mean_recall"] == pytest.approx(score.mean_recall, abs=100 / 40)  # a query's worth at most
    # epoch 1 covered len(pairs) // (2 ranks x 16) steps of the global batch of 32

    ckpt = load_checkpoint(str(out / "last.pt"))
    pairs = sum(len(json.loads(x)["item_ids"]) for x in open(small_sample / "MR_train_queries.jsonl"))
    assert ckpt["step"] == pairs // 2 // 16
    assert sorted(os.listdir(out)) == [".muge-output.json", "best.pt", "config.yaml", "curves.png", "last.pt",
                                       "metrics.jsonl", "tokenizer"]
    second = subprocess.run(torchrun + ["--resume", str(out), "--data", str(small_sample), "--set", "train.epochs=2"],
                            capture_output=True, text=True, env=env)  # resume under DDP into a second epoch
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stderr and load_checkpoint(str(out / "last.pt"))["epoch"] == 2
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]


def test_more_processes_than_gpus_is_refused_before_any_work(monkeypatch):
    from train import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a simulated one-GPU node
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device reached"))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: pytest.fail("process group joined"))
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(distributed.DistributedSetupError,
                       match=r"2 processes on this node but 1 GPU\(s\) visible: launch torchrun with "
                             r"--nproc_per_node=1"):
        distributed.init_distributed()


def _lora_model(family: str):
    """`_model` with LoRA adapters (their B away from zero, so every adapter has a gradient) and
    the towers' own weights frozen, as `train.lora` trains it."""
    from model.config import LoraConfig
    from model.lora import add_lora
    from train.config import FreezeConfig
    from train.optim import apply_freeze

    model = _model(family, dropout=False)
    torch.manual_seed(2)
    add_lora(model, LoraConfig(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    apply_freeze(model, FreezeConfig())
    return model.train()


def _lora_ddp_worker(rank: int, world: int, init_file: str, out_dir: str):
    from train.distributed import World
    from train.main import wrap_ddp

    with _gloo_rank(rank, world, init_file) as local:
        for family, chunk in (("dual", None), ("chinese-clip", 3)):
            ddp = wrap_ddp(_lora_model(family), World(rank, rank, world), CPU)
            _save_step(_step(ddp, local, chunk), os.path.join(out_dir, f"lora-{family}-rank{rank}.pt"))


@pytest.mark.slow
def test_lora_under_ddp_and_gradient_caching_equals_one_process(tmp_path):
    """Two gloo ranks with LoRA adapters (and the gradient cache for chinese-clip): the adapters',
    heads' and logit scale's gradients equal one process on the union; the frozen weights get none."""
    import torch.multiprocessing as mp

    mp.spawn(_lora_ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    for family in ("dual", "chinese-clip"):
        single = _step(_lora_model(family), _batch())
        assert any(".lora_" in n for n in single[1]) and not any("base_layer" in n for n in single[1])
        for rank in (0, 1):
            loss, grads = torch.load(tmp_path / f"lora-{family}-rank{rank}.pt")
            assert loss == pytest.approx(single[0], abs=1e-5) and grads.keys() == single[1].keys()
            for name, grad in grads.items():
                torch.testing.assert_close(grad, single[1][name], atol=1e-5, rtol=1e-4, msg=name)
