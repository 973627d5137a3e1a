"""The record of passes applied to a GraphModule, kept as plain data in `gm.meta`."""
from __future__ import annotations

import copy

from torch.fx import GraphModule

from .pass_base import PassRecord

_KEY = "fxcompress_history"


def _records(gm: GraphModule) -> list[dict]:
    """The history list, held both in `gm.meta` and as an attribute (the same list object).

    Deep copies of a GraphModule keep `meta` but drop other attributes; torch.save / torch.load
    keep attributes but drop `meta`. Holding the list in both keeps the history through either.
    """
    records = gm.meta[_KEY] = gm._fxcompress_history = _stored(gm)
    return records


def _stored(gm: GraphModule) -> list[dict]:
    """The history list wherever it survived, without writing to `gm`."""
    return gm.meta[_KEY] if _KEY in gm.meta else getattr(gm, "_fxcompress_history", [])


def copy_history(source: GraphModule, target: GraphModule) -> None:
    """Give `target` (a deep copy of `source`) its own copy of `source`'s history.

    A GraphModule from torch.load carries its history only as the attribute, which a deep copy
    drops (it keeps `meta`, which torch.load had left empty).
    """
    target.meta[_KEY] = target._fxcompress_history = copy.deepcopy(_stored(source))


def history(gm: GraphModule) -> tuple[PassRecord, ...]:
    """The passes applied to `gm`, oldest first, across every compile() call."""
    return tuple(PassRecord.from_dict(d) for d in _records(gm))


def append_record(gm: GraphModule, record: PassRecord) -> None:
    _records(gm).append(record.as_dict())


def set_history(gm: GraphModule, records: tuple[PassRecord, ...]) -> None:
    _records(gm)[:] = [r.as_dict() for r in records]


def format_history(gm: GraphModule) -> str:
    """One block per pass: its configuration, whether it changed the graph, its time and its statistics.

    A record without a time (seconds 0.0: a file saved deterministically, the default, zeroes them) says
    nothing of its time rather than that the pass took none."""
    lines = []
    for i, r in enumerate(history(gm)):
        config = ", ".join(f"{k}={v!r}" for k, v in r.config.items())
        took = f" in {r.seconds:.3f}s" if r.seconds else ""
        lines.append(f"#{i} {r.name}({config}) changed={r.changed}{took}")
        lines.append(f"   nodes +{len(r.nodes_created)} -{len(r.nodes_erased)} ~{len(r.nodes_changed)}, "
                     f"params touched {len(r.params_touched)}")
        for key, value in r.stats.items():
            lines.append(f"   {key}: {value}")
    return "\n".join(lines) if lines else "(no passes applied)"
