"""`muge bench scale`: the Chinese-CLIP presets at their published shapes, end to end, on this
machine: what grows with the model (protobuf's 2 GiB limit, memory, time) seen at real size.

For each preset (B/16, L/14, L/14@336px, H/14 with their RoBERTa text towers):
1. a random-weight checkpoint at the published shape in Chinese-CLIP's released format, made
   with cn_clip's own `CLIP` class from its own `model_configs/` (reused when present);
2. `muge export --pretrained CKPT` on a small split with small parity sets;
3. `muge predict` of that split's valid queries, compared with cn_clip's own `encode_*`
   rankings on the same images (top-10 overlap, MeanRecall);
4. two steps of `muge train --config configs/PRESET.yaml --set model.name=CKPT` with the preset's
   own gradient cache, checkpointing and augmentation at a small batch, where memory allows;
5. the training memory the preset's comment quotes: weights + gradients + AdamW state counted
   on the model after one optimizer step, and the activations held per pair with gradient
   checkpointing (tensors saved for backward under bf16 autocast, counted on the CPU; plus one
   layer's recompute at backward).
Each stage runs as its own `muge` process: its wall time and peak resident set (the kernel's
`ru_maxrss` of that process) are the row's. Not part of `make test`: `make bench-scale`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import click

from infra.history import run_history
from predict.manifest import read_manifest

from .shapes import CNCLIP_SHAPES
from .table import ROOT, FiniteFloatRange, emit, in_checkout, prepare_work, table_options

# preset -> cn_clip's own model name (cn_clip/clip/model_configs/VISION.json + TEXT.json)
CNCLIP_MODELS = {"cnclip-vit-b16": "ViT-B-16@RoBERTa-wwm-ext-base-chinese",
                 "cnclip-vit-l14": "ViT-L-14@RoBERTa-wwm-ext-base-chinese",
                 "cnclip-vit-l14-336": "ViT-L-14-336@RoBERTa-wwm-ext-base-chinese",
                 "cnclip-vit-h14": "ViT-H-14@RoBERTa-wwm-ext-large-chinese"}
GIB = 2**30
STAGES = ("export", "predict", "train", "memory")
# a training run is tried only where its weights, gradients and AdamW state (16 bytes a
# parameter) plus the loaded checkpoint leave this much of the machine's memory free
TRAIN_HEADROOM_BYTES = 2 * GIB


def cn_clip_info(preset: str) -> dict:
    """cn_clip's `CLIP(**info)` arguments for the preset, from its own model configs."""
    import cn_clip.clip

    configs = os.path.join(os.path.dirname(cn_clip.clip.__file__), "model_configs")
    info = {}
    for part in CNCLIP_MODELS[preset].split("@"):
        with open(os.path.join(configs, part + ".json"), encoding="utf-8") as f:
            info.update(json.load(f))
    return info


def cnclip_checkpoint(preset: str, path: str, seed: int = 0) -> str:
    """A random-weight checkpoint at `preset`'s published shape in Chinese-CLIP's released
    format (`{"state_dict": {"module.…": tensor}}`, fp32), built with cn_clip's own `CLIP`;
    reused when `path` exists (written to a temporary name and renamed)."""
    if os.path.isfile(path):
        return path
    import torch
    from cn_clip.clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(**cn_clip_info(preset)).float()
    state = {"module." + k: v for k, v in model.state_dict().items()}
    del model
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".part"
    torch.save({"epoch": 0, "step": 0, "name": preset, "state_dict": state}, tmp)
    os.replace(tmp, path)
    return path


def cn_clip_model(preset: str, path: str):
    """cn_clip's own `CLIP` with the checkpoint's weights, in eval mode."""
    import torch
    from cn_clip.clip.model import CLIP

    model = CLIP(**cn_clip_info(preset)).float()
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    model.load_state_dict({k[len("module."):]: v for k, v in state.items()})
    return model.eval()


def cn_clip_text(text: str) -> str:
    """cn_clip/eval/data.py:23 (and cn_clip/training/data.py:31) `_preprocess_text`, applied before
    `tokenize` at training and evaluation alike; inlined because those modules import lmdb."""
    return text.lower().replace("\u201c", '"').replace("\u201d", '"')


def cn_clip_rankings(model, queries, tsv, resolution: int = 224, batch: int = 8) -> list[list[int]]:
    """Chinese-CLIP's own way: its `image_transform` and `tokenize` (context 52), `encode_*`,
    normalised features, every score sorted; the top 10 ids of each query."""
    import numpy as np
    import torch
    from cn_clip.clip import image_transform, tokenize
    from PIL import Image

    from competition import resize_image

    transform = image_transform(resolution)
    ids = tsv.ids.tolist()
    with torch.no_grad():
        images = torch.cat([model.encode_image(torch.stack([
            transform(Image.fromarray(resize_image(tsv.load(i), resolution))) for i in ids[start:start + batch]]))
            for start in range(0, len(ids), batch)])
        texts = model.encode_text(tokenize([cn_clip_text(q.text) for q in queries], 52))
    images, texts = (torch.nn.functional.normalize(x, dim=-1).numpy() for x in (images, texts))
    order = np.argsort(-(texts @ images.T), axis=1, kind="stable")[:, :10]
    return [tsv.ids[row].tolist() for row in order]


def run_measured(args: list[str], log_path: str, code: str = "from muge_cli import main; main()") -> dict:
    """Run `muge ARGS` (or other Python `code`) as a child process, its output into `log_path`;
    wall seconds, peak RSS (the child's own ru_maxrss) and how it ended."""
    cmd = [sys.executable, "-c", code, *map(str, args)]
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    ended = "ok" if proc.returncode == 0 else (f"killed by signal {-proc.returncode}" + (
        " (the kernel's OOM killer: out of memory)" if proc.returncode == -9 else "") if proc.returncode < 0
        else f"exit {proc.returncode}: {_last_line(log_path)}")
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2), "status": ended}


def _last_line(path: str, limit: int | None = 200) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


def small_split(work: str, queries: int, images: int) -> str:
    """The embedded sample's generator at a small size: the split every preset is run on."""
    from competition.sample import make_sample

    out = os.path.join(work, f"data-{queries}q-{images}i")
    if not os.path.isfile(os.path.join(out, "MR_valid_queries.jsonl")):
        make_sample(out, seed=0, n_train_queries=max(64, 2 * queries), n_eval_queries=queries, gallery_size=images)
    return out


def bundle_sizes(bundle: str) -> dict:
    """MiB on disk of each graph with its external-data file, and which graphs have one."""
    manifest = read_manifest(bundle)
    sizes = {}
    for name in ("text.onnx", "image.onnx", "text.fp16.onnx", "image.fp16.onnx"):
        files = [name, *manifest.external_data.get(name, ())]
        sizes[name.replace(".onnx", "").replace(".", "_") + "_mib"] = round(sum(os.path.getsize(os.path.join(bundle, f))
                                                         for f in files) / 2**20)
    sizes["external_data"] = ",".join(manifest.external_data) or "-"
    return sizes


def param_count(preset: str) -> int:
    """Parameters of the preset's model at its published shape (counted on the meta device)."""
    import torch
    from transformers import ChineseCLIPConfig, ChineseCLIPModel

    with torch.device("meta"):
        model = ChineseCLIPModel(ChineseCLIPConfig(**CNCLIP_SHAPES[preset]))
    return sum(p.numel() for p in model.parameters())


def memory_figures(preset: str, mask_ratio: float = 0.0, lora_rank: int = 0, work: str | None = None) -> dict:
    """Training memory of the preset at its published shape (random weights), measured on the CPU
    by the training memory model (`train.memory.measure`: the state after one optimizer step, and
    the bytes held per pair with and without checkpointing, unmasked and with FLIP masking), the
    preset's own row (its checkpointing, its chunk) summed. `mask_ratio`: the FLIP rows' ratio
    (default `train.memory.FLIP_RATIO`). `lora_rank`: with LoRA adapters of that rank (the
    preset's other `train.lora` settings): the towers' weights frozen, so only the adapters, heads
    and logit scale have gradients and AdamW state. `work`: also write, as training does
    (`save_checkpoint`), the model and AdamW state `last.pt` holds after that step and the plain
    (merged) model `best.pt` holds, and give the files' sizes (a run's files add kilobytes: its
    config, schedule, RNG and history); both are removed again. `memory_model` is the entry
    `muge plan` reads (`train/memory_model.json`, written with `--memory-model`)."""
    from train.config import load_config
    from train.memory import FLIP_RATIO, GIB, MIB, measure, pair_key

    from .shapes import setting

    cfg = load_config(os.path.join(ROOT, "configs", f"{preset}.yaml"), [
        "model.name=null", setting("model.config", CNCLIP_SHAPES[preset]), f"train.lora.rank={lora_rank}"])
    ratio = mask_ratio or FLIP_RATIO
    figures = measure(cfg, text_length=52, ratios=(0.0, ratio))
    checkpointing = bool(cfg.model.grad_checkpointing)
    pair = figures["per_pair_bytes"][pair_key(checkpointing, mask_ratio)]
    chunk = cfg.train.grad_cache_chunk or cfg.train.batch_size
    model, optimizer = figures.pop("model"), figures.pop("optimizer")
    files = checkpoint_sizes(model, optimizer, work) if work else {}
    return {"params_m": round(figures["params"] / 1e6, 1), "state_gib": round(figures["state_bytes"] / GIB, 2),
            "checkpointing": checkpointing, "mask_ratio": mask_ratio, "lora_rank": lora_rank,
            "trainable_m": round(figures["trainable"] / 1e6, 2), "per_pair_mib": round(pair / MIB, 1),
            "chunk": chunk, "chunk_activations_gib": round(chunk * pair / GIB, 2),
            "total_gib": round((figures["state_bytes"] + chunk * pair) / GIB, 2), **files,
            "memory_model": {**figures, "flip_ratio": ratio}}


MEMORY_MODEL_KIND = "muge memory model"


def memory_model_output(ctx, param, value):
    """A click callback: `--memory-model` is a new file or an earlier memory model (`infra.outputs`)."""
    from infra.outputs import OutputKind, check_output, json_with_keys

    if value is not None:
        try:
            check_output(value, OutputKind(MEMORY_MODEL_KIND, directory=False, recognise=lambda path: json_with_keys(
                path, "kind", "presets")), flag="--memory-model")
        except (ValueError, OSError) as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


def write_memory_model(path: str, rows: list[dict]) -> None:
    """The memory stage's figures (`memory_figures`' `memory_model`, by preset and LoRA rank), with
    each preset's batch and the date, commit and machine, laid over an earlier file's presets."""
    from infra.io import atomic_write_text
    from train.config import load_config, to_dict

    from .table import stamp

    model = {"kind": MEMORY_MODEL_KIND, "presets": {}}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            model = json.load(f)
    for r in rows:
        if r["stage"] != "memory" or r["status"] != "ok":
            continue
        cfg = load_config(os.path.join(ROOT, "configs", f"{r['preset']}.yaml"))
        entry = model["presets"].setdefault(r["preset"], {"runs": {}})
        entry.update(batch_size=cfg.train.batch_size, grad_checkpointing=cfg.model.grad_checkpointing,
                     lora=to_dict(cfg)["train"]["lora"], measured=stamp())
        entry["runs"][str(r["figures"]["lora_rank"])] = r["figures"]["memory_model"]
    atomic_write_text(path, json.dumps({**model, "kind": MEMORY_MODEL_KIND}, indent=1, sort_keys=True) + "\n")


def checkpoint_sizes(model, optimizer, work: str) -> dict:
    """Bytes of `last.pt`'s model and optimizer entries and of `best.pt`'s model, written by
    `save_checkpoint` into a temporary directory under `work` (removed again)."""
    from model.lora import merged_state_dict
    from train.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory(prefix=".checkpoints-", dir=work) as tmp:
        last, best = os.path.join(tmp, "last.pt"), os.path.join(tmp, "best.pt")
        save_checkpoint(last, {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
        save_checkpoint(best, {"model": merged_state_dict(model)})
        return {"last_pt_bytes": os.path.getsize(last), "best_pt_bytes": os.path.getsize(best)}


def summary(stage: str, f: dict) -> str:
    """One stage's figures in a few words, for the printed table (`--json` keeps every figure)."""
    if stage == "checkpoint":
        return f"{f['file_gib']} GiB" + (" (made before, reused)" if f["reused"] else "")
    if stage == "export":
        external = f" (external data: {f['external_data']})" if f["external_data"] != "-" else ""
        return (f"MiB text {f['text_mib']}, image {f['image_mib']}, fp16 {f['text_fp16_mib']} / "
                f"{f['image_fp16_mib']}{external}")
    if stage == "predict":
        return (f"top-10 overlap with cn_clip {100 * f['top10_overlap_cn_clip']:.1f}%, MR {f['mr']} vs cn_clip "
                f"{f['mr_cn_clip']}")
    if stage == "train":
        return f"{f['steps']} steps of {f['batch']}, untrained MR {f['untrained_mr']}, wrote {f['checkpoints']}"
    masked = f", FLIP mask {f['mask_ratio']:g}" if f.get("mask_ratio") else ""
    masked += f", LoRA rank {f['lora_rank']} ({f['trainable_m']}M trained)" if f.get("lora_rank") else ""
    return (f"{f['params_m']}M params{masked}: state {f['state_gib']} GiB + {f['chunk']} x {f['per_pair_mib']} MiB = "
            f"{f['total_gib']} GiB; last.pt {f['last_pt_bytes'] / GIB:.2f} GiB, best.pt {f['best_pt_bytes'] / GIB:.2f} "
            "GiB")


def _machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def bench_one(preset: str, work: str, data: str, opts: dict, echo) -> list[dict]:
    """Every stage of one preset; a failed stage is a row with its status, and the next stage
    that needs its output is skipped."""
    from competition import ImageTSV, read_queries, score_predictions

    d = os.path.join(work, preset)
    os.makedirs(d, exist_ok=True)
    ckpt = os.path.join(work, f"{preset}.pt")
    rows = []

    def row(stage: str, **fields):
        common = {k: fields.pop(k, None) for k in ("wall_s", "peak_rss_gib", "status")}
        result = summary(stage, fields) if common["status"] == "ok" else ""
        rows.append({"preset": preset, "stage": stage, **common, "result": result, "figures": fields})
        echo(f"  {preset:>18} {stage:>10}: {common['status']}, {common['wall_s']} s, peak RSS "
             f"{common['peak_rss_gib']} GiB; {result}")

    start, reused = time.perf_counter(), os.path.isfile(ckpt)
    cnclip_checkpoint(preset, ckpt)
    row("checkpoint", wall_s=round(time.perf_counter() - start, 1), status="ok",
        file_gib=round(os.path.getsize(ckpt) / GIB, 2), reused=reused)
    bundle = os.path.join(d, "bundle")
    export = {"status": "not run"}
    if "export" in opts["stages"]:
        shutil.rmtree(bundle, ignore_errors=True)
        export = run_measured(["export", "--pretrained", ckpt, "--out", bundle, "--data", data, "--parity-queries",
                               opts["parity_queries"], "--parity-gallery", opts["parity_gallery"], "--parity-batch",
                               4], os.path.join(d, "export.log"))
        row("export", **export, **(bundle_sizes(bundle) if export["status"] == "ok" else {}))
    if export["status"] == "ok" and "predict" in opts["stages"]:
        out, cache = os.path.join(d, "valid.jsonl"), os.path.join(d, "cache")
        shutil.rmtree(cache, ignore_errors=True)  # embedded anew: the bundle is new
        predict = run_measured(["predict", "--bundle", bundle, "--data", data, "--split", "valid", "--out", out,
                                "--cache-dir", cache, "--workers", 0, "--device", "cpu",
                                "--batch-size", 8], os.path.join(d, "predict.log"))
        if predict["status"] == "ok":
            queries = read_queries(os.path.join(data, "MR_valid_queries.jsonl"))
            with open(out, encoding="utf-8") as f:
                ours = {r["query_id"]: r["item_ids"] for r in map(json.loads, f)}
            model = cn_clip_model(preset, ckpt)
            theirs = cn_clip_rankings(model, queries, ImageTSV(os.path.join(data, "MR_valid_imgs.tsv")),
                                      model.visual.input_resolution)
            del model
            overlap = sum(len(set(ours[q.query_id]) & set(t)) for q, t in zip(queries, theirs)) / (10 * len(queries))
            predict.update(top10_overlap_cn_clip=round(overlap, 4),
                           mr=round(score_predictions(queries, ours).mean_recall, 2),
                           mr_cn_clip=round(score_predictions(
                               queries, {q.query_id: t for q, t in zip(queries, theirs)}).mean_recall, 2))
        row("predict", **predict)
    if "train" in opts["stages"]:
        need = 16 * param_count(preset) + os.path.getsize(ckpt) + TRAIN_HEADROOM_BYTES
        if need > _machine_memory():
            row("train", status=f"not run: weights, gradients and AdamW state need {16 * param_count(preset) / GIB:.1f}"
                f" GiB, with the checkpoint and {TRAIN_HEADROOM_BYTES / GIB:.0f} GiB of headroom more than this "
                f"machine's {_machine_memory() / GIB:.1f} GiB; a GPU run is the check")
        else:
            batch = opts["train_batch"]
            run_dir = os.path.join(d, "run")
            shutil.rmtree(run_dir, ignore_errors=True)
            sets = [f"model.name={ckpt}", "train.epochs=1", f"train.batch_size={batch}",
                    f"train.grad_cache_chunk={max(1, batch // 2)}", f"data.limit_pairs={2 * batch}",
                    "data.workers=0", "train.compile=false", "train.warmup_steps=1", "eval.batch_size=8"]
            train = run_measured(["train", "--config", os.path.join(ROOT, "configs", f"{preset}.yaml"), "--data", data,
                                  "--out", run_dir, *[a for s in sets for a in ("--set", s)]],
                                 os.path.join(d, "train.log"))
            if train["status"] == "ok":
                untrained = run_history(run_dir)[0]
                train.update(steps=2, batch=batch, untrained_mr=round(untrained.mean_recall, 2),
                             checkpoints=",".join(n for n in ("last.pt", "best.pt")
                                                  if os.path.isfile(os.path.join(run_dir, n))))
            row("train", **train)
            shutil.rmtree(run_dir, ignore_errors=True)  # last.pt is 16 bytes a parameter
    for rank in opts["lora"] if "memory" in opts["stages"] else ():  # a process each: H/14 holds 15 GiB of state
        log_path = os.path.join(d, f"memory-lora{rank}.log")
        memory = run_measured([preset, opts["mask_ratio"], rank, d], log_path,
                              code="import json, sys; from bench.scale import memory_figures; print(json.dumps("
                              "memory_figures(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))")
        if memory["status"] == "ok":
            memory.update(json.loads(_last_line(log_path, limit=None)))
        row("memory", **memory)
    return rows


@click.command("scale")
@click.option("--preset", "presets", multiple=True, type=click.Choice(list(CNCLIP_MODELS)),
              default=tuple(CNCLIP_MODELS), show_default=True, help="Presets to run at their published shape.")
@click.option("--work", type=click.Path(file_okay=False), **in_checkout("build/scale"),
              help="Checkpoints (reused), bundles, logs.")
@click.option("--valid-queries", type=click.IntRange(min=1), default=12, show_default=True,
              help="Valid queries of the small split predict scores.")
@click.option("--images", type=click.IntRange(min=10), default=40, show_default=True, help="Images per split.")
@click.option("--parity-queries", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--parity-gallery", type=click.IntRange(min=10), default=10, show_default=True)
@click.option("--train-batch", type=click.IntRange(min=2), default=4, show_default=True,
              help="Pairs per step of the two training steps (gradient cache chunk: half of it).")
@click.option("--stage", "stages", multiple=True, type=click.Choice(STAGES), default=STAGES, show_default=True,
              help="Stages to run (predict needs export).")
@click.option("--mask-ratio", type=FiniteFloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="The memory stage with FLIP masking (train.mask_ratio).")
@click.option("--lora", multiple=True, type=click.IntRange(min=0), default=(0,), show_default=True, metavar="RANK",
              help="The memory stage with LoRA adapters of this rank (train.lora.rank); 0: full fine-tuning. "
              "Repeat it for rows side by side (--lora 0 --lora 4).")
@click.option("--memory-model", type=click.Path(dir_okay=False), callback=memory_model_output,
              help="Write the memory stage's figures as the memory model `muge plan` reads (make bench-scale: "
                   "train/memory_model.json), each preset's replacing its earlier entry.")
@table_options
def bench_scale(presets, work, valid_queries, images, parity_queries, parity_gallery, train_batch, stages, mask_ratio,
                lora, memory_model, json_out, csv_out):
    """Published shapes, random weights: export, predict vs cn_clip, two training steps, memory."""
    try:
        import cn_clip.clip  # noqa: F401
    except ImportError:
        raise click.ClickException("cn_clip is needed for its model class and configs: `make setup` installs it "
                                   "(pip install --no-deps cn-clip==1.6.0)") from None
    presets, stages, lora = (tuple(dict.fromkeys(x)) for x in (presets, stages, lora))  # each once, in the order given
    if "predict" in stages and "export" not in stages:
        raise click.BadParameter("the predict stage predicts with the bundle the export stage writes: add --stage "
                                 "export", param_hint="--stage")
    if any(lora) and "memory" not in stages:
        raise click.BadParameter(f"{max(lora)} is a setting of the memory stage, which is not run: add --stage memory",
                                 param_hint="--lora")
    if memory_model and ("memory" not in stages or 0 not in lora or len(lora) < 2):
        raise click.BadParameter("the memory model is a full fine-tune's figures and LoRA's: add --stage memory "
                                 "--lora 0 --lora RANK", param_hint="--memory-model")
    if mask_ratio and "memory" not in stages:
        raise click.BadParameter(f"{mask_ratio} is a setting of the memory stage, which is not run: add --stage "
                                 "memory", param_hint="--mask-ratio")
    prepare_work(work)
    data = small_split(work, valid_queries, images)
    opts = {"parity_queries": parity_queries, "parity_gallery": parity_gallery, "train_batch": train_batch,
            "stages": set(stages), "mask_ratio": mask_ratio, "lora": lora}
    click.echo(f"published shapes with random weights, each stage a muge process (wall time, peak RSS); "
               f"split {data}; work {work}")
    rows = []
    for preset in presets:
        rows += bench_one(preset, work, data, opts, click.echo)
    if memory_model:
        write_memory_model(memory_model, rows)
        click.echo(f"memory model written to {memory_model}")
    emit([{k: v for k, v in r.items() if k != "figures"} for r in rows],
         title="muge bench scale: the Chinese-CLIP presets at their published shapes (random weights); memory: "
               "weights + gradients + AdamW state, + a gradient-cache chunk x (saved + recomputed) per pair",
         json_out=json_out, csv_out=csv_out, extra={"figures": [{"preset": r["preset"], "stage": r["stage"],
                                                                 **r["figures"]} for r in rows]})
