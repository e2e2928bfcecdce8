"""Resolve a ``--layers`` spec against an encoder's canonical layer names.

Canonical names are ``embed``, ``block.00`` ... ``block.NN`` (the residual stream after each
block, before any final norm) and ``final`` where the model has a post-norm output.
Integer indices follow timm's rules and count blocks: ``0`` is ``block.00`` and ``-1`` the
last block. ``all`` is the embedding output plus every block, the entries of Hugging Face's
``hidden_states`` (13 for ViT-S, 7 for MiniLM); ``final`` is only taken when named.
"""

from __future__ import annotations

from featcache.cache.errors import FeatcacheError


def block_name(i: int) -> str:
    return f"block.{i:02d}"


def canonical_layers(n_blocks: int, has_final: bool) -> list[str]:
    return ["embed"] + [block_name(i) for i in range(n_blocks)] + (["final"] if has_final else [])


def resolve_layers(spec: str, n_blocks: int, has_final: bool) -> list[str]:
    """Names for ``all``, ``last``, ``last:N`` or a comma list of indices and names."""
    spec = (spec or "").strip()
    valid = canonical_layers(n_blocks, has_final)
    range_hint = (
        f"valid: all, last, last:N (1..{n_blocks}), block indices {-n_blocks}..{n_blocks - 1}, "
        f"or names {', '.join(n for n in valid if not n.startswith('block.'))}, block.00..{block_name(n_blocks - 1)}"
    )
    if spec == "all":
        return ["embed"] + [block_name(i) for i in range(n_blocks)]
    if spec == "last":
        return [block_name(n_blocks - 1)]
    if spec.startswith("last:"):
        try:
            n = int(spec[5:])
        except ValueError:
            n = 0
        if not 1 <= n <= n_blocks:
            raise FeatcacheError(f"bad layer spec {spec!r}", range_hint)
        return [block_name(i) for i in range(n_blocks - n, n_blocks)]
    names: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if part in valid:
            name = part
        else:
            try:
                i = int(part)
            except ValueError:
                raise FeatcacheError(f"bad layer spec {spec!r}: {part!r} is not a layer", range_hint)
            if not -n_blocks <= i < n_blocks:
                raise FeatcacheError(
                    f"layer index {i} is out of range for a model with {n_blocks} blocks", range_hint
                )
            name = block_name(i % n_blocks)
        if name not in names:
            names.append(name)
    if not names:
        raise FeatcacheError(f"bad layer spec {spec!r}", range_hint)
    return names
