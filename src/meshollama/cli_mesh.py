"""``meshollama mesh init``, ``admit``, ``revoke`` and ``policy show|set``: the mesh authority's tools.

They hold the authority's secret key (``<data_dir>/authority.key`` unless
``--key`` names another file, e.g. on a USB stick kept offline) and never send
it anywhere. Each change is a new version of the signed mesh policy: read the
current one from the local node (``GET /api/mesh/policy``, or the copy in the
data dir when no node runs), change it, sign it, and hand it to the node
(``POST /api/mesh/policy``), which applies it and passes it to every peer
within seconds. With no node running, the new policy is written to the data
dir and spreads when the node next starts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path

from .errors import MeshollamaError, TrustError

S = argparse.SUPPRESS


def add_parsers(sub, common) -> None:
    mesh = sub.add_parser("mesh", help="create the mesh authority (closed mesh)")
    mesh_sub = mesh.add_subparsers(dest="mesh_command", required=True)
    init = mesh_sub.add_parser("init", help="create a mesh authority key and admit this node as admin")
    common(init)
    init.add_argument("--key", default=S, metavar="FILE", help="where to write the authority's secret key "
                                                               "(default <data_dir>/authority.key)")

    admit = sub.add_parser("admit", help="admit a peer to the mesh (signs a certificate into the policy)")
    common(admit)
    _authority_args(admit)
    admit.add_argument("peer", metavar="PEER_ID")
    admit.add_argument("--role", default="serve", choices=["serve", "gateway", "admin"],
                       help="serve: serves and sends requests; gateway: only sends; admin: also manages models")
    admit.add_argument("--expires", default="never", metavar="DURATION", help="e.g. 30d, 12h, 90m, never (default)")

    revoke = sub.add_parser("revoke", help="revoke a peer: every node cuts it off within seconds")
    common(revoke)
    _authority_args(revoke)
    revoke.add_argument("peer", metavar="PEER_ID")

    policy = sub.add_parser("policy", help="show or change the signed mesh policy")
    pol_sub = policy.add_subparsers(dest="policy_command", required=True)
    show = pol_sub.add_parser("show", help="print the mesh policy this node holds")
    common(show)
    _api_args(show)
    show.add_argument("--json", action="store_true")
    setp = pol_sub.add_parser("set", help="change routing defaults, share API keys mesh-wide")
    common(setp)
    _authority_args(setp)
    setp.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="routing.strategy=least_loaded|...")
    setp.add_argument("--add-key", metavar="ROLE", choices=["admin", "user", "readonly"], default=None,
                      help="create an API key valid on every node (printed once)")
    setp.add_argument("--key-name", default="", help="name of the key --add-key creates")
    setp.add_argument("--remove-key", metavar="KEY_ID", default=None, help="withdraw a mesh-wide API key")


def _api_args(sp) -> None:
    sp.add_argument("--api", default=S, metavar="URL", help="the local node's gateway (default: node.json/config)")
    sp.add_argument("--api-key", default=os.environ.get("MESHOLLAMA_API_KEY"), help=S)


def _authority_args(sp) -> None:
    _api_args(sp)
    sp.add_argument("--key", default=S, metavar="FILE", help="the authority's secret key "
                                                             "(default <data_dir>/authority.key)")


def run(args, load, api_url) -> int:
    config = load(args)
    data_dir = Path(config.node.data_dir)
    if args.command == "mesh":
        return _init(args, data_dir)
    if args.command == "policy" and args.policy_command == "show":
        return _show(args, config, data_dir, api_url)
    key = _read_key(_key_path(args, data_dir))
    client = _Client(args, config, data_dir, api_url, key.authority)
    policy = client.current()
    now = int(time.time())
    from .trust import documents as d

    if args.command == "admit":
        revoked = policy.revoked_at(args.peer)
        iat = max(now, revoked + 1) if revoked is not None else now
        expires = _expiry(args.expires, iat)
        cert = d.issue_certificate(key, args.peer, args.role, now=iat, expires=expires, serial=secrets.token_hex(8))
        new = d.sign_policy(key, d.admit(policy, cert, now=now))
        where = client.publish(new)
        until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires)) if expires else "no expiry"
        print(f"admitted {args.peer} as {args.role} ({until}); policy version {new.version} {where}")
        return 0
    if args.command == "revoke":
        new = d.sign_policy(key, d.revoke(policy, args.peer, now=now))
        where = client.publish(new)
        print(f"revoked {args.peer}; policy version {new.version} {where}")
        return 0
    return _set(args, key, client, policy, now)


def _set(args, key, client, policy, now: int) -> int:
    from .trust import documents as d

    routing = dict(policy.routing)
    for item in args.settings:
        name, eq, value = item.partition("=")
        if not eq or name != "routing.strategy":
            raise MeshollamaError(f"policy set: unknown setting {item!r} (known: routing.strategy=...)")
        routing["strategy"] = value
    keys = list(policy.api_keys)
    shown = None
    if args.remove_key:
        if not any(k["id"] == args.remove_key for k in keys):
            raise MeshollamaError(f"no mesh-wide API key with id {args.remove_key}")
        keys = [k for k in keys if k["id"] != args.remove_key]
    if args.add_key:
        from .gateway.keystore import new_key

        shown, entry = new_key(args.add_key, args.key_name)
        keys.append({"id": entry["id"], "name": entry.get("name", ""), "role": entry["role"],
                     "sha256": entry["sha256"]})
    required = policy.keys_required or bool(args.add_key)
    new = d.sign_policy(key, d.edited(policy, now=now, routing=routing, api_keys=tuple(keys),
                                      keys_required=required))
    d.decode_policy(key.authority, new.token)  # the checks every node will apply
    where = client.publish(new)
    print(f"policy version {new.version} {where}")
    if shown is not None:
        print(f"new mesh-wide {args.add_key} API key (shown once, stored nowhere):\n{shown}")
    return 0


def _key_path(args, data_dir: Path) -> Path:
    return Path(getattr(args, "key", None) or data_dir / "authority.key").expanduser()


def _read_key(path: Path):
    from .trust.documents import SigningAuthority

    try:
        return SigningAuthority.parse(path.read_text())
    except FileNotFoundError:
        raise MeshollamaError(f"no authority key at {path}: run `meshollama mesh init` there, or pass --key") from None
    except (OSError, TrustError) as exc:
        raise MeshollamaError(f"cannot read the authority key {path}: {exc}") from None


def _expiry(text: str, now: int) -> int:
    if text in ("never", "0", ""):
        return 0
    m = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if m is None:
        raise MeshollamaError(f"--expires: expected e.g. 30d, 12h, 90m, 3600 or never, got {text!r}")
    return now + int(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


def _init(args, data_dir: Path) -> int:
    from . import identity
    from .p2p.keys import peer_id_of
    from .trust import documents as d
    from .trust.state import trust_dir, write_private

    path = _key_path(args, data_dir)
    if path.exists():
        raise MeshollamaError(f"{path} exists: this machine already holds a mesh authority "
                              "(remove it first to start a new mesh)")
    key = d.SigningAuthority.generate()
    write_private(path, key.text)
    write_private(trust_dir(data_dir) / "authority", key.authority.text)
    me = peer_id_of(identity.load_or_create(data_dir))
    now = int(time.time())
    cert = d.issue_certificate(key, me, "admin", now=now, serial=secrets.token_hex(8))
    policy = d.sign_policy(key, d.admit(d.Policy(), cert, now=now))
    write_private(trust_dir(data_dir) / "policy", policy.token)
    write_private(Path(str(path) + ".policy"), policy.token)
    write_private(trust_dir(data_dir) / "certificate", cert.token)
    print(f"mesh authority: {key.authority.text}")
    print(f"secret key:     {path} (mode 0600; keep a copy offline, anyone holding it controls the mesh)")
    print(f"this node ({me}) is admitted as admin.")
    print("Next: restart this node; start the others with")
    print(f"  meshollama start --authority {key.authority.text} --bootstrap <this node's p2p address>")
    print("and admit each from here with `meshollama admit <its peer ID>`.")
    return 0


def _show(args, config, data_dir: Path, api_url) -> int:
    from .trust.state import configured_authority

    authority = configured_authority(data_dir, config.mesh.authority)
    if authority is None:
        print("open mesh: no mesh authority (see `meshollama mesh init`)")
        return 0
    client = _Client(args, config, data_dir, api_url, authority)
    policy = client.current()
    summary = {"authority": authority.text, **policy.summary()}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"authority  {summary['authority']}\nversion    {policy.version}")
    for c in summary["admitted"]:
        exp = time.strftime("%Y-%m-%d", time.gmtime(c["expires_at"])) if c["expires_at"] else "never"
        print(f"admitted   {c['peer']}  {c['role']:8} expires {exp}")
    for r in summary["revoked"]:
        print(f"revoked    {r['peer']}  at {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(r['at']))}")
    for k in summary["api_keys"]:
        print(f"api key    {k['id']}  {k['role']:8} {k['name']}")
    if summary["routing"]:
        print(f"routing    {summary['routing']}")
    return 0


class _Client:
    """The local node's copy of the policy: through its API if it runs, else on disk."""

    def __init__(self, args, config, data_dir: Path, api_url, authority) -> None:
        from .cli import http_verify

        self.url = api_url(args, config)
        self.verify = http_verify(config)
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if getattr(args, "api_key", None) else {}
        self.data_dir = data_dir
        self.authority = authority
        # Beside the secret key: the newest policy this authority signed, whatever the node holds.
        key = _key_path(args, data_dir)
        self.key_copy = Path(str(key) + ".policy") if key.exists() else None

    def current(self):
        """The newest of: the running node's policy, the data dir's copy, and the copy
        kept beside the authority key; with every revocation any of them holds, so
        an edit made from a stale copy never brings a revoked peer back."""
        import httpx

        from .trust.documents import keep_revocations, newer
        from .trust.state import trust_dir

        tokens = []
        try:
            resp = httpx.get(self.url + "/api/mesh/policy", headers=self.headers, timeout=5.0, verify=self.verify)
        except httpx.ConnectError:
            resp = None  # no node running here: the copies on disk
        except httpx.HTTPError as exc:
            raise MeshollamaError(f"cannot read the policy from {self.url}: {exc}") from None
        if resp is not None:
            if resp.status_code != 200:
                raise MeshollamaError(f"{self.url} answered {resp.status_code}: {resp.text.strip()[:200]}"
                                      + (" (pass --api-key or MESHOLLAMA_API_KEY)" if resp.status_code in (401, 403) else ""))
            body = resp.json()
            if body.get("mode") == "open":
                raise MeshollamaError(f"the node at {self.url} runs an open mesh: restart it after `mesh init`, "
                                      "or start it with --authority")
            tokens.append(body.get("policy") or "")
        for path in (trust_dir(self.data_dir) / "policy", self.key_copy):
            if path is not None and path.exists():
                tokens.append(path.read_text())
        found = []
        for token in filter(None, (t.strip() for t in tokens)):
            try:
                found.append(self._decode(token))
            except TrustError as exc:
                print(f"meshollama: ignoring a policy that does not verify: {exc}", file=sys.stderr)
        if not found:
            from .trust.documents import Policy

            return Policy()
        best = found[0]
        for p in found[1:]:
            if newer(p, best):
                best = p
        for p in found:
            best, _ = keep_revocations(best, p.revoked)
        return best

    def _decode(self, token: str):
        from .trust.documents import decode_policy

        return decode_policy(self.authority, token)

    def publish(self, policy) -> str:
        import httpx

        from .trust.state import trust_dir, write_private

        if self.key_copy is not None:
            write_private(self.key_copy, policy.token)  # the authority's own record of the newest
        try:
            resp = httpx.post(self.url + "/api/mesh/policy", json={"policy": policy.token},
                              headers=self.headers, timeout=10.0, verify=self.verify)
        except httpx.ConnectError:
            write_private(trust_dir(self.data_dir) / "policy", policy.token)
            return f"written to {trust_dir(self.data_dir) / 'policy'} (no node running at {self.url}: " \
                   "it spreads when the node starts)"
        if resp.status_code != 200:
            print(f"meshollama: {self.url} refused the policy: {resp.status_code} {resp.text.strip()}", file=sys.stderr)
            raise MeshollamaError("policy not applied")
        return f"applied by {self.url}; the mesh has it within seconds"
