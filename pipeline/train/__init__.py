"""Stage two: train alignment heads on cached features with CLIP + STRUCTURE losses.

``config`` says what a run is asked to do, ``plan`` what it trains on, ``loop`` trains it (one
loop for single runs and stacked sweep cells, ``stacked``), ``sweep`` runs a grid; ``losses``
live in ``featcache.pipeline.common`` (layer selection uses R_S too). The trainer reads cached
arrays only, never an encoder.
"""

from featcache.pipeline.train.config import LOSSES, AlignConfig, SelectConfig
from featcache.pipeline.train.loop import fit, train
from featcache.pipeline.train.plan import CachedData, build_run, load_cached, plan_run, select_layers
from featcache.pipeline.train.sweep import sweep

__all__ = ["LOSSES", "AlignConfig", "CachedData", "SelectConfig", "build_run", "fit", "load_cached", "plan_run",
           "select_layers", "sweep", "train"]
