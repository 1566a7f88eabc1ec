"""p2p/addrs.py: what we advertise, which announced addresses we keep, the dial order."""

from __future__ import annotations

import ipaddress

import pytest

from meshollama.cli import main
from meshollama.p2p import addrs

ME = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
PEER = "12D3KooWRfTWzgkxKoiAghszinDXpHZrbL4mu5drV8XaHFCHmG3A"
RELAY = "12D3KooWDmXZWDei6xn2cwjdQ8ueLKVxmSvXn5dg51VNRbh3KgFh"


def ips(*texts):
    return [ipaddress.ip_address(t) for t in texts]


@pytest.mark.parametrize("ip, scope", [
    ("127.0.0.1", addrs.Scope.LOOPBACK), ("::1", addrs.Scope.LOOPBACK),
    ("169.254.1.2", addrs.Scope.LINK_LOCAL), ("fe80::1", addrs.Scope.LINK_LOCAL),
    ("0.0.0.0", addrs.Scope.UNSPECIFIED), ("::", addrs.Scope.UNSPECIFIED),
    ("192.168.1.5", addrs.Scope.LAN), ("10.1.2.3", addrs.Scope.LAN), ("172.16.0.1", addrs.Scope.LAN),
    ("198.18.7.1", addrs.Scope.LAN), ("100.64.3.4", addrs.Scope.LAN), ("fd00::2", addrs.Scope.LAN),
    ("::ffff:192.168.1.5", addrs.Scope.LAN),
    ("8.8.4.4", addrs.Scope.PUBLIC), ("2001:4860::1", addrs.Scope.PUBLIC),
])
def test_scope(ip, scope):
    assert addrs.scope(ipaddress.ip_address(ip)) is scope


def test_wildcard_bind_advertises_every_interface_lan_first_never_loopback():
    got = addrs.advertise(
        ["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001"],
        ips("127.0.0.1", "::1", "8.8.4.4", "fe80::1", "192.168.1.5", "fd00::2", "2606:4700::5", "10.0.0.2"),
        ME,
    )
    assert got == [  # within a class, the order interface_ips gave (default route first)
        f"/ip4/192.168.1.5/tcp/4001/p2p/{ME}",
        f"/ip4/10.0.0.2/tcp/4001/p2p/{ME}",
        f"/ip6/fd00::2/tcp/4001/p2p/{ME}",
        f"/ip4/8.8.4.4/tcp/4001/p2p/{ME}",
        f"/ip6/2606:4700::5/tcp/4001/p2p/{ME}",
    ]
    assert not any("/127." in a or "::1/" in a or "fe80" in a for a in got)


def test_ipv4_wildcard_gets_only_ipv4_addresses():
    got = addrs.advertise(["/ip4/0.0.0.0/tcp/4001"], ips("192.168.1.5", "fd00::2"), ME)
    assert got == [f"/ip4/192.168.1.5/tcp/4001/p2p/{ME}"]


def test_a_machine_with_no_network_still_advertises_loopback():
    assert addrs.advertise(["/ip4/0.0.0.0/tcp/4001"], ips("127.0.0.1"), ME) == [f"/ip4/127.0.0.1/tcp/4001/p2p/{ME}"]
    assert addrs.advertise(["/ip4/127.0.0.1/tcp/5000"], ips("192.168.1.5"), ME) == [
        f"/ip4/127.0.0.1/tcp/5000/p2p/{ME}"]


def test_observed_addresses_are_added_after_interfaces_and_announce_replaces_all():
    got = addrs.advertise(["/ip4/0.0.0.0/tcp/4001"], ips("192.168.1.5"), ME, observed=["/ip4/203.0.113.9/tcp/4001"])
    assert got == [f"/ip4/192.168.1.5/tcp/4001/p2p/{ME}", f"/ip4/203.0.113.9/tcp/4001/p2p/{ME}"]
    got = addrs.advertise(["/ip4/0.0.0.0/tcp/4001"], ips("192.168.1.5"), ME,
                          announce=["/ip4/203.0.113.9/tcp/14001", "/dns4/home.example.com/tcp/4001"])
    assert got == [f"/ip4/203.0.113.9/tcp/14001/p2p/{ME}", f"/dns4/home.example.com/tcp/4001/p2p/{ME}"]


def test_announced_addresses_must_be_the_announcers_own():
    good = f"/ip4/198.18.7.3/tcp/4001/p2p/{PEER}"
    relayed = f"/ip4/198.18.100.1/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{PEER}"
    checked = addrs.check_announced([
        good, relayed,
        f"/ip4/198.18.7.9/tcp/4001/p2p/{ME}",  # somebody else's
        "/ip4/198.18.7.9/tcp/4001",  # no id at all
        f"/ip4/0.0.0.0/tcp/4001/p2p/{PEER}",  # a wildcard
        "not a multiaddr", "/ip4/300.1.1.1/tcp/1", f"/ip4/198.18.7.3/udp/4001/p2p/{PEER}",
        good,  # a duplicate is not counted twice
    ], PEER)
    assert checked.kept == (good, relayed)
    assert checked.dropped == 6 and checked.trimmed == 0


def test_a_thousand_addresses_are_trimmed_and_counted():
    many = [f"/ip4/198.18.{i // 250}.{i % 250 + 1}/tcp/4001/p2p/{PEER}" for i in range(1000)]
    checked = addrs.check_announced(many, PEER)
    assert len(checked.kept) == addrs.MAX_ADVERTISED and checked.trimmed == 1000 - addrs.MAX_ADVERTISED


def test_dial_plan_never_dials_ourselves_or_another_hosts_loopback():
    peer = [f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}", f"/ip4/198.18.7.3/tcp/4001/p2p/{PEER}",
            f"/ip4/198.18.100.1/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{PEER}",
            f"/ip4/203.0.113.3/tcp/4001/p2p/{PEER}", f"/ip4/198.18.7.2/tcp/4001/p2p/{PEER}"]
    own = [f"/ip4/198.18.7.2/tcp/4001/p2p/{ME}", "/ip4/0.0.0.0/tcp/4001"]
    plan = addrs.dial_plan(peer, own, ips("127.0.0.1", "198.18.7.2"))
    assert plan == [f"/ip4/198.18.7.3/tcp/4001/p2p/{PEER}", f"/ip4/203.0.113.3/tcp/4001/p2p/{PEER}",
                    f"/ip4/198.18.100.1/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{PEER}"]


def test_loopback_is_dialled_only_by_a_node_that_is_on_loopback_alone():
    peer = [f"/ip4/127.0.0.1/tcp/4002/p2p/{PEER}"]
    assert addrs.dial_plan(peer, [f"/ip4/127.0.0.1/tcp/4001/p2p/{ME}"], ips("127.0.0.1", "192.168.1.5")) == peer
    # ... but not our own port on it
    assert addrs.dial_plan(peer, [f"/ip4/127.0.0.1/tcp/4002/p2p/{ME}"], ips("127.0.0.1")) == []
    # A stranger claiming our LAN IP does not get us to dial our own loopback ports.
    claim = [f"/ip4/192.168.1.5/tcp/1/p2p/{PEER}", f"/ip4/127.0.0.1/tcp/22/p2p/{PEER}"]
    own = [f"/ip4/192.168.1.5/tcp/4001/p2p/{ME}", "/ip4/0.0.0.0/tcp/4001"]
    assert addrs.dial_plan(claim, own, ips("127.0.0.1", "192.168.1.5")) == [f"/ip4/192.168.1.5/tcp/1/p2p/{PEER}"]
    assert addrs.dial_plan(peer, own, ips("127.0.0.1", "192.168.1.5")) == []


def test_dial_plan_refuses_mapped_self_multicast_broadcast_and_ourselves_as_relay():
    own = [f"/ip4/192.168.1.5/tcp/4001/p2p/{ME}", "/ip4/0.0.0.0/tcp/4001"]
    bad = [f"/ip6/::ffff:192.168.1.5/tcp/4001/p2p/{PEER}", f"/ip4/224.0.0.1/tcp/4001/p2p/{PEER}",
           f"/ip4/255.255.255.255/tcp/4001/p2p/{PEER}", f"/ip4/0.1.2.3/tcp/4001/p2p/{PEER}",
           f"/ip4/240.0.0.1/tcp/4001/p2p/{PEER}", f"/ip6/ff02::1/tcp/4001/p2p/{PEER}",
           f"/ip4/192.168.1.7/tcp/4001/p2p/{ME}/p2p-circuit/p2p/{PEER}"]
    assert addrs.dial_plan(bad, own, ips("127.0.0.1", "192.168.1.5"), self_id=ME) == []


def test_bad_announce_flag_stops_start_naming_the_flag(capsys, tmp_path):
    rc = main(["start", "--data-dir", str(tmp_path), "--announce", "/ip4/1.2.3/tcp/4001"])
    err = capsys.readouterr().err
    assert rc == 2 and "--announce" in err and "1.2.3" in err, err
    rc = main(["start", "--data-dir", str(tmp_path), "--announce", "/ip4/0.0.0.0/tcp/4001"])
    err = capsys.readouterr().err
    assert rc == 2 and "--announce" in err and "wildcard" in err, err
    rc = main(["start", "--data-dir", str(tmp_path), "--announce", f"/ip4/203.0.113.7/tcp/4001/p2p/{PEER}"])
    err = capsys.readouterr().err
    assert rc == 2 and "--announce" in err and "no /p2p/" in err, err


def test_id_lists_lan_addresses_not_wildcards(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(addrs, "interfaces", lambda: addrs.Interfaces(tuple(ips("127.0.0.1", "198.18.7.1")), frozenset()))
    assert main(["id", "--data-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.split()
    assert lines[1].startswith("/ip4/198.18.7.1/tcp/4001/p2p/" + lines[0]) and len(lines) == 2


def test_interface_ips_put_the_default_route_first_and_docker_last(monkeypatch):
    import socket
    from types import SimpleNamespace as NS

    import psutil

    def entry(ip):
        return NS(family=socket.AF_INET, address=ip)

    monkeypatch.setattr(psutil, "net_if_addrs", lambda: {
        "lo": [entry("127.0.0.1")], "docker0": [entry("172.17.0.1")], "wg0": [entry("10.8.0.2")],
        "eth0": [entry("192.168.1.5")], "eth1": [entry("10.0.0.9")], "down0": [entry("10.9.9.9")]})
    monkeypatch.setattr(psutil, "net_if_stats", lambda: {
        n: NS(isup=n != "down0") for n in ("lo", "docker0", "wg0", "eth0", "eth1", "down0")})
    monkeypatch.setattr(addrs, "_default_route_interfaces", lambda: {"eth0"})
    found = addrs.interfaces()
    got = addrs.advertise(["/ip4/0.0.0.0/tcp/4001"], found.ips, ME, virtual=found.virtual)
    assert [a.split("/")[2] for a in got] == ["192.168.1.5", "10.0.0.9", "172.17.0.1", "10.8.0.2"]


def test_a_vps_prints_its_public_address_before_its_docker_bridge():
    got = addrs.advertise(["/ip4/0.0.0.0/tcp/4001"], ips("172.17.0.1", "8.8.4.4"), ME, virtual=ips("172.17.0.1"))
    assert [a.split("/")[2] for a in got] == ["8.8.4.4", "172.17.0.1"]


def test_with_no_interface_known_a_wildcard_bind_advertises_loopback():
    assert addrs.advertise(["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001"], [], ME) == [
        f"/ip4/127.0.0.1/tcp/4001/p2p/{ME}", f"/ip6/::1/tcp/4001/p2p/{ME}"]


def test_relay_and_dns_addresses_get_the_same_checks_as_direct_ones():
    own = [f"/ip4/192.168.1.5/tcp/4001/p2p/{ME}", "/ip4/0.0.0.0/tcp/4001"]
    got = addrs.dial_plan([
        f"/ip4/127.0.0.1/tcp/11434/p2p/{RELAY}/p2p-circuit/p2p/{PEER}",  # a "relay" on our loopback
        f"/ip4/224.0.0.1/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{PEER}",
        f"/ip4/192.168.1.5/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{PEER}",  # a "relay" that is our own address
        f"/dns4/localhost/tcp/11434/p2p/{PEER}", f"/dns4/api.localhost/tcp/11434/p2p/{PEER}",
        f"/dns4/relay.example.com/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{PEER}",
        f"/dns4/home.example.com/tcp/4001/p2p/{PEER}",
    ], own, ips("127.0.0.1", "192.168.1.5"), self_id=ME)
    assert got == [f"/dns4/home.example.com/tcp/4001/p2p/{PEER}",
                   f"/dns4/relay.example.com/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{PEER}"]


def test_nothing_advertised_is_not_loopback_alone():
    peer = [f"/ip4/127.0.0.1/tcp/22/p2p/{PEER}", f"/ip6/fe80::1/tcp/22/p2p/{PEER}"]
    assert addrs.dial_plan(peer, ["/ip4/0.0.0.0/tcp/4001"], []) == []
