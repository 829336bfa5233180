"""``compose``: a system built from registered parts by name, for studies of combinations no paper
named (LFU + pre-gated prefetch + CPU misses, say).

Each part is given as a registered name, or as a table with the name under ``name`` and the
part's constructor parameters beside it, checked against the constructor's signature (as
scikit-learn's ``get_params`` reads ``__init__``)::

    expertsim simulate --system compose --param eviction=lfu --param 'prefetch={name="pregated", distance=2}'

    [[runs]]  # a study
    policy = { name = "compose", eviction = "lfu", prefetch = { name = "pregated", distance = 2 }, miss = "cpu" }

The tables are :data:`~expertsim.policies.registration.PARTS` (``expertsim policies list`` shows
them); a plug-in's ``@register_prefetch("mine")`` class is a part like any built-in one.
"""
from __future__ import annotations

from expertsim.errors import PolicyError
from expertsim.policies.base import param_label
from expertsim.policies import eviction as _eviction  # noqa: F401  (registers the eviction parts)
from expertsim.policies import miss as _miss  # noqa: F401  (registers the miss handlers)
from expertsim.policies import prefetch as _prefetch  # noqa: F401  (registers the prefetchers)
from expertsim.policies import scheduling as _scheduling  # noqa: F401  (registers the schedulers)
from expertsim.policies.registration import PARTS, _construct, register_system
from expertsim.policies.systems import ComposedSystem

DEFAULT_PARTS = {"eviction": "lru", "prefetch": "none", "miss": "copy", "scheduler": "fifo"}


def make_part(kind: str, spec):
    """The part of ``kind`` (a key of PARTS) that ``spec`` names: a name, or a table
    ``{name = NAME, PARAM = VALUE, ...}``; unknown names and parameters get one line with the
    known ones."""
    import difflib

    table = PARTS[kind]
    if isinstance(spec, dict):
        params = {k: v for k, v in spec.items() if k != "name"}
        name = spec.get("name")
    else:
        name, params = spec, {}
    if not isinstance(name, str) or not name:
        raise PolicyError(f"compose: {kind} must be a name or a table with a name, e.g. {kind}="
                          f"{DEFAULT_PARTS[kind]!r}, got {spec!r}")
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise PolicyError(f"compose: unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(table))} "
                          f"(`expertsim policies list`)")
    return _construct(table[name], params, f"compose {kind} {name!r}")


def _label(part) -> str:
    """The part's name and parameters (nested parts, which carry their own, left out)."""
    params = part.params() if hasattr(part, "params") else {}
    return param_label(part.name, {k: v for k, v in params.items() if not hasattr(v, "params")})


@register_system("compose")
class Compose(ComposedSystem):
    """A system from registered parts by name: eviction policy, prefetcher, miss handler and batch
    scheduler (each a name or a ``{name = ..., PARAM = ...}`` table), and the expert serve order.
    Unset parts are the plain ones: LRU, no prefetch, copy on miss, first come first served."""

    description = "a system from registered parts by name (eviction, prefetch, miss, scheduler)"

    def __init__(self, eviction=None, prefetch=None, miss=None, scheduler=None, expert_order: str = "hits-first"):
        specs = {"eviction": eviction, "prefetch": prefetch, "miss": miss, "scheduler": scheduler}
        parts = {kind: make_part(kind, DEFAULT_PARTS[kind] if spec is None else spec)
                 for kind, spec in specs.items()}
        super().__init__(parts["eviction"], parts["prefetch"], parts["miss"], parts["scheduler"],
                         expert_order=expert_order)

    def params(self) -> dict:
        out = {"eviction": _label(self.eviction), "prefetch": _label(self.prefetcher), "miss": _label(self.miss),
               "scheduler": _label(self.scheduler)}
        if self.expert_order != "hits-first":
            out["expert_order"] = self.expert_order
        return out
