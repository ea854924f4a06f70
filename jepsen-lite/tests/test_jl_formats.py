"""History records, the JSONL writer/reader, pairing rules and the Jepsen parsers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jepsen_lite.formats import FormatError, parse_edn, parse_file, parse_lines
from jepsen_lite.history import (
    HistoryError,
    HistoryWriter,
    Op,
    nemesis_intervals,
    pair_operations,
    read_history,
)
from jl_helpers import hist

# ------------------------------------------------------------------------ history


def test_op_json_round_trip() -> None:
    op = Op(812, 184233011, 7, "invoke", "cas", "r/17", [2, 4], node="n3")
    d = op.to_json()
    assert d == {
        "index": 812,
        "time": 184233011,
        "process": 7,
        "type": "invoke",
        "f": "cas",
        "key": "r/17",
        "value": [2, 4],
        "node": "n3",
    }
    assert Op.from_json(json.loads(json.dumps(d))) == op


@pytest.mark.parametrize(
    "bad",
    [
        {"time": 1, "process": 0, "type": "ok", "f": "read"},
        {"index": 1, "time": 1, "process": 0, "type": "done", "f": "read"},
        {"index": 1, "time": 1, "process": "client", "type": "ok", "f": "read"},
        {"index": "1", "time": 1, "process": 0, "type": "ok", "f": "read"},
    ],
)
def test_op_from_json_rejects_malformed(bad: dict[str, object]) -> None:
    with pytest.raises(HistoryError):
        Op.from_json(bad)


def test_writer_flushes_each_event_and_reader_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    clock = iter(range(100, 10_000, 100))
    w = HistoryWriter(path, workload="counter", clock=lambda: next(clock))
    a = w.record(3, "invoke", "incr", "c", 1, node="n1")
    # Flushed already: a reader sees the event before the writer is closed.
    assert read_history(path).ops == [a]
    b = w.record(3, "ok", "incr", "c", 1)
    n = w.record("nemesis", "info", "start-partition", value={"n1": ["n2", "n3"]})
    w.close()
    h = read_history(path)
    assert h.workload == "counter"
    assert h.meta["format"] == "jepsen-lite"
    assert h.ops == [a, b, n]
    assert [o.index for o in h.ops] == [0, 1, 2]
    assert h.ops[0].time == 100 and h.ops[2].is_nemesis


def test_reader_ignores_a_torn_last_line_only(tmp_path: Path) -> None:
    good = json.dumps(Op(0, 1, 0, "invoke", "read", "k").to_json())
    torn = tmp_path / "torn.jsonl"
    torn.write_text(good + "\n" + '{"index":1,"ti')
    assert len(read_history(torn).ops) == 1
    middle = tmp_path / "middle.jsonl"
    middle.write_text(good + "\n" + '{"index":1,"ti\n' + good + "\n")
    with pytest.raises(HistoryError, match=":2:"):
        read_history(middle)


def test_pairing_rules() -> None:
    h = hist(
        (0, "invoke", "write", 1),
        (0, "ok", "write", 1),  # ok: kept, closed
        (1, "invoke", "write", 2),
        (1, "fail", "write", 2),  # fail: dropped
        (2, "invoke", "write", 3),
        (2, "info", "write", 3),  # info: open to the end
        (3, "invoke", "read", None),
        (3, "info", "read", None),  # crashed read: dropped
        ("nemesis", "info", "start-partition", None),  # ignored
        (4, "invoke", "cas", [1, 2]),  # never completed: open
    )
    ops = pair_operations(h)
    assert [(o.id, o.ret is None) for o in ops] == [(0, False), (4, True), (9, True)]
    assert ops[0].output == 1 and ops[0].call == 0 and ops[0].ret == 10
    kept = pair_operations(h, drop_crashed_reads=False)
    assert [o.id for o in kept] == [0, 4, 6, 9]


def test_pairing_rejects_completion_before_invocation() -> None:
    h = [Op(0, 100, 0, "invoke", "read", None), Op(1, 50, 0, "ok", "read", None, 1)]
    with pytest.raises(HistoryError, match="before its invocation"):
        pair_operations(h)


@pytest.mark.parametrize(
    ("events", "msg"),
    [
        ([(0, "ok", "read", 1)], "no invocation"),
        ([(0, "invoke", "read", None), (0, "invoke", "read", None)], "still pending"),
        ([(0, "invoke", "read", None), (0, "ok", "write", 1)], "does not match"),
    ],
)
def test_pairing_rejects_malformed_histories(events: list[tuple[object, ...]], msg: str) -> None:
    with pytest.raises(HistoryError, match=msg):
        pair_operations(hist(*events))


def test_nemesis_intervals_pair_start_and_stop() -> None:
    h = hist(
        ("nemesis", "invoke", "start-partition", None),
        ("nemesis", "info", "start-partition", {"n1": ["n2"]}),
        ("nemesis", "info", "kill", "n2"),
        ("nemesis", "info", "stop-partition", None),
        ("nemesis", "info", "start-pause", "n3"),
    )
    iv = nemesis_intervals(h)
    assert [(i.name, i.start, i.stop) for i in iv] == [
        ("partition", 10, 30),
        ("kill", 20, 20),
        ("pause", 40, None),
    ]


# ------------------------------------------------------------------------- etcd log


def test_etcd_log_line_variants() -> None:
    lines = [
        "2015-01-01 some unrelated log line",
        "INFO  jepsen.util - 0\t:invoke\t:read\tnil",
        "INFO  jepsen.util - 0\t:ok\t:read\tnil",
        "INFO  jepsen.util - 1   :invoke :cas    [1 4]",
        "INFO  jepsen.util - 1   :fail   :cas    [1 4]",
        "INFO  jepsen.util - 2  :invoke :write  3",
        "INFO  jepsen.util - 2  :info   :write  :timed-out",
        "INFO  jepsen.util - 3\t:invoke\t:read\tnil",
        "INFO  jepsen.util - 3\t:fail\t:read\t:timed-out",
    ]
    p = parse_lines(lines, "jepsen-etcd-log")
    assert p.model == "register"
    got = [(o.process, o.type, o.f, o.value, o.error) for o in p.ops]
    assert got == [
        (0, "invoke", "read", None, None),
        (0, "ok", "read", None, None),
        (1, "invoke", "cas", [1, 4], None),
        (1, "fail", "cas", [1, 4], None),
        (2, "invoke", "write", 3, None),
        (2, "info", "write", None, "timed-out"),
        (3, "invoke", "read", None, None),
        (3, "info", "read", None, "timed-out"),  # :fail + :timed-out is indeterminate
    ]
    assert [o.time for o in p.ops] == list(range(8))
    # The crashed write stays (with its invocation's value); the timed-out read goes.
    ops = pair_operations(p.ops)
    assert [(o.f, o.value, o.crashed) for o in ops] == [("read", None, False), ("write", 3, True)]


@pytest.mark.parametrize(
    "line",
    ["INFO  jepsen.util - 0\t:invoke\t:cas\t[1 x]", "INFO  jepsen.util - 0\t:done\t:read\tnil"],
)
def test_etcd_log_rejects_garbled_op_lines(line: str) -> None:
    with pytest.raises(FormatError, match=":2:"):
        parse_lines(["INFO  jepsen.util - 0\t:invoke\t:read\tnil", line], "jepsen-etcd-log", "f")


def test_etcd_log_without_ops_is_an_error() -> None:
    with pytest.raises(FormatError, match="no Jepsen operation"):
        parse_lines(["hello"], "jepsen-etcd-log")


# --------------------------------------------------------------------------- edn kv


def test_edn_reader() -> None:
    assert parse_edn('{:process 0, :type :invoke, :f :append, :key "0", :value "x 0 0 y"}') == {
        "process": 0,
        "type": "invoke",
        "f": "append",
        "key": "0",
        "value": "x 0 0 y",
    }
    assert parse_edn('{:a nil :b true :c -1.5 :d [1 "two" :three] :e "q\\"uote\\\\"}') == {
        "a": None,
        "b": True,
        "c": -1.5,
        "d": [1, "two", "three"],
        "e": 'q"uote\\',
    }
    for bad in ["{:a 1", '{:a "x}', "{:a 1} extra", "{:a #inst}", "{[1] 2}"]:
        with pytest.raises(ValueError):
            parse_edn(bad)


def test_edn_kv_parser() -> None:
    lines = [
        '{:process 0, :type :invoke, :f :get, :key "3", :value nil}',
        "",
        '{:process 0, :type :ok, :f :get, :key "3", :value ""}',
    ]
    p = parse_lines(lines, "jepsen-edn-kv")
    assert p.model == "kv"
    assert [(o.index, o.process, o.type, o.f, o.key, o.value) for o in p.ops] == [
        (0, 0, "invoke", "get", "3", None),
        (1, 0, "ok", "get", "3", ""),
    ]
    with pytest.raises(FormatError, match=":1:"):
        parse_lines(["{:process 0, :type :wat, :f :get}"], "jepsen-edn-kv", "f")
    with pytest.raises(FormatError, match=":1:"):
        parse_lines(["{:type :ok, :f :get}"], "jepsen-edn-kv", "f")


# ---------------------------------------------------------------------- jepsen-lite


def test_jepsen_lite_format_picks_model_from_workload(tmp_path: Path) -> None:
    path = tmp_path / "ttl.jsonl"
    with HistoryWriter(path, workload="ttl", meta={"model_params": {"epsilon_ms": 3}}) as w:
        w.record(0, "invoke", "write", "k", {"value": 1, "ttl_ms": 10})
    p = parse_file(path, "jepsen-lite")
    assert (p.model, p.model_params) == ("ttl", {"epsilon_ms": 3})
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps(Op(0, 0, 0, "invoke", "read", "k").to_json()) + "\n")
    assert parse_file(plain, "jepsen-lite").model == "register"
    weird = tmp_path / "weird.jsonl"
    weird.write_text('{"format":"jepsen-lite","workload":"bank"}\n')
    with pytest.raises(FormatError, match="bank"):
        parse_file(weird, "jepsen-lite")


def test_unknown_format() -> None:
    with pytest.raises(FormatError):
        parse_lines([], "csv")
