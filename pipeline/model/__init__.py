"""The aligned model: a run's heads joined to the encoders that made its features.

The one library room that uses both stages: stage one's encoders (``extract``) turn new inputs
into the run's layer exactly as the cache would, stage two's heads (``train``) map it to the
shared space. Only the app and the CLI import it (docs/design.md, "Rooms and rules").
"""

from featcache.pipeline.model.aligned import AlignedModel, Classification
from featcache.pipeline.model.folder import export_model

__all__ = ["AlignedModel", "Classification", "export_model"]
