"""``meshollama pull | models | replicate``: models over the mesh, from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

S = argparse.SUPPRESS


def add_parsers(sub, common) -> None:
    def api(sp: argparse.ArgumentParser) -> None:
        common(sp)
        sp.add_argument("--api", default=S, metavar="URL", help="gateway URL (default: from node.json or config)")
        sp.add_argument("--api-key", default=os.environ.get("MESHOLLAMA_API_KEY"), help=S)

    pull = sub.add_parser("pull", help="pull a model into this node, from peers first (progress bar)")
    api(pull)
    pull.add_argument("model")
    models = sub.add_parser("models", help="every model in the mesh and where it lives")
    api(models)
    models.add_argument("--json", action="store_true", help="raw JSON")
    rep = sub.add_parser("replicate", help="keep N copies of a model in the mesh")
    api(rep)
    rep.add_argument("model")
    rep.add_argument("--copies", type=int, required=True, help="how many nodes should hold it (0 clears)")
    rep.add_argument("--label", action="append", default=[], help="only on nodes with this label (repeatable)")


def run(args: argparse.Namespace, load, api_url, verify_for) -> int:
    config = load(args)
    url = api_url(args, config)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    client = _Client(url, headers, verify_for(config))
    if args.command == "pull":
        return _pull(client, args.model)
    if args.command == "models":
        data = client.call("GET", "/api/mesh/models")
        if data is None:
            return 1
        print(json.dumps(data, indent=2) if args.json else format_models(data))
        return 0
    data = client.call("POST", "/api/mesh/replicate", {"model": args.model, "copies": args.copies,
                                                        "labels": args.label})
    if data is None:
        return 1
    where = f" on nodes labelled {', '.join(data['labels'])}" if data.get("labels") else ""
    print(f"{data['model']}: {data['copies']} copies{where}; nodes with room volunteer within seconds "
          "(see `meshollama models`)" if data["copies"] else f"{data['model']}: copy count cleared")
    return 0


class _Client:
    def __init__(self, url: str, headers: dict, verify: Any) -> None:
        self.url, self.headers, self.verify = url, headers, verify

    def call(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            resp = httpx.request(method, self.url + path, json=body, headers=self.headers, timeout=10.0,
                                 verify=self.verify)
        except httpx.HTTPError as exc:
            print(f"meshollama: cannot reach the node at {self.url}: {exc} (is `meshollama start` running?)",
                  file=sys.stderr)
            return None
        if resp.status_code != 200:
            print(f"meshollama: {self.url}{path} answered {resp.status_code}: {resp.text.strip()}", file=sys.stderr)
            return None
        return resp.json()


def _pull(client: _Client, model: str) -> int:
    import httpx

    bar = ProgressBar(sys.stdout)
    succeeded = False
    try:
        with httpx.stream("POST", client.url + "/api/pull", json={"model": model}, headers=client.headers,
                          timeout=httpx.Timeout(30.0, read=None), verify=client.verify) as resp:
            if resp.status_code != 200:
                print(f"meshollama: pull answered {resp.status_code}: {resp.read().decode(errors='replace')}",
                      file=sys.stderr)
                return 1
            for line in resp.iter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if "error" in event:
                    bar.done()
                    print(f"Error: {event['error']}", file=sys.stderr)
                    return 1
                succeeded = succeeded or event.get("status") == "success"
                bar.update(event)
    except httpx.HTTPError as exc:
        bar.done()
        print(f"meshollama: pull failed: {exc}", file=sys.stderr)
        return 1
    bar.done()
    if not succeeded:
        print("meshollama: the pull ended without success (the node stopped?)", file=sys.stderr)
        return 1
    return 0


def _peer(peer_id: str) -> str:
    return f"{peer_id[:8]}…{peer_id[-6:]}"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class ProgressBar:
    """One line per blob, redrawn in place; per-peer totals when a blob is done."""

    WIDTH = 24

    def __init__(self, out) -> None:
        self.out = out
        self.digest = ""
        self.started = 0.0
        self.sources: dict[str, int] = {}
        self.last_line = ""

    def update(self, event: dict) -> None:
        status = event.get("status", "")
        digest = event.get("digest")
        if not digest:
            self._finish_blob()
            self._print(status, final=True)
            return
        if digest != self.digest:
            self._finish_blob()
            self.digest, self.started, self.sources = digest, time.monotonic(), {}
        total, done = int(event.get("total") or 0), int(event.get("completed") or 0)
        self.sources = (event.get("meshollama") or {}).get("from") or self.sources
        frac = done / total if total else 1.0
        filled = int(frac * self.WIDTH)
        rate = done / max(time.monotonic() - self.started, 1e-6)
        peers = f"  from {len(self.sources)} peer{'s' if len(self.sources) != 1 else ''}" if self.sources else ""
        self._print(f"{status} {frac:4.0%} ▕{'█' * filled}{' ' * (self.WIDTH - filled)}▏ "
                    f"{_size(done)}/{_size(total)}  {_size(rate)}/s{peers}")

    def _finish_blob(self) -> None:
        if self.digest:
            self._print(self.last_line, final=True)
            elapsed = max(time.monotonic() - self.started, 1e-6)
            for peer, n in sorted(self.sources.items(), key=lambda kv: -kv[1]):
                self._print(f"    {_peer(peer)}  {_size(n):>9}  {_size(n / elapsed)}/s", final=True)
        self.digest = ""

    def _print(self, text: str, final: bool = False) -> None:
        self.last_line = text
        tty = self.out.isatty()
        if final:
            self.out.write(("\r\x1b[K" if tty else "") + text + "\n")
        elif tty:
            self.out.write("\r\x1b[K" + text)
        self.out.flush()

    def done(self) -> None:
        self._finish_blob()


def format_models(data: dict) -> str:
    rows = [("MODEL", "SIZE", "COPIES", "HOLDERS")]
    for m in data.get("models", []):
        target = m.get("copies_target")
        copies = f"{m.get('copies', len(m['holders']))}/{target}" if target else str(len(m["holders"]))
        holders = ", ".join(f"{_peer(h['peer'])}{' (self)' if h.get('self') else ''}"
                            f"{'' if h.get('state') == 'alive' else ' ' + h.get('state', '')}" for h in m["holders"])
        extra = " replicating" if m.get("replicating") else ""
        if m.get("last_error"):
            extra += f" (last copy failed: {m['last_error']})"
        rows.append((m["model"], _size(m.get("size") or 0), copies, (holders or "-") + extra))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows]
    store = data.get("store")
    if store:
        lines.append(f"\nthis node: {store['kind']} store at {store['root']}, {_size(store['free'])} free"
                     f"{', takes replicas' if store.get('accepts_replicas') else ''}")
    return "\n".join(lines)
