"""Accuracy-aware search: the most compressed configuration (by size or by latency)
that stays within an accuracy drop (or an output cosine), within a time budget, that
always returns the best valid result found so far. See ``search.py``.

    >>> from lowbit.autosearch import search_compression
    >>> out = search_compression("cnn.onnx", "train.npz", max_drop=0.5, budget_s=600)  # doctest: +SKIP
"""

from lowbit.autosearch.outcome import SearchOutcome, Trial
from lowbit.autosearch.search import search_compression
from lowbit.autosearch.space import OBJECTIVES, TECHNIQUES, parse_budget

__all__ = ["OBJECTIVES", "TECHNIQUES", "SearchOutcome", "Trial", "parse_budget",
           "search_compression"]
