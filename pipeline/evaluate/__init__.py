"""Evaluate a run on cached features: retrieval and zero-shot classification.

Each evaluation writes one JSON result into the run directory (``eval/<task>-<dataset>-<split>.json``)
recording the data set, split, task, metrics, positive rule, k values and cache identities, with
the untrained reference (``reference``) beside it.
"""

from featcache.pipeline.evaluate.classify import ClassifyConfig, classify_spec, eval_classify
from featcache.pipeline.evaluate.retrieval import POSITIVE_RULES, RetrievalConfig, eval_retrieval

__all__ = ["POSITIVE_RULES", "ClassifyConfig", "RetrievalConfig", "classify_spec", "eval_classify", "eval_retrieval"]
