"""Before an update is planned onto vLLM instances, each targeted engine answers its health
check, or the update is refused (UNAVAILABLE) naming the dead ones; real HTTP on loopback:
a live server, a port nobody listens on (dead engine), a server that never answers (frozen)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ckpt_common.errors import Unavailable
from ckpt_daemon.engines.alive import check_engines
from ckpt_daemon.engines.trigger import EngineTrigger
from ckpt_daemon.model import Instance, InstanceKind, RankRef
from ckpt_daemon.registry.store import Registry


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *a: object) -> None:
        pass


def _inst(name: str, endpoint: str, node: str, kind: InstanceKind = InstanceKind.VLLM) -> Instance:
    return Instance(name=name, kind=kind, endpoint=endpoint, tp_size=1, ranks=[RankRef(node, 0)])


@pytest.fixture
def urls():
    live = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=live.serve_forever, daemon=True).start()
    frozen = socket.socket()  # accepts connections (the kernel does), never answers
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(8)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    yield {
        "live": f"http://127.0.0.1:{live.server_port}",
        "frozen": f"http://127.0.0.1:{frozen.getsockname()[1]}",
        "dead": f"http://127.0.0.1:{dead_port}",
    }
    live.shutdown()
    frozen.close()


@pytest.fixture
def alive(tmp_path):
    return EngineTrigger(Registry(str(tmp_path))).alive  # what ckptd's server passes


@pytest.mark.parametrize("which", ["dead", "frozen"])
def test_a_dead_or_frozen_engine_refuses_the_update(urls: dict, alive, which: str) -> None:
    insts = [_inst("ok", urls["live"], "a"), _inst("bad", urls[which], "b")]
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match=r"\['bad'\] do not answer"):
        asyncio.run(check_engines(insts, [RankRef("a", 0), RankRef("b", 0)], alive))
    assert time.monotonic() - t0 < 5


def test_untargeted_and_receiver_instances_are_not_checked(urls: dict, alive) -> None:
    insts = [
        _inst("ok", urls["live"], "a"),
        _inst("bad", urls["dead"], "b"),
        _inst("recv", "", "c", InstanceKind.RECEIVER),
    ]
    asyncio.run(check_engines(insts, [RankRef("a", 0), RankRef("c", 0)], alive))
    asyncio.run(check_engines(insts, [RankRef("b", 0)], None))
