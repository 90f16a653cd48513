"""Matchlock's own Python examples (github.com/jingkaihe/matchlock, examples/python), run against
our binary with the published SDK. They are changed only where a test machine must differ:
local images under the upstream names (conftest.py imports them) and loopback servers standing
in for the internet.
"""

import base64
import hashlib
import http.server
import logging
import socket
import socketserver
import threading
import time

from matchlock import (
    VFS_HOOK_ACTION_BLOCK,
    VFS_HOOK_OP_CREATE,
    VFS_HOOK_OP_WRITE,
    VFS_HOOK_PHASE_AFTER,
    VFS_HOOK_PHASE_BEFORE,
    Client,
    NetworkBodyTransform,
    NetworkHookRequest,
    NetworkHookRequestMutation,
    NetworkHookResult,
    NetworkHookRule,
    NetworkInterceptionConfig,
    Sandbox,
    VFSActionRequest,
    VFSHookEvent,
    VFSHookRule,
    VFSInterceptionConfig,
    VFSMutateRequest,
)

log = logging.getLogger(__name__)


def test_vfs_hooks_example_on_a_memory_workspace():
    """examples/python/vfs_hooks/main.py: host-side block on a memory mount, SDK-local block and
    mutate hooks, and an after-hook fed by the server's events."""
    events = []

    def after_write_hook(event: VFSHookEvent) -> None:
        events.append((event.op, event.path, event.size, event.mode, event.uid, event.gid))

    def mutate_write_hook(req: VFSMutateRequest) -> bytes:
        return (
            f"mutated-by-hook size={req.size} "
            f"mode={oct(req.mode)} uid={req.uid} gid={req.gid}"
        ).encode("utf-8")

    def block_action_hook(req: VFSActionRequest) -> str:
        return VFS_HOOK_ACTION_BLOCK

    sandbox = Sandbox("alpine:latest").with_workspace("/workspace").mount_memory("/workspace").with_vfs_interception(
        VFSInterceptionConfig(
            rules=[
                VFSHookRule(
                    name="host-block-create",
                    phase=VFS_HOOK_PHASE_BEFORE,
                    ops=[VFS_HOOK_OP_CREATE],
                    path="/workspace/blocked-create.txt",
                    action=VFS_HOOK_ACTION_BLOCK,
                ),
                VFSHookRule(
                    name="sdk-block-write",
                    phase=VFS_HOOK_PHASE_BEFORE,
                    ops=[VFS_HOOK_OP_WRITE],
                    path="/workspace/blocked-write.txt",
                    action_hook=block_action_hook,
                ),
                VFSHookRule(
                    name="mutate-write",
                    phase=VFS_HOOK_PHASE_BEFORE,
                    ops=[VFS_HOOK_OP_WRITE],
                    path="/workspace/mutated.txt",
                    mutate_hook=mutate_write_hook,
                ),
                VFSHookRule(
                    name="audit-after-write",
                    phase=VFS_HOOK_PHASE_AFTER,
                    ops=[VFS_HOOK_OP_WRITE],
                    path="/workspace/*",
                    timeout_ms=2000,
                    hook=after_write_hook,
                ),
            ],
        )
    )

    with Client() as client:
        client.launch(sandbox)
        # The host refuses the create on the memory mount (it used to be a guest tmpfs the
        # rules never saw), for write_file as for the guest's own programs.
        try:
            client.write_file("/workspace/blocked-create.txt", "blocked")
            raise AssertionError("host create block unexpectedly succeeded")
        except Exception as exc:  # noqa: BLE001
            assert "not permitted" in str(exc), exc
        r = client.exec("echo x > /workspace/blocked-create.txt")
        assert r.exit_code != 0 and "not permitted" in r.stderr, r
        try:
            client.write_file("/workspace/blocked-write.txt", "blocked")
            raise AssertionError("local write block unexpectedly succeeded")
        except Exception as exc:  # noqa: BLE001
            assert "blocked" in str(exc), exc

        client.write_file("/workspace/mutated.txt", "original-content", mode=0o640)
        mutated = client.read_file("/workspace/mutated.txt").decode("utf-8", errors="replace")
        assert mutated.startswith("mutated-by-hook size=16 mode=0o640"), mutated

        client.write_file("/workspace/trigger.txt", "trigger", mode=0o600)
        deadline = time.time() + 20
        while time.time() < deadline and not any(e[1] == "/workspace/trigger.txt" for e in events):
            time.sleep(0.1)
        ls = client.exec("ls -a /workspace").stdout.split()
        client.close()
        client.remove()
    # The event names the file the caller wrote (never a temporary name) with its mode and owner.
    trig = [e for e in events if e[1] == "/workspace/trigger.txt"]
    assert trig and trig[0][:3] == ("write", "/workspace/trigger.txt", 7), events
    assert trig[0][3] & 0o7777 == 0o600 and trig[0][4:] == (0, 0), events
    assert not any(".mltmp" in e[1] for e in events), events
    assert "blocked-create.txt" not in ls and not any(".mltmp" in n for n in ls), ls


def test_overlay_and_memory_mounts_are_watched_like_host_dirs(tmp_path):
    """Block rules and events on an overlay mount (served from a private copy when watched):
    the guest's writes are checked and reported, and never reach the user's files."""
    (tmp_path / "keep.txt").write_text("original\n")
    seen = []
    got = threading.Event()

    def hook(event):
        seen.append((event.op, event.path))
        if event.path == "/workspace/snap/new.txt":
            got.set()

    rules = VFSInterceptionConfig(rules=[
        VFSHookRule(name="no-locks", action="block", ops=["create"], path="/workspace/snap/*.lock"),
        VFSHookRule(name="audit", phase="after", ops=["write"], path="/workspace/snap/*", hook=hook),
    ])
    sb = (Sandbox("alpine:latest").with_workspace("/workspace")
          .mount_memory("/workspace")
          .mount_overlay("/workspace/snap", str(tmp_path))
          .with_vfs_interception(rules))
    with Client() as c:
        c.create(sb.options())
        assert c.exec("cat /workspace/snap/keep.txt").stdout == "original\n"
        r = c.exec("touch /workspace/snap/a.lock")
        assert r.exit_code != 0 and "not permitted" in r.stderr, r
        assert c.exec("echo changed > /workspace/snap/keep.txt; echo n > /workspace/snap/new.txt").exit_code == 0
        assert c.exec("cat /workspace/snap/keep.txt").stdout == "changed\n"
        assert got.wait(20), seen
        # A non-root guest user owns what it creates in a memory mount (as in a tmpfs).
        r = c.exec("mkdir -m 777 /workspace/t && su -s /bin/sh nobody -c 'echo hi > /workspace/t/f && stat -c %U /workspace/t/f'")
        assert r.stdout.strip() == "nobody", r
        # The memory mount is capped (at the sandbox's memory): filling it fails cleanly.
        r = c.exec("dd if=/dev/zero of=/workspace/fill bs=1M count=2000 2>&1; df -m /workspace | tail -1")
        assert "No space left on device" in r.stdout, r.stdout
    assert ("write", "/workspace/snap/new.txt") in seen, seen
    # The user's files are untouched.
    assert (tmp_path / "keep.txt").read_text() == "original\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


class _Upstream(http.server.ThreadingHTTPServer):
    daemon_threads = True


def _serve(handler):
    srv = _Upstream(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_network_interception_example_with_hooks_and_no_allow_list():
    """examples/python/network_interception/main.py with a loopback stand-in for the API: a
    before-hook injects the key and no allow-list is given, which allows every host (the
    seed's hook example), while hooks still run."""
    got = {}

    class API(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            got[self.path] = self.headers.get("X-Api-Key")
            body = b'{"content":[{"type":"text","text":"TCP is a protocol"}]}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = _serve(API)
    port = srv.server_address[1]
    api_key = "sk-ant-test-0123456789"

    def before_hook(req: NetworkHookRequest) -> NetworkHookResult:
        headers = {key: list(values) for key, values in (req.request_headers or {}).items()}
        headers["X-Api-Key"] = [api_key]
        return NetworkHookResult(action="mutate", request=NetworkHookRequestMutation(headers=headers))

    sandbox = (
        Sandbox("python:3.12-alpine")
        .allow_private_ips()
        .add_host("api.anthropic.test", "127.0.0.1")
        .add_host("other.test", "127.0.0.1")
        .with_network_interception(
            NetworkInterceptionConfig(
                rules=[
                    NetworkHookRule(
                        name="inject-anthropic-api-key",
                        phase="before",
                        hosts=["api.anthropic.test"],
                        hook=before_hook,
                    )
                ]
            )
        )
    )
    script = (
        "import urllib.request\n"
        f"r = urllib.request.urlopen(urllib.request.Request('http://api.anthropic.test:{port}/v1/messages', data=b'{{}}', method='POST'), timeout=20)\n"
        "print(r.status, r.read().decode())\n"
        f"r = urllib.request.urlopen(urllib.request.Request('http://other.test:{port}/x', data=b'{{}}', method='POST'), timeout=20)\n"
        "print(r.status)\n"
    )
    try:
        with Client() as client:
            client.launch(sandbox)
            version = client.exec("python3 --version")
            assert version.stdout.startswith("Python 3"), version
            client.write_file("/ask.py", script)
            out = client.exec("python3 /ask.py")
    finally:
        srv.shutdown()
    assert out.exit_code == 0, out.stderr
    assert out.stdout.splitlines() == ['200 {"content":[{"type":"text","text":"TCP is a protocol"}]}', "200"], out.stdout
    # The hook ran for its host only.
    assert got == {"/v1/messages": api_key, "/x": None}, got


def test_sse_replacements_and_websockets_through_the_sdk_rules():
    """SSE body replacements touch only data: payloads and stream; a WebSocket upgrade goes
    through interception and becomes a tunnel."""

    class SSE(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in [b"event: foo\nid: foo-1\ndata: one foo\n\n", b": foo comment\ndata: two foo\n\n"]:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.flush()
                time.sleep(0.3)
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *a):
            pass

    class WS(socketserver.StreamRequestHandler):
        def handle(self):
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                ch = self.rfile.read(1)
                if not ch:
                    return
                head += ch
            key = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")][0]
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            self.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            while True:
                data = self.request.recv(4096)
                if not data:
                    return
                self.request.sendall(data[::-1])

    sse = _serve(SSE)
    ws = socketserver.ThreadingTCPServer(("127.0.0.1", 0), WS)
    ws.daemon_threads = True
    threading.Thread(target=ws.serve_forever, daemon=True).start()
    sse_port, ws_port = sse.server_address[1], ws.server_address[1]
    sandbox = (
        Sandbox("python:3.12-alpine")
        .allow_private_ips()
        .add_host("stream.test", "127.0.0.1")
        .allow_host("stream.test")
        .with_network_interception(
            NetworkInterceptionConfig(
                rules=[
                    NetworkHookRule(
                        phase="after",
                        hosts=["stream.test"],
                        body_replacements=[NetworkBodyTransform(find="foo", replace="bar")],
                    )
                ]
            )
        )
    )
    script = (
        "import socket, urllib.request, time\n"
        f"r = urllib.request.urlopen('http://stream.test:{sse_port}/events', timeout=20)\n"
        "first = r.readline() + r.readline() + r.readline() + r.readline()\n"
        "rest = r.read()\n"
        "print(repr(first.decode()), repr(rest.decode()))\n"
        f"s = socket.create_connection(('stream.test', {ws_port}), timeout=20)\n"
        f"s.sendall(b'GET /ws HTTP/1.1\\r\\nHost: stream.test:{ws_port}\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\nSec-WebSocket-Version: 13\\r\\n\\r\\n')\n"
        "head = b''\n"
        "while not head.endswith(b'\\r\\n\\r\\n'): head += s.recv(1)\n"
        "s.sendall(b'ping-frame')\n"
        "print(head.split(b'\\r\\n')[0].decode(), s.recv(100).decode())\n"
    )
    try:
        with Client() as client:
            client.launch(sandbox)
            client.write_file("/t.py", script)
            out = client.exec("python3 /t.py")
    finally:
        sse.shutdown()
        ws.shutdown()
    assert out.exit_code == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "'event: foo\\nid: foo-1\\ndata: one bar\\n\\n' ': foo comment\\ndata: two bar\\n\\n'", out.stdout
    assert lines[1] == "HTTP/1.1 101 Switching Protocols emarf-gnip", out.stdout
