#!/usr/bin/env python3
"""What finding a holder through the DHT costs a request (``mesh.holders``), side by side
with a model the announcements list.

Real nodes on loopback: ``a`` in front of a stand-in Ollama with 270 models (more
than one announcement carries: it says ``mm``), ``b`` a plain node, ``g`` the
gateway the requests go to (``--backend none``), and ``lone``, a node with no
peers (a small mesh: no DHT lookup for a model nobody has). Interleaved rounds of
non-streamed ``/api/chat`` (8 tokens, no delay) and 404s, per round:

  listed       a model a's announcement lists (the table path)
  hidden cold  a model a's announcement leaves out, first request for it
               (DHT lookup + holds question + the request)
  hidden warm  the same model again (providers cached; the holds question each time)
  404 cold     a name nobody has, first time (a DHT lookup that finds nobody)
  404 cached   the same name again within 10 s ("nobody" cached)
  404 lone     a name nobody has on ``lone`` (no peer says ``mm``: answered at once)

    .venv/bin/python benchmarks/bench_holders.py [--rounds 20]    # ~1.5 min; writes benchmarks/results/holders-<UTC>.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.fake_ollama import serve_fake  # noqa: E402
from tests.integration.cluster import Cluster  # noqa: E402

from common import report  # noqa: E402

MODELS = [f"m{i:03d}:latest" for i in range(270)]


def ms(values: list[float]) -> dict:
    s = sorted(values)
    return {"n": len(s), "p50_ms": round(1000 * statistics.median(s), 2),
            "p90_ms": round(1000 * s[max(0, int(0.9 * len(s)) - 1)], 2), "max_ms": round(1000 * s[-1], 2)}


async def timed(client: httpx.AsyncClient, url: str, model: str, want: int) -> float:
    t0 = time.perf_counter()
    r = await client.post(url + "/api/chat", json={"model": model, "stream": False,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    took = time.perf_counter() - t0
    if r.status_code != want:
        raise RuntimeError(f"{model}: {r.status_code} {r.text[:200]}")
    return took


async def run(rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-holders-") as tmp:
        async with trio.open_nursery() as nursery:
            c = Cluster(Path(tmp), nursery)
            try:
                fake = await nursery.start(lambda task_status: serve_fake(MODELS, name="a", token_delay=0.0,
                                                                          task_status=task_status))
                b = await c.start("b", "--backend", "none")
                a = await c.start("a", "--backend", "ollama", "--ollama-url", fake.url, bootstrap=b)
                g = await c.start("g", "--backend", "none", bootstrap=b)
                lone = await c.start("lone", "--backend", "none")
                async with httpx.AsyncClient(timeout=30) as client:
                    with trio.fail_after(180):
                        while True:  # g heard a, and a said the left-out models' records (they go first)
                            entry = (await c.view(g)).get(a.peer_id, {})
                            st = (await client.get(a.api + "/api/mesh/status")).json()["mesh"]
                            listed = {m["name"] for m in entry.get("models", [])}
                            hidden = [m for m in MODELS if m not in listed]
                            if (entry.get("more_models") and listed
                                    and (st.get("dht_models") or {}).get("provided", 0) >= len(hidden)):
                                break
                            await trio.sleep(0.5)
                    shown = sorted(listed)[0]
                    out: dict[str, list[float]] = {k: [] for k in (
                        "listed", "hidden_cold", "hidden_warm", "404_cold", "404_cached", "404_lone")}
                    logs = {"g": g, "a": a}
                    for i in range(rounds):
                        model = hidden[i % len(hidden)]
                        out["listed"].append(await timed(client, g.api, shown, 200))
                        out["hidden_cold" if i < len(hidden) else "hidden_warm"].append(
                            await timed(client, g.api, model, 200))
                        out["hidden_warm"].append(await timed(client, g.api, model, 200))
                        out["404_cold"].append(await timed(client, g.api, f"nobody{i}:1b", 404))
                        out["404_cached"].append(await timed(client, g.api, f"nobody{i}:1b", 404))
                        out["404_lone"].append(await timed(client, lone.api, f"nobody{i}:1b", 404))
                    st_g = (await client.get(g.api + "/api/mesh/status")).json()["mesh"]
                    del logs
                return {"what": "holders", "rounds": rounds, "hidden_models": len(hidden),
                        "results": {k: ms(v) for k, v in out.items() if v},
                        "gateway_holder_lookups": st_g.get("holder_lookups")}
            finally:
                await c.close()
                nursery.cancel_scope.cancel()


def show(res: dict) -> None:
    print(f"{res['hidden_models']} of {len(MODELS)} models left out of a's announcement; {res['rounds']} rounds")
    print(f"{'case':<14}{'n':>4}{'p50 ms':>10}{'p90 ms':>10}{'max ms':>10}")
    for k, v in res["results"].items():
        print(f"{k:<14}{v['n']:>4}{v['p50_ms']:>10}{v['p90_ms']:>10}{v['max_ms']:>10}")
    print("gateway holder_lookups:", res["gateway_holder_lookups"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    res = trio.run(run, args.rounds)
    out = args.out or ROOT / "benchmarks" / "results" / f"holders-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    report(res, out, show)


if __name__ == "__main__":
    main()
