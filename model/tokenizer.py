"""The run's tokenizer, saved as `tokenizer/` in the run directory so it travels with the model.

Either the text tower's own tokenizer (hub name or local dir) or, for tiny random towers, a
character vocabulary built from the training queries.
"""
from __future__ import annotations

import logging
import os
import unicodedata

from competition.preprocess import TEXT_NORMALIZATION, TEXT_NORMALIZATIONS, TextTokenizer
from competition.queries import iter_queries

from .weights import names_a_local_path

log = logging.getLogger(__name__)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # a char vocabulary's first entries, ids 0 to 4
UNKNOWN_REFUSED, UNKNOWN_WARNED = 0.5, 0.05  # shares of [UNK] tokens in the queries checked


class TokenizerError(ValueError):
    """A tokenizer that does not fit the text tower it feeds."""


def check_tokenizer(tokenizer: TextTokenizer, vocab_rows: int, texts: list[str], where: str,
                    exact: bool = False) -> float:
    """Refuse a tokenizer that emits ids beyond the text tower's embedding, or that knows so few of
    the queries' characters that most become [UNK] (above `UNKNOWN_REFUSED`; a warning above
    `UNKNOWN_WARNED`): such a model sees the same token for every query and ranks nothing. A
    vocabulary of another size than the embedding's rows is warned about, and refused when
    `exact` (a Chinese-CLIP checkpoint, whose vocabulary is known). Returns the unknown share."""
    if tokenizer.max_id >= vocab_rows:
        raise TokenizerError(f"{where}: the tokenizer emits ids up to {tokenizer.max_id}, but the text tower's "
                             f"embedding has {vocab_rows} rows: it is not this model's tokenizer")
    if tokenizer.vocab_size != vocab_rows:
        message = (f"{where}: the tokenizer has {tokenizer.vocab_size} tokens, the text tower's embedding "
                   f"{vocab_rows} rows: not the vocabulary the model was trained with")
        if exact:
            raise TokenizerError(message + " (a Chinese-CLIP checkpoint's is cn_clip's vocab.txt: leave --tokenizer "
                                 "out to use it)")
        log.warning("%s", message)
    share = tokenizer.unknown_share(texts)
    if share > UNKNOWN_REFUSED:
        raise TokenizerError(f"{where}: {share:.0%} of the tokens of {len(texts)} queries are [UNK] (over "
                             f"{UNKNOWN_REFUSED:.0%}): the tokenizer does not know their characters; give the "
                             "model's own tokenizer")
    if share > UNKNOWN_WARNED:
        log.warning("%s: %.1f%% of the tokens of %d queries are [UNK] (over %.0f%%): the tokenizer knows few of "
                    "their characters", where, 100 * share, len(texts), 100 * UNKNOWN_WARNED)
    return share


def _is_cjk(ch: str) -> bool:
    return "CJK" in unicodedata.name(ch, "")


def build_char_vocab(texts, normalization: str = TEXT_NORMALIZATION) -> list[str]:
    """Every character seen (lower-cased, after the run's normalization), plus '##' continuations
    for non-CJK characters, which BERT's WordPiece needs for Latin words and digits (`ins`, `2024`)."""
    normalize = TEXT_NORMALIZATIONS[normalization]
    chars = sorted({ch for t in texts for ch in normalize(t).lower() if not ch.isspace()})
    return SPECIALS + chars + ["##" + ch for ch in chars if not _is_cjk(ch)]


def wordpiece_tokenizer(vocab: list[str], max_chars_per_word: int = 100):
    """A BERT-style WordPiece tokenizer (lower-casing, accents stripped, CJK characters and
    punctuation split) over `vocab`. Chinese-CLIP's own takes words of up to 200 characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    ids = {tok: i for i, tok in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=max_chars_per_word))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    return tok


def _save_wordpiece(vocab: list[str], tok_dir: str, max_chars_per_word: int = 100) -> None:
    with open(os.path.join(tok_dir, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    wordpiece_tokenizer(vocab, max_chars_per_word).save(os.path.join(tok_dir, TextTokenizer.FILE))


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
VOCAB_SPECIALS = SPECIALS[:4]  # what a BERT WordPiece vocabulary must hold ([MASK] is for pre-training alone)


def read_vocab(path: str) -> list[str]:
    """A BERT `vocab.txt`: one token a line, its line number its id; UTF-8, with BERT's special
    tokens (a clear TokenizerError naming the file otherwise)."""
    try:
        with open(path, encoding="utf-8") as f:
            vocab = [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as exc:
        with open(path, "rb") as f:
            line = f.read(exc.start).count(b"\n") + 1
        raise TokenizerError(f"{path}:{line}: not UTF-8 (a BERT vocab.txt is; convert it, e.g. iconv -f GBK -t "
                             "UTF-8)") from None
    missing = [t for t in VOCAB_SPECIALS if t not in vocab]
    if missing:
        raise TokenizerError(f"{path}: lacks BERT's special tokens {', '.join(missing)}: not a BERT vocab.txt")
    return vocab


def _vocab_dir(name: str) -> bool:
    """A directory holding a BERT `vocab.txt` and no Hugging Face tokenizer (Chinese-CLIP's way;
    a README or a licence beside it is fine)."""
    files = os.listdir(name)
    return "vocab.txt" in files and not any(f in files for f in HF_TOKENIZER_FILES)


def check_local_path(name: str, what: str) -> None:
    """A name that is a local path must be a directory or a regular file that exists: otherwise
    say so, rather than let it be taken for a hub name."""
    if not names_a_local_path(name):
        return
    path = os.path.expanduser(name)
    if not os.path.exists(path):
        raise TokenizerError(f"{name}: {what} not found")
    if not (os.path.isdir(path) or os.path.isfile(path)):
        raise TokenizerError(f"{name}: {what} is not a regular file or a directory")


def prepare_tokenizer(spec: str | None, source: str | None, train_queries: str, out_dir: str,
                      max_length: int, normalization: str = TEXT_NORMALIZATION) -> TextTokenizer:
    """Write `out_dir/tokenizer/` and return it loaded. `spec`: None (the tower's own, from
    `source`), "char-vocab", a directory holding only a BERT `vocab.txt` (Chinese-CLIP's), or a
    tokenizer name/dir. A Chinese-CLIP checkpoint file as `source` takes the vocabulary of the
    installed `cn_clip` package (`model.cnclip.cn_clip_vocab`)."""
    tok_dir = os.path.join(out_dir, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, TextTokenizer.FILE)):
        os.makedirs(tok_dir, exist_ok=True)
        name = spec or source
        if name and name != "char-vocab":
            check_local_path(name, "the tokenizer" if spec else "the weights")
        if spec == "char-vocab":
            if not train_queries:
                raise TokenizerError("--tokenizer char-vocab builds a vocabulary from the training queries, for a "
                                     "random text tower in training; exported weights bring their own tokenizer")
            _save_wordpiece(build_char_vocab((q.text for q in iter_queries(train_queries)), normalization), tok_dir)
        elif spec is None and source and os.path.isfile(source):  # a Chinese-CLIP checkpoint: its package's vocabulary
            from .cnclip import CNCLIP_MAX_CHARS_PER_WORD, cn_clip_vocab

            _save_wordpiece(read_vocab(cn_clip_vocab(source)), tok_dir, CNCLIP_MAX_CHARS_PER_WORD)
        elif name and os.path.isdir(name) and _vocab_dir(name):
            from .cnclip import CNCLIP_MAX_CHARS_PER_WORD

            _save_wordpiece(read_vocab(os.path.join(name, "vocab.txt")), tok_dir, CNCLIP_MAX_CHARS_PER_WORD)
        elif name:
            _save_pretrained_tokenizer(name, tok_dir)
        else:
            raise TokenizerError("no tokenizer: set model.text.tokenizer (e.g. char-vocab) or a model name")
    return TextTokenizer(tok_dir, max_length, normalization)


def _save_pretrained_tokenizer(name: str, tok_dir: str) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **({"local_files_only": True} if os.path.isdir(name) else {}))
    except Exception as exc:  # OSError (not found, no network), ValueError (no tokenizer files there), ...
        raise TokenizerError(f"{name}: cannot load a tokenizer ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:300]})") from None
    tokenizer.save_pretrained(tok_dir)
