"""The MUGE task itself: readers, the submission format, the official metric, the sample data."""
from .errors import MugeDataError
from .images import ImageTSV, SkippedImages, decode_image, iter_tsv
from .metric import Score, score_predictions
from .preprocess import TextTokenizer, normalize_text, resize_image
from .queries import Query, ground_truth_not_in_gallery, iter_queries, read_queries
from .submission import SubmissionError, check_submission, write_submission

__all__ = ["MugeDataError", "ImageTSV", "SkippedImages", "decode_image", "iter_tsv", "Score", "score_predictions",
           "TextTokenizer", "normalize_text", "resize_image", "Query", "ground_truth_not_in_gallery",
           "iter_queries", "read_queries", "SubmissionError", "check_submission", "write_submission"]
