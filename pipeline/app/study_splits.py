"""Which splits a study compares: salted redraws where a data set's splits are drawn by hash,
the data set's own split where they are not.

A salt redraws a hash split (the built-in pair sets, a pair table without a 'split' column). On
data that brings its own splits a salt changes nothing but the cache name: three salts gave three
byte-identical copies, extracted three times and bootstrapped as if they were independent. So a
study salts only the parts a salt redraws; on data with explicit splits it uses the one split,
says so, and its intervals resample seeds and test items only. A salt asked for on such data is
an error rather than a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common.names import combined_parts, is_combined, with_option
from featcache.pipeline.data.catalog import salt_redraws

DEFAULT_SALTS = ("", "1", "2")  # "" is the default split


@dataclass(frozen=True)
class SplitPlan:
    """The salts a study runs, and the parts of its data set they redraw (empty: none, the data
    set's own split is the one split)."""

    salts: tuple[str, ...]
    salted_parts: tuple[str, ...]

    @property
    def explicit(self) -> bool:
        return not self.salted_parts


def parts_of(dataset: str) -> list[str]:
    return combined_parts(dataset) if is_combined(dataset) else [dataset]


def salted_spec(dataset: str, salt: str, salted_parts: tuple[str, ...] | None = None) -> str:
    """The data set redrawn with ``salt``: each part a salt redraws (by default every part of a
    combined ``a+b``) gets it, a part with its own splits is kept as it is."""
    if not salt:
        return dataset
    return "+".join(with_option(p, "salt", salt) if salted_parts is None or p in salted_parts else p
                    for p in parts_of(dataset))


def plan_splits(dataset: str, salts: tuple[str, ...] | None) -> SplitPlan:
    """``salts`` None: the default salts on hash-split data, the one split otherwise."""
    hashed = tuple(p for p in parts_of(dataset) if salt_redraws(p))
    if hashed:
        return SplitPlan(DEFAULT_SALTS if salts is None else salts, hashed)
    if salts is not None and any(salts):
        raise FeatcacheError(f"--salts on {dataset}, whose splits are its own (not drawn by hash): a salt "
                             "would only extract the same rows again",
                             "drop --salts; the study uses its one split and bootstraps over seeds and test items")
    return SplitPlan(("",), ())


def split_note(plan: SplitPlan, dataset: str) -> str | None:
    """One line for the console and the markdown where the splits are not all redrawn."""
    kept = [p for p in parts_of(dataset) if p not in plan.salted_parts]
    if plan.explicit:
        return (f"{dataset} has explicit splits: the study uses its one split (no salts) and bootstraps "
                "over seeds and test items")
    if kept:
        return (f"salts redraw {', '.join(plan.salted_parts)} only; {', '.join(kept)} keeps its own "
                "splits")
    return None
