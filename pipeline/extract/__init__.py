"""Stage one: run each frozen encoder once over a data set and store every layer's pooled features.

``run`` is the extraction (chunks, shards, resume), ``encoders``/``hf_encoder``/``registry`` what
an encoder name means and how its layers are read, ``provenance`` which input each stored image
row came from, and ``onnx_dinov2``/``mpnet_parts`` the one-time preparation of offline weights.
"""

from featcache.pipeline.extract.run import ExtractConfig, ExtractResult, extract, extract_split, library_versions

__all__ = ["ExtractConfig", "ExtractResult", "extract", "extract_split", "library_versions"]
