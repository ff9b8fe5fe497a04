"""The model package: checkpoint or published weights in, a ready model out (as open_clip keeps
its model apart from its training). `factory` is the entry point every model comes out of
(`create_model`, `load_model`, `checkpoint_model`); `family` the interface every model family
implements, and the registry of families; `dual` and `chinese_clip` the two families; `layers`
their shared pieces; `lora` LoRA adapters (peft) and the plain model they merge into; `cnclip`
Chinese-CLIP's own checkpoint files; `tokenizer` the text tower's tokenizer; `weights`
checkpoints and published weights read safely; `config` the model's config sections (its own,
`train.lora`'s) and its preprocessing. Imports nothing of `train/`."""
