"""Layer selection: how alike two layers' representations are (the PRH alignment metrics), and
the table of every (image layer, text layer) pair that ``align --layers auto`` picks from."""

from featcache.pipeline.select.metrics import K_RULES, METRICS, alignment_score
from featcache.pipeline.select.table import LayerRows, ScoreTable, mutual_knn, score_table

__all__ = ["K_RULES", "METRICS", "LayerRows", "ScoreTable", "alignment_score", "mutual_knn", "score_table"]
