#!/usr/bin/env python3
"""The gateway's remote path across hosts (network namespaces, real TCP, MTU 1500).

The phases of ``benchmarks/bench_gateway.py`` (the loopback run of this same
comparison), here between two "machines" on one bridge (``tests/netns.py``):

  host B 198.18.8.2  stand-in Ollama on 0.0.0.0:11435, node L
                     (``--backend ollama --api-listen 198.18.8.2:11434``)
  host A 198.18.8.1  node G (``--backend none --bootstrap <L>``, gateway on its
                     default 127.0.0.1:11434) and the benchmark client

  direct  client in A -> the stand-in Ollama on B, over the LAN
  local   client in A -> L's gateway on B, over the LAN (L calls its Ollama)
  remote  client in A -> its own gateway G on A, libp2p over the LAN to L on B

The main process builds the hosts and starts the processes, then re-runs this
script inside A (``--client``) to measure; everything is torn down in any case.

``--relay`` (needs ``meshollama start --relay-service``): relay R 198.18.100.1,
two homes behind NAT (``Net.nat``); G in home A reaches L in home B only through
R's circuit. No direct path exists between homes, so the baseline is the same-LAN
remote path, measured first in the same invocation.

    .venv/bin/python benchmarks/bench_netns.py --out benchmarks/results/netns-<UTC>.json
    .venv/bin/python benchmarks/bench_netns.py --relay --out benchmarks/results/netns-relay-<UTC>.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gateway as bg  # noqa: E402
from common import report  # noqa: E402
from tests.multihost.nodes import BAD_LOG, http, peers, start_node, wait_for  # noqa: E402
from tests.netns import Host, Net, missing  # noqa: E402

MODEL, VARIANTS = bg.MODEL, bg.VARIANTS
LEGEND = {
    "direct": "client in A -> stand-in Ollama on B over the LAN (no meshollama)",
    "local": "client in A -> L's gateway on B over the LAN -> L's Ollama on B",
    "remote": "client in A -> G's gateway on A (127.0.0.1) -> libp2p over the LAN -> L on B",
}
PHASE_OPTS = ("n", "cpu_n", "ttfb_n", "ttfb_delay", "concurrency", "seconds", "stream_tokens", "token_runs")


# --------------------------------------------------------------------------- client (inside host A)

async def check_peer(clients: dict, urls: dict, peer: str) -> list:
    """The routed answers come from L (X-Meshollama-Peer), as bench_gateway checks."""
    seen = []
    for v in ("remote", "local"):
        if v not in urls:
            continue
        for attempt in range(5):
            r = await clients[v].post(urls[v] + "/api/generate", content=bg.gen_body(False))
            if r.status_code == 200 and r.headers.get("x-meshollama-peer") == peer:
                break
            seen.append({"variant": v, "attempt": attempt, "status": r.status_code,
                         "peer": r.headers.get("x-meshollama-peer"), "body": r.text[:300]})
            print(f"[netns] WARNING unexpected answer on {v}: {seen[-1]}", file=sys.stderr)
            await trio.sleep(0.5)
        else:
            raise RuntimeError(f"{v} path never answered from {peer}: {seen}")
    return seen


async def client_main(a: argparse.Namespace) -> dict:
    urls, pids = json.loads(a.urls), json.loads(a.pids)
    res: dict = {"urls": urls, "pids": pids, "peer_checked": a.peer}
    clients = {v: httpx.AsyncClient(timeout=30.0) for v in urls}
    ctl = httpx.AsyncClient(timeout=10.0)
    fake = bg.FakeProc(Path(tempfile.gettempdir()))
    fake.url = a.fake_url

    async def knobs(**kw) -> None:  # over the LAN; in relay mode from inside B (no path from A)
        if not a.fake_ns:
            return await fake.control(ctl, **kw)
        p = await trio.run_process(["ip", "netns", "exec", a.fake_ns, sys.executable, "-m", "tests.multihost.client",
                                    "POST", a.fake_url + "/_fake/control", json.dumps(kw)], capture_stdout=True)
        if json.loads(p.stdout).get("status") != 200:
            raise RuntimeError(f"setting the stand-in's knobs failed: {p.stdout[:300]!r}")

    try:
        res["setup_anomalies"] = await check_peer(clients, urls, a.peer)
        await knobs(token_delay=0.0, tokens=8)
        if set(urls) != set(VARIANTS):  # relay mode: only the remote path exists from A
            c, u = clients["remote"], urls["remote"]
            print(f"[netns] relay latency: {a.n} sequential stream:false ...", file=sys.stderr)
            lat = [await bg.one_nonstream(c, u) for _ in range(20 + a.n)][20:]
            res["latency"] = {"remote": bg.summary_ms(lat)}
            print(f"[netns] relay ttfb: {a.ttfb_n} stream:true ...", file=sys.stderr)
            await knobs(token_delay=a.ttfb_delay, tokens=8)
            fb = [(await bg.one_stream(c, u))[1] for _ in range(5 + a.ttfb_n)][5:]
            res["ttfb"] = {"remote": {"ttfb": bg.summary_ms(fb)}, "token_delay_s": a.ttfb_delay}
            return res
        print(f"[netns] latency: {a.n} x 3 sequential stream:false ...", file=sys.stderr)
        res["latency"] = await bg.phase_latency(clients, urls, a.n, warmup=20)
        print("[netns] cpu cost per request ...", file=sys.stderr)
        res["cpu_per_request"] = await bg.phase_cpu(clients, urls, pids, a.cpu_n)
        print(f"[netns] ttfb: {a.ttfb_n} x 3 stream:true, token_delay {a.ttfb_delay} ...", file=sys.stderr)
        await knobs(token_delay=a.ttfb_delay, tokens=8)
        res["ttfb"] = await bg.phase_ttfb(clients, urls, a.ttfb_n, warmup=5)
        res["ttfb"]["token_delay_s"] = a.ttfb_delay
        print(f"[netns] rps: {a.concurrency} clients x {a.seconds}s x 3 ...", file=sys.stderr)
        await knobs(token_delay=0.0, tokens=8)
        res["rps"] = await bg.phase_rps(urls, a.concurrency, a.seconds)
        res["rps"]["concurrency"] = a.concurrency
        print(f"[netns] tokens: {a.stream_tokens} tokens x {a.token_runs} x 3 ...", file=sys.stderr)
        await knobs(token_delay=0.0, tokens=a.stream_tokens)
        res["tokens"] = await bg.phase_tokens(clients, urls, a.token_runs)
        res["tokens"]["tokens"] = a.stream_tokens
        return res
    finally:
        for cl in clients.values():
            await cl.aclose()
        await ctl.aclose()


# --------------------------------------------------------------------------- orchestration (root namespace)

async def spawn_fake(net: Net, host: Host, tmp: Path) -> trio.Process:
    port_file = tmp / "fake.port"
    port_file.unlink(missing_ok=True)
    args = [sys.executable, "-m", "tests.fakes.fake_ollama", "--host", "0.0.0.0", "--port", "11435",
            "--models", MODEL, "--no-host-check", "--token-delay", "0", "--tokens", "8",
            "--port-file", str(port_file), "--name", "bench"]
    proc = await net.spawn(host, args, log=tmp / "fake.log")
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None:
            raise RuntimeError(f"fake ollama exited:\n{(tmp / 'fake.log').read_text()[-2000:]}")
        await trio.sleep(0.05)
    return proc


def p2p_addr(node) -> str:
    addr = node.info["p2p_addrs"][0]
    return addr if "/p2p/" in addr else f"{addr}/p2p/{node.peer_id}"


async def wait_routed(net: Net, host: Host, node, peer: str, seconds: float) -> None:
    """Until a request to ``node``'s gateway (in ``host``) is answered by ``peer``."""
    async def ok():
        r = await http(net, host, "POST", "/api/generate", {"model": MODEL, "prompt": "hi", "stream": False})
        return r.get("status") == 200 and r["headers"].get("x-meshollama-peer") == peer
    try:
        with trio.fail_after(seconds):
            await wait_for(ok, step=0.5)
    except trio.TooSlowError:
        raise RuntimeError(f"{node.name}'s gateway got no answer from {peer} within {seconds}s; log tail:\n"
                           f"{node.text()[-3000:]}") from None


async def run_client(net: Net, host: Host, tmp: Path, args, urls: dict, pids: dict, peer: str,
                     fake_url: str, fake_ns: str = "") -> dict:
    out = tmp / f"client-{len(list(tmp.glob('client-*')))}.json"
    cmd = ["ip", "netns", "exec", host.name, sys.executable, str(Path(__file__).resolve()), "--client",
           "--urls", json.dumps(urls), "--pids", json.dumps(pids), "--peer", peer, "--fake-url", fake_url,
           "--fake-ns", fake_ns, "--client-out", str(out)]
    for k in PHASE_OPTS:
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    with trio.fail_after(args.client_timeout):
        await trio.run_process(cmd, cwd=str(ROOT), check=True)
    return json.loads(out.read_text())


async def measure(args, tmp: Path, relay: bool) -> dict:
    """Build the hosts, start the stand-in and nodes, run the client in A; always tear down."""
    net, t0, nodes = Net(), time.perf_counter(), []
    flags = ("--no-mdns", "--heartbeat-interval", str(args.heartbeat))
    try:
        with trio.fail_after(180):
            if relay:
                wan, (r_host,) = net.lan("198.18.100", ["relay"], name="inet")
                a = net.nat(wan, "198.18.100.11", "198.18.1", "homea", index=1)
                b = net.nat(wan, "198.18.100.12", "198.18.2", "homeb", index=2)
                nodes.append(await start_node(net, r_host, tmp, "R", "--backend", "none", "--relay-service", *flags))
                boot, l_api = p2p_addr(nodes[0]), ()
            else:
                _, (a, b) = net.lan("198.18.8", ["a", "b"])
                boot, l_api = None, ("--api-listen", f"{b.ip}:11434")
            fake = await spawn_fake(net, b, tmp)
            node_l = await start_node(net, b, tmp, "L", "--backend", "ollama", *l_api, *flags,
                                      *(("--bootstrap", boot) if boot else ()))
            node_g = await start_node(net, a, tmp, "G", "--backend", "none", "--bootstrap", boot or p2p_addr(node_l),
                                      *flags)
            nodes += [node_l, node_g]
            await wait_routed(net, a, node_g, node_l.peer_id, 150 if relay else 90)
            l_addrs = (await peers(net, a)).get(node_l.peer_id, {}).get("addrs", [])
        setup_s = round(time.perf_counter() - t0, 2)
        pids = {"fake": fake.pid, **{n.name: n.proc.pid for n in nodes}}
        if relay:  # from A only its own gateway is reachable; the stand-in's knobs are set from inside B
            res = await run_client(net, a, tmp, args, {"remote": "http://127.0.0.1:11434"}, pids, node_l.peer_id,
                                   "http://127.0.0.1:11435", fake_ns=b.name)
        else:
            urls = {"direct": f"http://{b.ip}:11435", "local": f"http://{b.ip}:11434",
                    "remote": "http://127.0.0.1:11434"}
            res = await run_client(net, a, tmp, args, urls, pids, node_l.peer_id, urls["direct"])
        # A TCP connection from home A to home B's router would be a hole-punched
        # direct path: the numbers would then not be the relay's.
        punched = ""
        if relay:
            punched = (await net.run(a, ["ss", "-tnH", "state", "established", "dst", "198.18.100.12"])).stdout
        res.update(setup_s=setup_s, variants=LEGEND if not relay else {"remote": "home A -> G -> R -> L in home B"},
                   log_anomalies={n.name: [ln for ln in n.text().splitlines() if BAD_LOG.search(ln)][:5]
                                  for n in nodes},
                   topology={"A": a.ip, "B": b.ip, "mtu": net_mtu(a), "L_peer": node_l.peer_id,
                             "G_peer": node_g.peer_id, "L_addrs_seen_by_G": l_addrs,
                             "via_circuit": any("p2p-circuit" in x for x in l_addrs),
                             "direct_tcp_A_to_B": punched.decode().strip() if punched else ""})
        return res
    finally:
        net.close()


def net_mtu(host: Host) -> int | None:
    out = subprocess.run(["ip", "-n", host.name, "-o", "link", "show", "eth0"], capture_output=True, text=True).stdout
    parts = out.split()
    return int(parts[parts.index("mtu") + 1]) if "mtu" in parts else None


def targets(r: dict) -> dict:
    lat, tt = r["latency"], r["ttfb"]
    rows = (("remote_p50_overhead_ms", bg.TARGET_REMOTE_P50_OVERHEAD_MS, lat["remote"]["p50_added_ms"]),
            ("remote_ttfb_added_ms", bg.TARGET_TTFB_ADDED_MS, tt["remote"]["ttfb_p50_added_ms"]),
            ("local_ttfb_added_ms", bg.TARGET_TTFB_ADDED_MS, tt["local"]["ttfb_p50_added_ms"]))
    return {name: {"target": t, "measured": m, "met": m < t} for name, t, m in rows}


def print_lan(r: dict) -> None:
    print(f"\nacross hosts (netns, MTU {r['topology']['mtu']}); loopback counterpart: benchmarks/bench_gateway.py")
    for v in VARIANTS:
        print(f"  {v:<7} {LEGEND[v]}")
    bg.print_table(r)
    lat, tt = r["latency"], r["ttfb"]
    print(f"\n{'added vs direct (ms)':<38}{'p50':>12}{'p99':>12}{'TTFB p50':>12}")
    print("-" * 74)
    for v in ("local", "remote"):
        print(f"{v:<38}{lat[v]['p50_added_ms']:>+12.2f}{lat[v]['p99_added_ms']:>+12.2f}"
              f"{tt[v]['ttfb_p50_added_ms']:>+12.2f}")
    bad = {k: v for k, v in r["log_anomalies"].items() if v}
    if r["setup_anomalies"] or bad:
        print(f"anomalies: setup {r['setup_anomalies']} logs {bad}")


def print_result(r: dict) -> None:
    if r["mode"] == "lan":
        print_lan(r)
        return
    lan, rel = r["lan"], r["relay"]
    print_lan({**lan, "machine": r["machine"], "total_s": r["total_s"]})
    print("\nrelay: client in home A -> G -> R (public relay) -> L in home B, both homes behind NAT.")
    print("No direct path exists between the homes: the baseline is the same-LAN remote path above.")
    print(f"via circuit: {rel['topology']['via_circuit']}  (L's addrs seen by G: {rel['topology']['L_addrs_seen_by_G']})")
    print(f"hole-punched direct connection A->B after the run: {rel['topology'].get('direct_tcp_A_to_B') or 'none'}")
    print(f"{'':<38}{'p50':>12}{'p99':>12}{'TTFB p50':>12}")
    rows = (("same-LAN remote", lan["latency"]["remote"], lan["ttfb"]["remote"]["ttfb"]),
            ("relay remote", rel["latency"]["remote"], rel["ttfb"]["remote"]["ttfb"]))
    for label, lt, fb in rows:
        print(f"{label:<38}{lt['p50_ms']:>12.2f}{lt['p99_ms']:>12.2f}{fb['p50_ms']:>12.2f}")
    c = r["relay_added_vs_lan_remote"]
    print(f"{'added by the relay':<38}{c['p50_ms']:>+12.2f}{c['p99_ms']:>+12.2f}{c['ttfb_p50_ms']:>+12.2f}")


async def main_async(args) -> dict:
    t0, tmp = time.perf_counter(), Path(tempfile.mkdtemp(prefix="bench_netns_"))
    r = {"benchmark": "netns", "mode": "relay" if args.relay else "lan", "loopback_counterpart": "bench_gateway.py",
         "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                     "loadavg_before": os.getloadavg()},
         "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    try:
        lan = await measure(args, tmp, relay=False)
        lan["targets"] = targets(lan)
        if args.relay:
            rel = await measure(args, tmp, relay=True)
            lr, rr = lan["latency"]["remote"], rel["latency"]["remote"]
            lf, rf = lan["ttfb"]["remote"]["ttfb"], rel["ttfb"]["remote"]["ttfb"]
            r.update(lan=lan, relay=rel, baseline="same-LAN remote path, measured first in this run",
                     relay_added_vs_lan_remote={"p50_ms": round(rr["p50_ms"] - lr["p50_ms"], 3),
                                                "p99_ms": round(rr["p99_ms"] - lr["p99_ms"], 3),
                                                "ttfb_p50_ms": round(rf["p50_ms"] - lf["p50_ms"], 3)})
        else:
            r.update(lan)
    except BaseException:
        print(f"[netns] failed; logs kept in {tmp}", file=sys.stderr)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    r["machine"]["loadavg_after"] = os.getloadavg()
    r["total_s"] = round(time.perf_counter() - t0, 2)
    return r


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--relay", action="store_true", help="also measure A -> relay -> B between two NAT'd homes")
    for flag, default, hlp in (("--n", 200, "sequential stream:false requests per variant"),
                               ("--cpu-n", 200, "requests per variant in the CPU-cost phase"),
                               ("--ttfb-n", 60, "sequential streaming requests per variant"),
                               ("--ttfb-delay", 0.02, "stand-in token_delay for the TTFB phase"),
                               ("--concurrency", 8, "clients in the throughput phase"),
                               ("--seconds", 5.0, "duration of each throughput run"),
                               ("--stream-tokens", 200, "tokens per stream in the tokens phase"),
                               ("--token-runs", 5, "streams per variant in the tokens phase"),
                               ("--heartbeat", 2.0, "nodes' --heartbeat-interval")):
        p.add_argument(flag, type=type(default), default=default, help=hlp)
    p.add_argument("--client-timeout", type=float, default=900.0, help="bound on the measuring client's run")
    # internal: the measuring client, run inside host A by the main process
    for name in ("--urls", "--pids", "--peer", "--fake-url", "--client-out"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--fake-ns", default="", help=argparse.SUPPRESS)
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        Path(args.client_out).write_text(json.dumps(trio.run(client_main, args)))
        return None
    why = missing(nat=args.relay)
    if why:
        sys.exit(f"bench_netns: {why}")
    if args.relay:
        h = subprocess.run([sys.executable, "-m", "meshollama", "start", "--help"], capture_output=True, text=True,
                           cwd=ROOT).stdout
        if "--relay-service" not in h:
            sys.exit("bench_netns --relay: this meshollama has no `start --relay-service` yet, so there is no "
                     "relay to measure; run without --relay for the same-LAN comparison.")
    result = trio.run(main_async, args)
    report(result, args.out, print_result)
    return result


if __name__ == "__main__":
    main()
