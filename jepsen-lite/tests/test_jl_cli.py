"""The jepsen-lite command line, run in-process through main(argv, env)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jepsen_lite import cli
from jepsen_lite.cli import ExitStatus, main
from jepsen_lite.history import HistoryWriter, Op
from jl_helpers import hist

ENV: dict[str, str] = {"NO_COLOR": "1", "COLUMNS": "200"}


def _write(path: Path, ops: list[Op], workload: str = "register") -> Path:
    with HistoryWriter(path, workload=workload) as w:
        for op in ops:
            w.write(op)
    return path


@pytest.fixture
def valid_file(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "valid.jsonl",
        hist(
            (0, "invoke", "write", 1, "k"),
            (0, "ok", "write", 1, "k"),
            (1, "invoke", "read", None, "k"),
            (1, "ok", "read", 1, "k"),
        ),
    )


@pytest.fixture
def invalid_file(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "invalid.jsonl",
        hist(
            (0, "invoke", "write", 1, "k"),
            (0, "ok", "write", 1, "k"),
            (0, "invoke", "write", 2, "k"),
            (0, "ok", "write", 2, "k"),
            (1, "invoke", "read", None, "k"),
            (1, "ok", "read", 1, "k"),
        ),
    )


@pytest.fixture
def hard_file(tmp_path: Path) -> Path:
    evs: list[tuple[Any, ...]] = [(p, "invoke", "write", p) for p in range(16)]
    evs += [(p, "info", "write", p) for p in range(16)]
    evs += [(99, "invoke", "read", None), (99, "ok", "read", 12345)]
    return _write(tmp_path / "hard.jsonl", hist(*evs, key="k"))


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict[str, Any], str]:
    code = main(argv, env=ENV)
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def test_valid_exits_0_with_json_shape(
    capsys: pytest.CaptureFixture[str], valid_file: Path
) -> None:
    code, doc, err = _json(capsys, ["check", "--format", "jepsen-lite", "--json", str(valid_file)])
    assert code == ExitStatus.VALID and code == 0 and err == ""
    (f,) = doc["files"]
    assert f["file"] == str(valid_file)
    assert f["valid"] is True
    assert isinstance(f["seconds"], float)
    assert f["model"] == "register" and f["ops"] == 2 and f["keys"] == 1
    assert f["results"][0]["key"] == "k"
    assert doc["valid"] is True and doc["exit"] == 0


def test_violation_exits_1_with_failure_details(
    capsys: pytest.CaptureFixture[str], invalid_file: Path, valid_file: Path
) -> None:
    code, doc, _ = _json(
        capsys, ["check", "--format", "jepsen-lite", "--json", str(valid_file), str(invalid_file)]
    )
    assert code == 1
    assert [f["valid"] for f in doc["files"]] == [True, False]
    (fail,) = doc["files"][1]["failures"]
    assert fail["key"] == "k" and fail["prefix"] == [0, 2] and fail["stuck"] == 4
    assert fail["stuck_op"] == "read() -> 1" and fail["state"] == "2"
    assert doc["valid"] is False


def test_budget_exhaustion_exits_2_with_null_verdict(
    capsys: pytest.CaptureFixture[str], hard_file: Path
) -> None:
    code, doc, _ = _json(
        capsys,
        ["check", "--format", "jepsen-lite", "--json", "--budget-steps", "5000", str(hard_file)],
    )
    assert code == 2
    (f,) = doc["files"]
    assert f["valid"] is None
    assert f["unknown_keys"] == ["k"]
    assert f["results"][0]["reason"] == "budget-steps"
    code, doc, _ = _json(
        capsys,
        ["check", "--format", "jepsen-lite", "--json", "--budget-memo", "1000", str(hard_file)],
    )
    assert code == 2 and doc["files"][0]["results"][0]["reason"] == "budget-memo"


def test_harness_errors_exit_3_with_one_line_and_no_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, valid_file: Path
) -> None:
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("not json\n{}\n")
    missing = tmp_path / "missing.jsonl"
    code, doc, err = _json(
        capsys,
        ["check", "--format", "jepsen-lite", "--json", str(valid_file), str(garbage), str(missing)],
    )
    assert code == 3
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in err
    assert str(garbage) in lines[0] and "invalid JSON" in lines[0]
    assert str(missing) in lines[1] and "No such file" in lines[1]
    assert [f["valid"] for f in doc["files"]] == [True, None, None]
    assert "error" in doc["files"][1] and "error" in doc["files"][2]


def test_violation_outranks_harness_error_and_unknown(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, invalid_file: Path, hard_file: Path
) -> None:
    code = main(
        [
            "check",
            "--format",
            "jepsen-lite",
            "--budget-steps",
            "100",
            str(hard_file),
            str(tmp_path / "nope"),
            str(invalid_file),
        ],
        env=ENV,
    )
    capsys.readouterr()
    assert code == 1
    code = main(
        [
            "check",
            "--format",
            "jepsen-lite",
            "--budget-steps",
            "100",
            str(hard_file),
            str(tmp_path / "nope"),
        ],
        env=ENV,
    )
    capsys.readouterr()
    assert code == 3


def test_model_errors_and_empty_histories_are_harness_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    frob = _write(tmp_path / "frob.jsonl", hist((0, "invoke", "frob", 1), (0, "ok", "frob", 1)))
    empty = _write(tmp_path / "empty.jsonl", [])
    for path in (frob, empty):
        assert main(["check", "--format", "jepsen-lite", str(path)], env=ENV) == 3
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(path) in err


def test_usage_errors_exit_3(capsys: pytest.CaptureFixture[str], valid_file: Path) -> None:
    assert main(["check", str(valid_file)], env=ENV) == 3  # --format missing
    assert "--format" in capsys.readouterr().err
    assert main(["check", "--format", "csv", str(valid_file)], env=ENV) == 3
    assert (
        main(["check", "--format", "jepsen-lite", "--budget-steps", "0", str(valid_file)], env=ENV)
        == 3
    )
    assert main([], env=ENV) == 3
    capsys.readouterr()
    assert main(["--help"], env=ENV) == 0
    assert "check" in capsys.readouterr().out


def test_model_override(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = _write(
        tmp_path / "c.jsonl",
        hist(
            (0, "invoke", "incr", 1, "c"),
            (0, "ok", "incr", 1, "c"),
            (0, "invoke", "incr", 1, "c"),
            (0, "ok", "incr", 3, "c"),
        ),
        workload="counter",
    )
    code, doc, _ = _json(capsys, ["check", "--format", "jepsen-lite", "--json", str(path)])
    assert code == 1 and doc["files"][0]["model"] == "counter"
    # As a register, "incr" is not an operation at all.
    assert (
        main(["check", "--format", "jepsen-lite", "--model", "register", str(path)], env=ENV) == 3
    )
    capsys.readouterr()


def test_table_output(
    capsys: pytest.CaptureFixture[str], valid_file: Path, invalid_file: Path
) -> None:
    code = main(["check", "--format", "jepsen-lite", str(valid_file), str(invalid_file)], env=ENV)
    out = capsys.readouterr().out
    assert code == 1
    assert "valid.jsonl" in out and "INVALID" in out and "valid" in out
    assert "read() -> 1" in out
    assert "2 files: 1 valid, 1 invalid, 0 unknown, 0 errors" in out


def test_html_output(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, valid_file: Path, invalid_file: Path
) -> None:
    single = tmp_path / "timeline.html"
    assert (
        main(
            ["check", "--format", "jepsen-lite", "--html", str(single), str(invalid_file)], env=ENV
        )
        == 1
    )
    assert 'class="op ok stuck"' in single.read_text()
    outdir = tmp_path / "reports"
    main(
        [
            "check",
            "--format",
            "jepsen-lite",
            "--html",
            str(outdir),
            str(valid_file),
            str(invalid_file),
        ],
        env=ENV,
    )
    assert sorted(p.name for p in outdir.iterdir()) == ["invalid.jsonl.html", "valid.jsonl.html"]
    capsys.readouterr()


def test_ctrl_c_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], valid_file: Path
) -> None:
    def interrupted(*_a: Any, **_k: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "check_history", interrupted)
    assert main(["check", "--format", "jepsen-lite", str(valid_file)], env=ENV) == 130
    assert "interrupted" in capsys.readouterr().err


def test_internal_errors_exit_3_without_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], valid_file: Path
) -> None:
    def boom(*_a: Any, **_k: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "check_history", boom)
    assert main(["check", "--format", "jepsen-lite", str(valid_file)], env=ENV) == 3
    err = capsys.readouterr().err
    assert "internal error" in err and "Traceback" not in err
    with pytest.raises(RuntimeError):
        main(
            ["check", "--format", "jepsen-lite", str(valid_file)],
            env={**ENV, "JEPSEN_LITE_DEBUG": "1"},
        )


def test_etcd_and_edn_formats(capsys: pytest.CaptureFixture[str], corpus: Path) -> None:
    code, doc, _ = _json(
        capsys,
        ["check", "--format", "jepsen-etcd-log", "--json", str(corpus / "etcd" / "etcd_002.log")],
    )
    assert code == 0 and doc["files"][0]["model"] == "register"
    code, doc, _ = _json(
        capsys,
        [
            "check",
            "--format",
            "jepsen-edn-kv",
            "--json",
            "--all-keys",
            "--workers",
            "2",
            str(corpus / "kv" / "c10-bad.txt"),
        ],
    )
    assert code == 1
    assert len(doc["files"][0]["invalid_keys"]) > 1 and doc["files"][0]["skipped_keys"] == []


def test_console_script_entrypoint(valid_file: Path) -> None:
    """The real process: exit status is what main returned."""
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from jepsen_lite.cli import entrypoint; entrypoint()",
            "check",
            "--format",
            "jepsen-lite",
            "--json",
            str(valid_file),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["files"][0]["valid"] is True
