"""Which peer holds which model, from a peer table snapshot (pure).

One row per model (by its routing key): its name in short form, the largest
size announced, each holder with its state and digest, and how many holders
announce each digest. ``ModelService.mesh_models`` adds copy targets and
pulls to these rows; a node without a model service lists them as they are.
"""

from __future__ import annotations

from typing import Any

from .. import names


def holder_rows(snapshot: Any) -> dict[str, dict[str, Any]]:
    """``model key -> row`` for every model a peer of ``snapshot`` announces."""
    rows: dict[str, dict[str, Any]] = {}
    for peer in snapshot.peers:
        for model in peer.models:
            row = rows.setdefault(names.key(model.name), {"model": names.shortest(model.name), "size": model.size,
                                                          "holders": [], "digests": {}})
            row["holders"].append({"peer": peer.peer_id, "state": peer.state.value, "self": peer.is_self,
                                   "digest": model.digest, "loaded": model.loaded})
            row["digests"][model.digest] = row["digests"].get(model.digest, 0) + 1
            row["size"] = max(row["size"], model.size)
    return rows


def sorted_rows(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows by model name, each with its copy count (holders, unless set already)."""
    for row in rows.values():
        row.setdefault("copies", len(row["holders"]))
    return sorted(rows.values(), key=lambda r: r["model"])
