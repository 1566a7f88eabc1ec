"""``GET/POST /api/mesh/policy``: the signed mesh policy this node holds, and a newer one in.

A posted policy needs no trust in the caller: it is applied only if the
mesh authority signed it and its version is newer than ours (the gate in
front still asks an ``admin`` role to post, so a stolen old policy cannot
even be tried from a ``user`` key). ``meshollama admit/revoke/policy set``
post here; the node then passes the policy on to every peer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from quart import request

from ..errors import TrustError
from .errors import error_answer, json_answer


def register(app: Any, mesh: Any, respond: Callable) -> None:
    def admission():
        return getattr(mesh, "admission", None)

    @app.route("/api/mesh/policy", methods=["GET"])
    async def get_policy():
        adm = admission()
        if adm is None:
            return respond(json_answer({"mode": "open"}))
        policy = adm.state.policy
        return respond(json_answer({"mode": "closed", "authority": adm.state.authority.text,
                                    "policy": policy.token, **policy.summary()}))

    @app.route("/api/mesh/policy", methods=["POST"])
    async def post_policy():
        adm = admission()
        if adm is None:
            return respond(error_answer(400, "this node is in an open mesh: it has no mesh authority "
                                             "(see meshollama mesh init)"))
        try:
            body = json.loads(await request.get_data())
            token = body["policy"]
            if not isinstance(token, str):
                raise TypeError
        except (ValueError, TypeError, KeyError):
            return respond(error_answer(400, 'expected {"policy": "<signed policy>"}'))
        try:
            applied = adm.offer_policy(token, source="api")
        except TrustError as exc:
            return respond(error_answer(400, f"policy refused: {exc}"))
        return respond(json_answer({"applied": applied, "version": adm.state.policy.version}))
