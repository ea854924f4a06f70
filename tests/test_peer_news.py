"""A node's news for its Raft peers (GroupHost.tell_peers), on real hosts
with real loopback links in one process: what one node says reaches the
peers it has links to, again when a link comes back and every second (a
frame dropped on a blocked link fires no event), and a peer whose link
goes down is reported as saying nothing any more.  What the node says
with it (its disk): tests/test_disk_space.py and tests/test_disk_full.py."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _nodes import wait_for

from cachenode.raft.host import GroupHost, PeerNewsFn
from cachenode.storage.lmdb_store import LmdbStorage

IDS = ("a", "b", "c")


class Heard:
    """What one host's ``on_peer_news`` was called with (driver thread)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any] | None]] = []
        self._lock = threading.Lock()

    def __call__(self, node: str, news: dict[str, Any] | None) -> None:
        with self._lock:
            self.calls.append((node, news))

    def last_from(self, node: str) -> Any:
        with self._lock:
            said = [news for n, news in self.calls if n == node]
        return said[-1] if said else "nothing"

    def count_from(self, node: str, news: dict[str, Any]) -> int:
        with self._lock:
            return sum(1 for n, said in self.calls if n == node and said == news)


@contextlib.contextmanager
def hosts(root: Path, listeners: dict[str, PeerNewsFn] | None = None,
          fatal: list[BaseException] | None = None, period_s: float = 1.0,
          ) -> Iterator[tuple[dict[str, GroupHost], dict[str, Heard]]]:
    """Three hosts, each wanting a link to the other two; ``listeners``
    replace a host's Heard; what stops a driver goes into ``fatal``;
    ``period_s``: how often each says its news again."""
    heard = {nid: Heard() for nid in IDS}
    hs: dict[str, GroupHost] = {}
    stopped = fatal if fatal is not None else []
    try:
        for nid in IDS:
            (root / nid).mkdir()
            hs[nid] = GroupHost(nid, LmdbStorage(str(root / nid / "db"), map_size=1 << 24, fsync=False),
                                "127.0.0.1:0", b"secret", str(root / nid), on_fatal=stopped.append,
                                on_peer_news=(listeners or {}).get(nid, heard[nid]), news_period_s=period_s)
        for h in hs.values():
            for nid, other in hs.items():
                if other is not h:
                    h.mux.set_address(nid, other.mux.listen_address)
                    h.want_peer(nid)  # as a group with a replica there does
        yield hs, heard
    finally:
        for h in hs.values():
            if h.stop():  # else its driver still runs: leave its sockets and files to the process's end
                h.mux.close()
                h.storage.close()


def test_news_reaches_every_peer_once_the_links_are_up_and_the_latest_replaces_the_earlier(tmp_path: Path) -> None:
    with hosts(tmp_path) as (hs, heard):
        hs["a"].tell_peers({"disk": {"full": True}})  # before any link is up: said when each comes up
        for h in hs.values():
            h.start()
        wait_for(lambda: heard["b"].last_from("a") == {"disk": {"full": True}}
                 and heard["c"].last_from("a") == {"disk": {"full": True}}, what="b and c to hear a", timeout=10)
        assert heard["a"].last_from("a") == "nothing"  # a node does not tell itself
        hs["a"].tell_peers({"disk": {"full": False}})
        wait_for(lambda: heard["b"].last_from("a") == {"disk": {"full": False}}
                 and heard["c"].last_from("a") == {"disk": {"full": False}}, what="the new news", timeout=10)
        assert heard["b"].last_from("c") == "nothing"  # c said nothing: nothing is sent for it


def test_news_dropped_on_a_blocked_link_is_said_again_within_a_second_or_two(tmp_path: Path) -> None:
    with hosts(tmp_path) as (hs, heard):
        for h in hs.values():
            h.start()
        wait_for(lambda: all(h.mux.is_up(p) for n, h in hs.items() for p in IDS if p != n), what="links", timeout=10)

        def block(peers: set[str]) -> None:
            hs["a"].call(lambda: setattr(hs["a"].mux, "blocked", peers)).result(timeout=10)

        block({"b"})  # frames from a to b are dropped, and no link event fires
        hs["a"].tell_peers({"disk": {"full": True}})
        wait_for(lambda: heard["c"].last_from("a") == {"disk": {"full": True}}, what="c to hear a", timeout=10)
        assert heard["b"].last_from("a") == "nothing"
        block(set())
        wait_for(lambda: heard["b"].last_from("a") == {"disk": {"full": True}},
                 what="a's periodic news to reach b", timeout=5)
        # ... and it goes on being said, about once a second.
        before = heard["c"].count_from("a", {"disk": {"full": True}})
        wait_for(lambda: heard["c"].count_from("a", {"disk": {"full": True}}) >= before + 2,
                 what="two more periodic news", timeout=6)


def test_a_peer_whose_link_goes_down_is_reported_as_saying_nothing(tmp_path: Path) -> None:
    with hosts(tmp_path) as (hs, heard):
        for h in hs.values():
            h.start()
        hs["a"].tell_peers({"disk": {"full": True}})
        wait_for(lambda: heard["b"].last_from("a") == {"disk": {"full": True}}, what="b to hear a", timeout=10)
        hs["a"].stop()
        hs["a"].mux.close()
        wait_for(lambda: heard["b"].last_from("a") is None and heard["c"].last_from("a") is None,
                 what="b and c to see a's link go down", timeout=10)


def test_a_listener_that_raises_does_not_stop_the_driver(tmp_path: Path) -> None:
    raised: list[str] = []

    def broken(node: str, news: dict[str, Any] | None) -> None:
        raised.append(node)
        raise RuntimeError("a bug in the listener")

    fatal: list[BaseException] = []
    with hosts(tmp_path, listeners={"b": broken}, fatal=fatal) as (hs, heard):
        for h in hs.values():
            h.start()
        hs["a"].tell_peers({"x": 1})
        hs["c"].tell_peers({"y": 2})
        wait_for(lambda: heard["a"].last_from("c") == {"y": 2}, what="a to hear c", timeout=10)
        wait_for(lambda: {"a", "c"} <= set(raised), what="b's listener to be called", timeout=10)
        # b's driver survived the listener's errors: it still runs calls.
        assert hs["b"].call(lambda: 42).result(timeout=5) == 42
        assert fatal == []


def test_news_from_a_peer_our_link_to_is_not_up_waits_until_we_ask_for_it(tmp_path: Path) -> None:
    """b has no link of its own to a (it does not want one): a's news, sent
    on a's link, is not taken, since b could not forget it (forgetting
    happens when b's link goes down).  Once b's link comes up, b asks, and
    a answers at once: with news said again only every minute here, only
    the asking can deliver it in time."""
    with hosts(tmp_path, period_s=60.0) as (hs, heard):
        hs["b"].unwant_peer("a")  # before start: no link from b to a
        hs["a"].tell_peers({"disk": {"full": True}})
        for h in hs.values():
            h.start()
        wait_for(lambda: heard["c"].last_from("a") == {"disk": {"full": True}}, what="c to hear a", timeout=10)
        # b has read a's frame (news and a request for b's) and c's (a request):
        wait_for(lambda: hs["b"].mux.frames_in >= 2, what="b to read a's and c's first frames", timeout=10)
        hs["b"].call(lambda: None).result(timeout=5)  # ... and handled them: the driver has gone round since
        assert heard["b"].last_from("a") == "nothing"
        hs["b"].call(lambda: hs["b"].want_peer("a")).result(timeout=5)
        wait_for(lambda: heard["b"].last_from("a") == {"disk": {"full": True}},
                 what="b to ask a and hear its news", timeout=10)
