"""proxy/data/commands.json against live servers.

* every command and subcommand that a live server's COMMAND reports with key
  specs is in the table with equal key specs (so a new server version cannot
  silently add a keyed command the proxy does not know how to rewrite);
* the file is what scripts/gen_command_table.py produces: same command names,
  and byte-identical when the live server versions are the ones in the header.
"""

from __future__ import annotations

import json

import pytest

from proxy.embedded import start_server

from table_helpers import GEN, TABLE_PATH, table_server_kinds  # noqa: E402


with open(TABLE_PATH) as _f:
    TABLE_TEXT = _f.read()
TABLE = json.loads(TABLE_TEXT)


server_kinds = table_server_kinds


@pytest.fixture(scope="module")
def servers():
    started = []
    try:
        for kind in server_kinds():
            started.append(start_server(kind))
        yield started
    finally:
        for s in started:
            s.stop()


def live_table(server):
    conn = GEN.raw_connection(server.host, server.port)
    try:
        return GEN.fetch_server_table(conn)
    finally:
        conn.disconnect()


def test_header():
    assert TABLE["generated_by"] == "scripts/gen_command_table.py"
    assert TABLE["servers"] and TABLE["servers"][0].startswith("valkey ")
    for name, entry in TABLE["commands"].items():
        assert name == name.lower()
        assert set(entry) >= {"arity", "flags", "group", "servers", "key_specs"}, name
        assert entry["flags"] == sorted(entry["flags"]), name
        assert entry["servers"] == sorted(entry["servers"]), name
        if "|" in name:
            container, sub = name.split("|", 1)
            assert sub in TABLE["commands"][container]["subcommands"], name


def test_live_keyed_commands_are_in_table(servers):
    commands = TABLE["commands"]
    problems = []
    for server in servers:
        kind, version, live = live_table(server)
        assert kind == server.kind
        for name, item in sorted(live.items()):
            if not item["key_specs"]:
                continue
            entry = commands.get(name)
            if entry is None:
                problems.append(f"{kind} {version}: keyed command {name!r} missing from the table")
                continue
            if kind not in entry["servers"]:
                problems.append(f"{kind} {version}: {name!r} not marked as served by {kind}")
            expected = entry.get("key_specs_by_server", {}).get(kind, entry["key_specs"])
            if item["key_specs"] != expected:
                problems.append(f"{kind} {version}: key_specs of {name!r} differ from the table: "
                                f"live {item['key_specs']} table {expected}")
    assert not problems, "regenerate with scripts/gen_command_table.py and review:\n" + "\n".join(problems)


def test_file_is_generator_output(servers):
    warnings = []
    built = GEN.build_table([f"redis://{s.host}:{s.port}" for s in servers], warn=warnings.append)
    assert sorted(built["commands"]) == sorted(TABLE["commands"])
    if built["servers"] == TABLE["servers"]:
        # Same server versions: the generator must reproduce the file byte for byte.
        assert GEN.render(built) == TABLE_TEXT
    # And rendering is deterministic.
    assert GEN.render(built) == GEN.render(json.loads(GEN.render(built)))
