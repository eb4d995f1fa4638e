"""``python -m benchmarks.clients`` (docs/server.md, Clients): the real openai, anthropic and openai-agents clients
(the ``test`` extra) against the server on the demo model, every call ok; a client that is not installed is a row
that says so, not a failure."""

from __future__ import annotations

import json

import pytest

import benchmarks.clients as clients
from tests.benchmarks.commands import run_module, succeeded

TESTED = ["openai", "anthropic", "agents"]


def test_the_test_extras_clients_all_pass(tmp_path):
    out = tmp_path / "clients.json"
    stdout = succeeded(run_module("benchmarks.clients", "--only", ",".join(TESTED), "--json", out))
    report = json.loads(out.read_text())
    expected = [(name, call) for name in TESTED for call, _ in clients.CLIENTS[name][1]]
    assert [(row["client"], row["call"]) for row in report["rows"]] == expected
    failed = [row for row in report["rows"] if row["result"] != "ok"]
    assert not failed and report["ok"] is True, failed
    assert all(row["seconds"] > 0 and row["detail"] for row in report["rows"])
    lines = stdout.strip().splitlines()
    assert len(lines) == 2 + len(expected) and len({len(line) for line in lines}) == 1, stdout  # aligned
    for line, (name, call) in zip(lines[2:], expected):
        assert [cell.strip() for cell in line.strip("|").split("|")][:3] == [name, call, "ok"]


def test_a_client_that_is_not_installed_is_a_row_not_a_failure(monkeypatch):
    def never(url: str) -> str:
        raise AssertionError("a missing client's call was made")

    monkeypatch.setitem(clients.CLIENTS, "missing", ("no_such_module_for_clients_test", [("call", never)]))
    rows = clients.run_clients("http://127.0.0.1:1/v1", ["missing"])
    assert [(r.client, r.call, r.result, r.seconds) for r in rows] == [
        ("missing", "call", "not installed", None)
    ]
    assert "| missing | call | not installed |" in clients.table(rows).replace("  ", "")


def test_a_failing_call_is_one_line_with_its_reason():
    def broken(url: str) -> str:
        raise ValueError("first line\nsecond line")

    row = clients.measure("x", "call", broken, "http://unused")
    assert row.result == "FAIL" and row.reason == "ValueError: first line second line"
    assert "FAIL: ValueError: first line second line" in clients.table([row])


def test_an_unknown_client_is_refused_in_one_line():
    with pytest.raises(SystemExit) as exit:
        clients.main(["--only", "openai,gpt"])
    assert exit.value.code == 2
    with pytest.raises(Exception, match="unknown client"):
        clients.client_names("gpt")
