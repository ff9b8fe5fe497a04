"""The run's tokenizer, saved as `tokenizer/` in the run directory so it travels with the model.

Either the text tower's own tokenizer (hub name or local dir) or, for tiny random towers, a
character vocabulary built from the training queries.
"""
from __future__ import annotations

import logging
import os
import unicodedata

from competition.preprocess import TextTokenizer, normalize_text
from competition.queries import iter_queries

log = logging.getLogger(__name__)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
UNKNOWN_REFUSED, UNKNOWN_WARNED = 0.5, 0.05  # shares of [UNK] tokens in the queries checked


class TokenizerError(ValueError):
    """A tokenizer that does not fit the text tower it feeds."""


def check_tokenizer(tokenizer: TextTokenizer, vocab_rows: int, texts: list[str], where: str) -> float:
    """Refuse a tokenizer that emits ids beyond the text tower's embedding, or that knows so few of
    the queries' characters that most become [UNK] (above `UNKNOWN_REFUSED`; a warning above
    `UNKNOWN_WARNED`): such a model sees the same token for every query and ranks nothing.
    Returns the unknown share."""
    if tokenizer.max_id >= vocab_rows:
        raise TokenizerError(f"{where}: the tokenizer emits ids up to {tokenizer.max_id}, but the text tower's "
                             f"embedding has {vocab_rows} rows: it is not this model's tokenizer")
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


def build_char_vocab(texts) -> list[str]:
    """Every character seen (lower-cased, NFKC), plus '##' continuations for non-CJK characters,
    which BERT's WordPiece needs for Latin words and digits (`ins`, `2024`)."""
    chars = sorted({ch for t in texts for ch in normalize_text(t).lower() if not ch.isspace()})
    return SPECIALS + chars + ["##" + ch for ch in chars if not _is_cjk(ch)]


def char_tokenizer(vocab: list[str]):
    """A BERT-style WordPiece tokenizer (lower-casing, CJK characters split) over `vocab`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    ids = {tok: i for i, tok in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    return tok


def prepare_tokenizer(spec: str | None, source: str | None, train_queries: str, out_dir: str,
                      max_length: int) -> TextTokenizer:
    """Write `out_dir/tokenizer/` and return it loaded. `spec`: None (the tower's own, from
    `source`), "char-vocab", or a tokenizer name/dir."""
    from transformers import AutoTokenizer

    tok_dir = os.path.join(out_dir, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, TextTokenizer.FILE)):
        os.makedirs(tok_dir, exist_ok=True)
        if spec == "char-vocab":
            vocab = build_char_vocab(q.text for q in iter_queries(train_queries))
            with open(os.path.join(tok_dir, "vocab.txt"), "w", encoding="utf-8") as f:
                f.write("\n".join(vocab) + "\n")
            char_tokenizer(vocab).save(os.path.join(tok_dir, TextTokenizer.FILE))
        else:
            name = spec or source
            if not name:
                raise ValueError("no tokenizer: set model.text.tokenizer (e.g. char-vocab) or a model name")
            kwargs = {"local_files_only": True} if os.path.isdir(name) else {}
            AutoTokenizer.from_pretrained(name, **kwargs).save_pretrained(tok_dir)
    return TextTokenizer(tok_dir, max_length)
