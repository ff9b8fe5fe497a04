"""The model package: checkpoint or published weights in, a ready model out (as open_clip keeps
its model apart from its training). `factory` is the entry point (`create_model`, `load_model`);
`family` the interface every model family implements; `dual` and `chinese_clip` the two
families; `layers` their shared pieces; `cnclip` Chinese-CLIP's own checkpoint files; `tokenizer`
the text tower's tokenizer; `weights` checkpoints and published weights read safely; `config`
the model's config sections and its preprocessing. Imports nothing of `train/`."""
