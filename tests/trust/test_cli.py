"""``meshollama mesh init``, ``admit``, ``revoke``, ``policy`` with no node running (files only)."""

from __future__ import annotations

import json
import shutil

from meshollama import cli
from meshollama.trust.documents import Authority, decode_policy

NOBODY = "http://127.0.0.1:9"  # refused: no node runs there
B = "12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
C = "12D3KooWCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC"


def run(capsys, *args) -> str:
    assert cli.main(list(args)) == 0
    return capsys.readouterr().out


def policy(data_dir, authority):
    return decode_policy(authority, (data_dir / "trust" / "policy").read_text())


def test_init_admit_revoke_and_a_stale_copy_never_undoes_a_revocation(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MESHOLLAMA_CONFIG", raising=False)
    dd = tmp_path / "node"
    out = run(capsys, "mesh", "init", "--data-dir", str(dd))
    authority = Authority.parse(out.split("mesh authority: ")[1].split()[0])
    assert (dd / "authority.key").stat().st_mode & 0o777 == 0o600
    me = json.loads(run(capsys, "id", "--json", "--data-dir", str(dd)))["peer_id"]
    assert {c.peer: c.role for c in policy(dd, authority).certs} == {me: "admin"}

    run(capsys, "admit", B, "--role", "serve", "--expires", "30d", "--data-dir", str(dd), "--api", NOBODY)
    before = (dd / "trust" / "policy").read_text()
    run(capsys, "revoke", B, "--data-dir", str(dd), "--api", NOBODY)
    p = policy(dd, authority)
    assert p.cert_for(B, 0) is None and p.revoked_at(B) is not None

    # The node's copy goes stale (restored from a backup taken before the revocation),
    # then the operator admits someone else: B must stay revoked.
    shutil.copy(dd / "trust" / "policy", tmp_path / "x")
    (dd / "trust" / "policy").write_text(before)
    run(capsys, "admit", C, "--data-dir", str(dd), "--api", NOBODY)
    p = policy(dd, authority)
    assert p.revoked_at(B) is not None and p.cert_for(B, 0) is None and p.cert_for(C, 0) is not None

    shown = json.loads(run(capsys, "policy", "show", "--json", "--data-dir", str(dd), "--api", NOBODY))
    assert {a["peer"] for a in shown["admitted"]} == {me, C} and shown["revoked"][0]["peer"] == B

    out = run(capsys, "policy", "set", "routing.strategy=round_robin", "--add-key", "user", "--key-name", "ci",
              "--data-dir", str(dd), "--api", NOBODY)
    p = policy(dd, authority)
    assert p.routing == {"strategy": "round_robin"} and p.keys_required and p.api_keys[0]["name"] == "ci"
    assert out.strip().splitlines()[-1].startswith("mo_")  # the key, shown once
    assert out.strip().splitlines()[-1] not in (dd / "trust" / "policy").read_text()


def test_the_authority_tools_say_what_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MESHOLLAMA_CONFIG", raising=False)
    dd = tmp_path / "node"
    assert cli.main(["admit", B, "--data-dir", str(dd), "--api", NOBODY]) == 1
    assert "no authority key" in capsys.readouterr().err
    run(capsys, "mesh", "init", "--data-dir", str(dd))
    assert cli.main(["mesh", "init", "--data-dir", str(dd)]) == 1  # never overwrites an authority
    assert "already holds a mesh authority" in capsys.readouterr().err
    assert cli.main(["admit", B, "--expires", "soon", "--data-dir", str(dd), "--api", NOBODY]) == 1
    assert "--expires" in capsys.readouterr().err
    assert cli.main(["admit", "not-a-peer", "--data-dir", str(dd), "--api", NOBODY]) == 1
    assert "not a peer ID" in capsys.readouterr().err
