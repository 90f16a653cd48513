"""`matchlock ingress` end to end with real clients: curl over HTTP/1.1 and h2 (prior knowledge),
and the `websockets` library, against a web app in a real sandbox."""

import pathlib
import shutil
import subprocess
import time

import pytest
import websockets.exceptions
import websockets.sync.client

from conftest import BIN, PYTHON, ml

APP = pathlib.Path(__file__).with_name("ingress_app.py")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A sandbox running ingress_app.py on its port 8000."""
    srv = tmp_path_factory.mktemp("srv")
    shutil.copy(APP, srv / "app.py")
    vm = ml("run", "-d", "--image", PYTHON, "-v", f"{srv}:/srv", "--",
            "python3", "/srv/app.py").stdout.strip()
    yield vm
    ml("kill", vm, check=False)
    ml("rm", vm, check=False)


def gateway(vm, *flags):
    """Starts `matchlock ingress` and returns (process, base URL) once it listens."""
    p = subprocess.Popen([BIN, "ingress", vm, *flags], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    url = p.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:"), (url, p.stderr.read() if p.poll() is not None else "")
    return p, url


def curl(*args):
    out = subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True, text=True)
    return out.stdout


def wait_for_app(url):
    for _ in range(200):
        if curl(f"{url}/hello").startswith("app /hello"):
            return
        time.sleep(0.1)
    raise AssertionError(curl("-i", f"{url}/hello"))


def test_http1_h2_closed_port_and_routes(app):
    p, url = gateway(app, "--route", "/=8000", "--route", "/api=8000,strip",
                     "--route", "/closed=8001")
    try:
        wait_for_app(url)
        assert curl(f"{url}/hello?x=1") == "app /hello?x=1 via http\n"
        assert curl(f"{url}/api/users") == "app /users via http\n"
        # h2 with prior knowledge: the answer is HTTP/2.
        out = curl("--http2-prior-knowledge", "-w", "%{http_version}", f"{url}/api/h2")
        assert out == "app /h2 via http\n2", out
        # A route to a port nothing listens on: 502 with the guest's reason.
        out = curl("-w", "%{http_code}", f"{url}/closed/x")
        assert out.endswith("502") and "127.0.0.1:8001" in out and "refused" in out, out
        # The routes are in the sandbox, where `--routes` reads them.
        listed = ml("ingress", app, "--routes").stdout
        assert listed.splitlines() == ["/ -> :8000", "/api -> :8000 (prefix stripped)",
                                       "/closed -> :8001"], listed
    finally:
        p.terminate()
        assert p.wait(10) == 0


def test_websockets_pass_through_unless_refused(app):
    p, url = gateway(app, "--route", "/=8000")
    try:
        wait_for_app(url)
        ws_url = url.replace("http://", "ws://") + "/ws"
        with websockets.sync.client.connect(ws_url, open_timeout=20) as ws:
            ws.send("hello through ingress")
            assert ws.recv(timeout=20) == "HELLO THROUGH INGRESS"
            big = "x" * 200_000
            ws.send(big)
            assert ws.recv(timeout=20) == big.upper()
    finally:
        p.terminate()
        p.wait(10)
    # Without --route the gateway uses the routes the sandbox already has.
    p, url = gateway(app, "--no-websockets")
    try:
        wait_for_app(url)
        with pytest.raises(websockets.exceptions.InvalidStatus) as e:
            websockets.sync.client.connect(url.replace("http://", "ws://") + "/ws", open_timeout=20)
        assert e.value.response.status_code == 403
    finally:
        p.terminate()
        p.wait(10)
