"""The fine-tuned model out, in the formats the ecosystem reads (`muge export --format`), for a
model whose family has them (`RetrievalModel.transformers_out`, `.cnclip_state_dict`):

    hf      a `transformers` directory: the model's weights (safetensors), its config, the run's
            tokenizer and the family's processor, and a model card (`README.md`: the base
            weights, the recipe, the valid scores, how to load it); `from_pretrained` loads it
    cnclip  Chinese-CLIP's released checkpoint format (`{"epoch", "step", "name", "state_dict"}`,
            keys `module.`-prefixed), which cn_clip's own code (`load_from_name`, its deploy
            scripts) loads

A family without one refuses it (the model out is then the ONNX bundle). Each is written beside
its destination and renamed into place once it has been checked: the written tensors are read
back from disk and compared with the model's, bit for bit.
"""
from __future__ import annotations

import logging
import os
import shutil

import torch
import yaml

from infra.io import atomic_path
from infra.outputs import OutputKind, check_output, staged_dir
from model.cnclip import published_names
from model.factory import LoadedModel, load_model, source_paths
from model.weights import CheckpointError, safe_load

log = logging.getLogger(__name__)
WHAT = {"hf": "transformers class", "cnclip": "Chinese-CLIP checkpoint layout"}


def _refused(source: str, loaded: LoadedModel, fmt: str) -> CheckpointError:
    return CheckpointError(f"{source}: a {loaded.model.family} model cannot be written as --format {fmt}: its family "
                           f"has no {WHAT[fmt]}; its model out is the ONNX bundle (--format onnx)")


HF_DIRECTORY = OutputKind("transformers directory")


def _is_cnclip_output(path: str) -> bool:
    """A Chinese-CLIP checkpoint file that `--format cnclip` wrote (its `name`)."""
    try:
        obj = safe_load(path, mmap=True)
    except CheckpointError:
        return False
    return isinstance(obj, dict) and obj.get("name") == CNCLIP_NAME and "state_dict" in obj


CNCLIP_NAME = "muge-retrieval"  # the `name` of every cn_clip checkpoint this project writes
CNCLIP_FILE = OutputKind("Chinese-CLIP checkpoint", directory=False, recognise=_is_cnclip_output)


def export_hf(run_dir: str, out_dir: str, checkpoint: str = "best", overwrite: bool | None = None) -> str:
    """Write the run's model as a `transformers` directory at `out_dir` (an earlier one is replaced
    only on success, and nothing else unless `overwrite`: `infra.outputs`)."""
    with staged_dir(out_dir, HF_DIRECTORY, source_paths(run_dir, checkpoint), overwrite) as tmp:
        loaded = load_model(run_dir, checkpoint)
        tokenizer = loaded.save_tokenizer(tmp)  # tmp/tokenizer/: the run's tokenizer.json, as the bundle has it
        out = loaded.model.transformers_out(tokenizer.path, loaded.preprocessing)
        if out is None:
            raise _refused(run_dir, loaded, "hf")
        shutil.rmtree(os.path.dirname(tokenizer.path))
        model, processor = out
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        _check_written(tmp, model)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(run_dir, loaded, model, processor))
    log.info("transformers directory written to %s", out_dir)
    return out_dir


def _check_written(directory: str, model) -> None:
    """Every parameter of `model` is in the directory's safetensors, as the model holds it."""
    from safetensors import safe_open

    ours = model.state_dict()
    for name in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        with safe_open(os.path.join(directory, name), framework="pt") as f:
            for key in f.keys():
                if key not in ours or not torch.equal(f.get_tensor(key), ours.pop(key)):
                    raise CheckpointError(f"{key} was not written as the model holds it")
    missing = sorted(ours.keys() & dict(model.named_parameters()).keys())  # buffers may stay unsaved
    if missing:
        raise CheckpointError(f"parameters missing from the written weights: {missing[:3]}")


def export_cnclip(run_dir: str, out_path: str, checkpoint: str = "best", overwrite: bool | None = None) -> str:
    """Write the run's model as a Chinese-CLIP checkpoint file at `out_path` (an earlier one
    replaced, nothing else unless `overwrite`: `infra.outputs`), read back from disk before it
    takes the name."""
    check_output(out_path, CNCLIP_FILE, source_paths(run_dir, checkpoint), overwrite)
    loaded = load_model(run_dir, checkpoint)
    try:
        state = loaded.model.cnclip_state_dict()
    except CheckpointError as exc:
        raise CheckpointError(f"{run_dir}: {exc}") from None
    if state is None:
        raise _refused(run_dir, loaded, "cnclip")
    checkpoint_file = {"epoch": int(loaded.origin.get("epoch") or 0), "step": 0, "name": CNCLIP_NAME,
                       "state_dict": {"module." + k: v for k, v in state.items()}}
    with atomic_path(out_path, suffix=".pt") as tmp:
        torch.save(checkpoint_file, tmp)
        written = safe_load(tmp, mmap=True)["state_dict"]
        if written.keys() != checkpoint_file["state_dict"].keys() or not all(
                torch.equal(written[k], v) for k, v in checkpoint_file["state_dict"].items()):
            raise CheckpointError(f"{out_path}: the file written does not hold the model's tensors as they are")
    vision, text = published_names(state)
    if vision and text:
        log.info("cn_clip loads it: cn_clip.clip.load_from_name(%r, vision_model_name=%r, text_model_name=%r, "
                 "input_resolution=%d)", out_path, vision, text, loaded.preprocessing.image_size)
    else:
        log.info("%s: not a shape cn_clip publishes a config for (model_configs/): build its CLIP with this shape "
                 "and load_state_dict the file's state_dict", out_path)
    return out_path


def shown_source(name: str) -> str:
    """Weights as a card may name them: a hub name as it is, a local file or directory by its own
    name alone (no card names a path of the machine that wrote it)."""
    from model.config import CHECKPOINT_SUFFIXES

    local = os.path.exists(name) or os.path.isabs(name) or name.endswith(CHECKPOINT_SUFFIXES) or \
        name.startswith((".", "~"))
    return os.path.basename(os.path.normpath(name)) if local else name


def _card_origin(run_dir: str, loaded: LoadedModel, model_class: str) -> tuple[str, str]:
    """(the card's title, its first paragraph): a fine-tuned run's checkpoint, or published weights."""
    if loaded.config is None:  # published weights given as RUN_DIR
        name = shown_source((loaded.origin.get("pretrained") or {}).get("pretrained") or run_dir)
        return (f"# {model_class} ({name})", f"The published weights `{name}` as muge-retrieval loads them, not "
                "fine-tuned here.")
    model = loaded.config.get("model", {})
    base = f"`{shown_source(model['name'])}`" if model.get("name") else "a random start (model.config)"
    run = os.path.basename(os.path.abspath(run_dir))
    return (f"# {model_class} fine-tuned for MUGE text-to-image retrieval ({run})",
            f"Fine-tuned with muge-retrieval from {base} on the MUGE multimodal retrieval train split; this is the "
            f"run's `{os.path.basename(loaded.origin['checkpoint'])}` (epoch {loaded.origin.get('epoch')}, sha256 "
            f"`{loaded.origin['sha256']}`).")


def _card_lora(train: dict) -> list[str]:
    """The card's LoRA section, for a run that trained adapters."""
    lora = train.get("lora") or {}
    if not lora.get("rank"):
        return []
    targets = {kind: lora.get(f"{kind}_targets") for kind in ("text", "image")}
    shown = "; ".join(f"{kind}: {', '.join(t) if t else 'none' if t == [] else 'the family default'}"
                      for kind, t in targets.items())
    return ["## LoRA", "", f"Trained with LoRA adapters (peft): rank {lora['rank']}, alpha {lora.get('alpha')}, "
            f"targets {shown}. The adapters are merged into these weights (W + B A alpha / rank): adapters merged, "
            "a plain model of the architecture below.", ""]


def model_card(run_dir: str, loaded: LoadedModel, model, processor) -> str:
    """The `README.md` of a `transformers` directory: where the weights started, the recipe, the
    valid scores of each scored epoch (the run's `metrics.jsonl`), its preprocessing, how to load it."""
    from infra.history import HISTORY, read_history

    config = loaded.config or {}
    train, data = config.get("train", {}), loaded.preprocessing
    history_path = os.path.join(run_dir, HISTORY)
    history = read_history(history_path) if loaded.config and os.path.isfile(history_path) else []
    best = loaded.origin.get("valid_metrics") or {}
    rows = [f"| {h.epoch} | {h.r1:.2f} | {h.r5:.2f} | {h.r10:.2f} | {h.mean_recall:.2f} |"
            for h in history if h.mean_recall is not None]
    recipe = {key: train.get(key) for key in ("epochs", "batch_size", "accum_steps", "grad_cache_chunk", "lr",
                                              "layer_decay", "weight_decay", "warmup_steps", "precision", "ema",
                                              "mask_ratio", "label_smoothing") if key in train}
    title, origin = _card_origin(run_dir, loaded, type(model).__name__)
    model_class, processor_class = type(model).__name__, type(processor).__name__
    scores = ["## Valid scores", "", "MUGE valid, scored with the competition's metric (x100); epoch 0 is the start.",
              "", "| epoch | R@1 | R@5 | R@10 | MeanRecall |", "|---|---|---|---|---|", *rows, "",
              f"The checkpoint holds epoch {best.get('epoch', loaded.origin.get('epoch'))}'s weights "
              f"(MeanRecall {best['mean_recall']:.2f})." if "mean_recall" in best else "", ""] if rows else []
    recipe_lines = ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False).strip(),
                    "```", ""] if recipe else []
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: zero-shot-image-classification",
        f"tags: [{loaded.model.family}, muge, text-to-image-retrieval]", "---", "", title, "", origin, "",
        *scores, *recipe_lines, *_card_lora(train),
        "## Preprocessing", "",
        f"- images: RGB, {data.resize_rule} to {data.image_size} x {data.image_size} px (bicubic), CLIP's mean and std "
        "(the processor here does the same; the project's own resize is `competition.preprocess.resize_image`)",
        f"- text: {data.text_normalization} normalisation, then the tokenizer, at most {data.max_text_length} tokens",
        "", "## Load it", "", "```python",
        f"from transformers import {model_class}, {processor_class}", "",
        f'model = {model_class}.from_pretrained("THIS_DIRECTORY")',
        f'processor = {processor_class}.from_pretrained("THIS_DIRECTORY")',
        'inputs = processor(text=["红色连衣裙"], images=[image], return_tensors="pt", padding=True)',
        "text = model.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)",
        "image = model.get_image_features(pixel_values=inputs.pixel_values)",
        "# transformers >= 5 returns outputs: the features are their .pooler_output; L2-normalise both to rank",
        "```", ""])
