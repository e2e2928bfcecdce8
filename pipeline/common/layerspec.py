"""The one ``--layers`` grammar of every command, and its resolution against an encoder's
canonical layer names.

The grammar: ``;`` separates *choices* (one run each: ``sweep`` and ``study`` take several,
``extract`` and ``align`` one), ``,`` separates the layers of one choice, and ``last:N`` counts
the last N blocks. A layer is a name or a block index. What a choice means depends only on
where it is used: ``extract`` stores the set it names (``all``, ``last``, ``last:N``,
``embed,block.03``); stage two trains on a pair, ``auto`` (the best-scoring pair), one layer for
both sides (``last``, ``-1``) or ``IMAGE,TEXT`` (``block.09,block.05``, ``9,-1``). So
``last;auto`` is two choices everywhere, and ``9,5`` is one.

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
    spec = one_choice(spec, why="a model's stores hold one set of layers") if spec and ";" in spec else (spec or "").strip()
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


CHOICE_HINT = "choices are separated by ';' (last;auto), the layers of one choice by ',' (block.09,block.05)"


def layer_choices(spec: str, option: str = "--layers") -> list[str]:
    """The choices of a ``--layers`` value, in order, each stripped; empty ones refused."""
    choices = [c.strip() for c in (spec or "").split(";")]
    if not spec or not spec.strip() or not all(choices):
        raise FeatcacheError(f"bad {option} {spec!r}: an empty layer choice", CHOICE_HINT)
    return [",".join(p.strip() for p in c.split(",")) for c in choices]


def one_choice(spec: str, option: str = "--layers", why: str = "this command uses one layer choice") -> str:
    """The single choice of a ``--layers`` value; several are refused with ``why``."""
    choices = layer_choices(spec, option)
    if len(choices) != 1:
        raise FeatcacheError(f"bad {option} {spec!r}: {len(choices)} choices, but {why}",
                             "compare several choices with featcache sweep --layers 'last;auto'")
    return choices[0]


def pair_parts(choice: str) -> list[str] | None:
    """A stage-two choice as [IMAGE, TEXT] layers, or None for ``auto``."""
    if choice == "auto":
        return None
    parts = [p.strip() for p in choice.split(",")]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(parts) or "auto" in parts or any(p.startswith("last:") or p == "all" for p in parts):
        raise FeatcacheError(f"bad layer choice {choice!r} for a pair of heads",
                             "use auto, last, one layer for both sides (-1, block.05) or IMAGE,TEXT such as "
                             f"block.09,block.05 or 9,-1; {CHOICE_HINT}")
    return parts
