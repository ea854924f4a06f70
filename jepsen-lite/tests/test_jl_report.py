"""The timeline.html report: structure, colours by outcome, violation markers."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

from jepsen_lite.checker import check_history
from jepsen_lite.report import render_timeline, write_timeline
from jl_helpers import hist


class _Collector(HTMLParser):
    """Collects (tag, attrs) for every start tag, plus the text of <title>-less page."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.stack: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def with_class(self, cls: str, tag: str | None = None) -> list[dict[str, str]]:
        return [
            a
            for t, a in self.elements
            if cls in a.get("class", "").split() and (tag is None or t == tag)
        ]


def _history() -> list:  # type: ignore[type-arg]
    return hist(
        (0, "invoke", "write", 1, "a"),
        (0, "ok", "write", 1, "a"),  # 0
        ("nemesis", "info", "start-partition", {"n1": ["n2", "n3"]}),  # 2
        (1, "invoke", "write", 2, "a"),
        (1, "ok", "write", 2, "a"),  # 3
        (2, "invoke", "cas", [5, 6], "a"),
        (2, "fail", "cas", [5, 6], "a"),  # 5
        (3, "invoke", "write", 9, "b"),
        (3, "info", "write", 9, "b"),  # 7
        (0, "invoke", "read", None, "a"),
        (0, "ok", "read", 1, "a"),  # 9: stale
        ("nemesis", "info", "stop-partition", None),  # 11
        (4, "invoke", "read", None, "b"),
        (4, "ok", "read", 9, "b"),  # 12
    )


def test_timeline_structure(tmp_path: Path) -> None:
    ops = _history()
    result = check_history(ops, "register", all_keys=True)
    assert result.valid is False
    out = tmp_path / "timeline.html"
    write_timeline(out, ops, result, "register <test>")
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # Self-contained: no external scripts, styles or images.
    assert (
        "src=" not in page
        and "<link" not in page
        and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )
    p = _Collector()
    p.feed(page)

    lanes = [a["data-process"] for t, a in p.elements if t == "g" and "lane" in a.get("class", "")]
    assert lanes == ["0", "1", "2", "3", "4"]

    bars = {int(a["data-op-id"]): a for a in p.with_class("op", "rect")}
    assert set(bars) == {0, 3, 5, 7, 9, 12}
    assert {i: a["data-outcome"] for i, a in bars.items()} == {
        0: "ok",
        3: "ok",
        5: "fail",
        7: "info",
        9: "ok",
        12: "ok",
    }
    assert bars[7]["data-key"] == "b" and bars[0]["data-key"] == "a"
    # The crashed op runs to the end of the history.
    end = max(float(a["x"]) + float(a["width"]) for a in bars.values())
    assert abs(float(bars[7]["x"]) + float(bars[7]["width"]) - end) < 1.0

    (nem,) = p.with_class("nemesis", "rect")
    assert nem["data-f"] == "partition"
    assert float(nem["x"]) < float(bars[3]["x"]) and float(nem["x"]) + float(nem["width"]) > float(
        bars[9]["x"]
    )

    (kr,) = result.failures
    lin = {
        int(a["data-op-id"]): int(a["data-lin-order"]) for a in p.with_class("linearized", "rect")
    }
    assert lin == {oid: n for n, oid in enumerate(kr.prefix, 1)}
    assert lin == {0: 1, 3: 2}
    (stuck,) = p.with_class("stuck", "rect")
    assert stuck["data-op-id"] == "9"
    (marker,) = p.with_class("stuck-marker")
    assert marker["data-op-id"] == "9"
    (section,) = p.with_class("violation", "section")
    assert section["data-key"] == "a"
    assert [a["data-op-id"] for a in p.with_class("prefix-op")] == ["0", "3"]
    assert "register &lt;test&gt;" in page  # title escaped
    text = "".join(p.text)
    assert "NOT linearizable" in text and "cannot be linearized" in text


def test_timeline_without_results_and_with_valid_history() -> None:
    ops = hist((0, "invoke", "write", 1), (0, "ok", "write", 1))
    page = render_timeline(ops, None, "unchecked")
    assert "unchecked" in page and 'class="op ok"' in page
    page = render_timeline(ops, check_history(ops, "register"), "valid")
    p = _Collector()
    p.feed(page)
    assert not p.with_class("stuck") and not p.with_class("violation")
    assert "linearizable" in "".join(p.text)
