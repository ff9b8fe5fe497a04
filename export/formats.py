"""The fine-tuned model out, in the formats the ecosystem reads (`muge export --format`):

    hf      a `transformers` directory: `ChineseCLIPModel` weights (safetensors), its config, the
            run's tokenizer and a `ChineseCLIPProcessor`, and a model card (`README.md`: the base
            weights, the recipe, the valid scores, how to load it); `from_pretrained` loads it
    cnclip  Chinese-CLIP's released checkpoint format (`{"epoch", "step", "name", "state_dict"}`,
            keys `module.`-prefixed), which cn_clip's own code (`load_from_name`, its deploy
            scripts) loads

A Chinese-CLIP-family run only: a dual model has neither a `transformers` class nor a cn_clip
layout (its model out is the ONNX bundle). Each is written beside its destination and renamed
into place once it has been checked: the written tensors are read back and compared with the
model's, bit for bit.
"""
from __future__ import annotations

import logging
import os
import shutil

import torch
import yaml

from infra.io import atomic_path
from infra.outputs import OutputKind, check_output, staged_dir
from model.chinese_clip import ChineseCLIPEncoder
from model.factory import LoadedModel, load_model, source_paths
from model.layers import CLIP_MEAN, CLIP_STD
from model.weights import CheckpointError, safe_load

log = logging.getLogger(__name__)


def _chinese_clip(source: str, checkpoint: str, fmt: str) -> LoadedModel:
    loaded = load_model(source, checkpoint)
    if not isinstance(loaded.model, ChineseCLIPEncoder):
        raise CheckpointError(f"{source}: a {loaded.arch['family']} model cannot be written as --format {fmt}: only "
                              "the chinese-clip family has a transformers class and Chinese-CLIP's checkpoint "
                              "layout; its model out is the ONNX bundle (--format onnx)")
    return loaded


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
        loaded = _chinese_clip(run_dir, checkpoint, "hf")
        _write_hf(loaded, run_dir, tmp)
    log.info("transformers directory written to %s", out_dir)
    return out_dir


def _write_hf(loaded: LoadedModel, run_dir: str, tmp: str) -> None:
    from safetensors import safe_open
    from tokenizers import Tokenizer
    from transformers import BertTokenizerFast, ChineseCLIPImageProcessor, ChineseCLIPProcessor

    clip, data = loaded.model.clip, loaded.preprocessing
    clip.save_pretrained(tmp, safe_serialization=True)
    tokenizer = loaded.save_tokenizer(tmp)  # tmp/tokenizer/: the run's tokenizer.json, as the bundle has it
    fast = BertTokenizerFast(tokenizer_object=Tokenizer.from_file(tokenizer.path), unk_token="[UNK]",
                             pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                             model_max_length=data.max_text_length)
    shutil.rmtree(os.path.dirname(tokenizer.path))
    size = {"height": data.image_size, "width": data.image_size} if data.resize_rule == "squash" else \
        {"shortest_edge": data.image_size}
    images = ChineseCLIPImageProcessor(size=size, crop_size={"height": data.image_size, "width": data.image_size},
                                       do_center_crop=data.resize_rule != "squash", resample=3,  # bicubic
                                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    ChineseCLIPProcessor(image_processor=images, tokenizer=fast).save_pretrained(tmp)
    ours = clip.state_dict()
    for name in sorted(f for f in os.listdir(tmp) if f.endswith(".safetensors")):
        with safe_open(os.path.join(tmp, name), framework="pt") as f:
            for key in f.keys():
                if key not in ours or not torch.equal(f.get_tensor(key), ours.pop(key)):
                    raise CheckpointError(f"{key} was not written as the model holds it")
    missing = sorted(ours.keys() & dict(clip.named_parameters()).keys())  # buffers may stay unsaved
    if missing:
        raise CheckpointError(f"parameters missing from the written weights: {missing[:3]}")
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(run_dir, loaded))


def _cnclip_mismatch(config) -> str | None:
    """Where the model differs from every model cn_clip's `CLIP` can build (its vision MLP is 4x
    wide with QuickGELU, its norms' epsilons fixed), or None."""
    vision, text = config.vision_config, config.text_config
    fixed = (("vision_config.intermediate_size", vision.intermediate_size, 4 * vision.hidden_size),
             ("vision_config.hidden_act", vision.hidden_act, "quick_gelu"),
             ("vision_config.layer_norm_eps", vision.layer_norm_eps, 1e-5),
             ("text_config.layer_norm_eps", text.layer_norm_eps, 1e-12))
    wrong = [f"{key}={value!r} (cn_clip's: {theirs!r})" for key, value, theirs in fixed if value != theirs]
    return "; ".join(wrong) or None


def cnclip_checkpoint(loaded: LoadedModel) -> dict:
    """The model in Chinese-CLIP's checkpoint format, as `cn_clip/training/main.py` saves it."""
    from model.cnclip import from_hf_state_dict, to_hf_state_dict

    mismatch = _cnclip_mismatch(loaded.model.clip.config)
    if mismatch:
        where = loaded.origin.get("checkpoint") or (loaded.origin.get("pretrained") or {}).get("pretrained")
        raise CheckpointError(f"{where}: cn_clip's code cannot build this model: {mismatch}; "
                              "write it as --format hf (or the ONNX bundle) instead")
    ours = loaded.model.clip.state_dict()
    state = from_hf_state_dict(ours)
    back = to_hf_state_dict(state)  # the mapping is a bijection: nothing lost, nothing invented
    if back.keys() != ours.keys() or not all(torch.equal(back[k], ours[k]) for k in ours):
        raise CheckpointError("the Chinese-CLIP layout of this model does not map back onto it exactly")
    return {"epoch": int(loaded.origin.get("epoch") or 0), "step": 0, "name": CNCLIP_NAME,
            "state_dict": {"module." + k: v for k, v in state.items()}}


def export_cnclip(run_dir: str, out_path: str, checkpoint: str = "best", overwrite: bool | None = None) -> str:
    """Write the run's model as a Chinese-CLIP checkpoint file at `out_path` (an earlier one
    replaced, nothing else unless `overwrite`: `infra.outputs`)."""
    from model.cnclip import published_names

    check_output(out_path, CNCLIP_FILE, source_paths(run_dir, checkpoint), overwrite)
    loaded = _chinese_clip(run_dir, checkpoint, "cnclip")
    state = cnclip_checkpoint(loaded)
    with atomic_path(out_path, suffix=".pt") as tmp:
        torch.save(state, tmp)
        written = safe_load(tmp, mmap=True)["state_dict"]  # read back from disk before it takes the name
        if written.keys() != state["state_dict"].keys() or not all(
                torch.equal(written[k], v) for k, v in state["state_dict"].items()):
            raise CheckpointError(f"{out_path}: the file written does not hold the model's tensors as they are")
    vision, text = published_names(loaded.model.clip.config)
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


def _card_origin(run_dir: str, loaded: LoadedModel) -> tuple[str, str]:
    """(the card's title, its first paragraph): a fine-tuned run's checkpoint, or published weights."""
    if loaded.config is None:  # published weights given as RUN_DIR
        name = shown_source((loaded.origin.get("pretrained") or {}).get("pretrained") or run_dir)
        return (f"# Chinese-CLIP ({name})", f"The published weights `{name}` as muge-retrieval loads them, not "
                "fine-tuned here.")
    model = loaded.config.get("model", {})
    base = f"`{shown_source(model['name'])}`" if model.get("name") else "a random start (model.config)"
    run = os.path.basename(os.path.abspath(run_dir))
    return (f"# Chinese-CLIP fine-tuned for MUGE text-to-image retrieval ({run})",
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
            "a plain ChineseCLIPModel.", ""]


def model_card(run_dir: str, loaded: LoadedModel) -> str:
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
    title, origin = _card_origin(run_dir, loaded)
    scores = ["## Valid scores", "", "MUGE valid, scored with the competition's metric (x100); epoch 0 is the start.",
              "", "| epoch | R@1 | R@5 | R@10 | MeanRecall |", "|---|---|---|---|---|", *rows, "",
              f"The checkpoint holds epoch {best.get('epoch', loaded.origin.get('epoch'))}'s weights "
              f"(MeanRecall {best['mean_recall']:.2f})." if "mean_recall" in best else "", ""] if rows else []
    recipe_lines = ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False).strip(),
                    "```", ""] if recipe else []
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: zero-shot-image-classification",
        "tags: [chinese-clip, muge, text-to-image-retrieval]", "---", "", title, "", origin, "",
        *scores, *recipe_lines, *_card_lora(train),
        "## Preprocessing", "",
        f"- images: RGB, {data.resize_rule} to {data.image_size} x {data.image_size} px (bicubic), CLIP's mean and std "
        "(the processor here does the same; the project's own resize is `competition.preprocess.resize_image`)",
        f"- text: {data.text_normalization} normalisation, then the tokenizer, at most {data.max_text_length} tokens",
        "", "## Load it", "", "```python",
        "from transformers import ChineseCLIPModel, ChineseCLIPProcessor", "",
        'model = ChineseCLIPModel.from_pretrained("THIS_DIRECTORY")',
        'processor = ChineseCLIPProcessor.from_pretrained("THIS_DIRECTORY")',
        'inputs = processor(text=["红色连衣裙"], images=[image], return_tensors="pt", padding=True)',
        "text = model.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)",
        "image = model.get_image_features(pixel_values=inputs.pixel_values)",
        "# transformers >= 5 returns outputs: the features are their .pooler_output; L2-normalise both to rank",
        "```", ""])
