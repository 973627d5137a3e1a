"""The record of passes applied to a GraphModule, kept as plain data in `gm.meta`."""
from __future__ import annotations

from torch.fx import GraphModule

from .pass_base import PassRecord

_KEY = "fxcompress_history"


def _records(gm: GraphModule) -> list[dict]:
    """The history list, held both in `gm.meta` and as an attribute (the same list object).

    Deep copies of a GraphModule keep `meta` but drop other attributes; torch.save / torch.load
    keep attributes but drop `meta`. Holding the list in both keeps the history through either.
    """
    records = gm.meta.get(_KEY)
    if records is None:
        records = gm.meta[_KEY] = list(getattr(gm, "_fxcompress_history", []))
    gm._fxcompress_history = records
    return records


def adopt_history(gm: GraphModule) -> None:
    """Put `gm`'s history in both of its homes before `gm` is copied.

    A GraphModule from torch.load carries its history only as the attribute; a deep copy made
    before anything read it would keep `meta` (empty) and drop the attribute, losing the history.
    """
    _records(gm)


def history(gm: GraphModule) -> tuple[PassRecord, ...]:
    """The passes applied to `gm`, oldest first, across every compile() call."""
    return tuple(PassRecord.from_dict(d) for d in _records(gm))


def append_record(gm: GraphModule, record: PassRecord) -> None:
    _records(gm).append(record.as_dict())


def set_history(gm: GraphModule, records: tuple[PassRecord, ...]) -> None:
    _records(gm)[:] = [r.as_dict() for r in records]


def format_history(gm: GraphModule) -> str:
    """One block per pass: its configuration, whether it changed the graph, and its statistics."""
    lines = []
    for i, r in enumerate(history(gm)):
        config = ", ".join(f"{k}={v!r}" for k, v in r.config.items())
        lines.append(f"#{i} {r.name}({config}) changed={r.changed} in {r.seconds:.3f}s")
        lines.append(f"   nodes +{len(r.nodes_created)} -{len(r.nodes_erased)} ~{len(r.nodes_changed)}, "
                     f"params touched {len(r.params_touched)}")
        for key, value in r.stats.items():
            lines.append(f"   {key}: {value}")
    return "\n".join(lines) if lines else "(no passes applied)"
