"""The published Python SDK (matchlock==0.2.17) driving our `matchlock rpc`, method by method.

Nothing here is mocked: every test talks to real sandboxes (QEMU, the guest agent) through the
SDK's own subprocess and JSON-RPC code.
"""

import base64
import hashlib
import io
import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from matchlock import Client, CreateOptions, MatchlockError, RPCError, Sandbox
from matchlock.types import VFSHookRule, VFSInterceptionConfig

from conftest import BIN, BUSYBOX, ENTRY, PYTHON, ml


def wait_until(pred, limit=30.0):
    end = time.time() + limit
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.2)
    return pred()


def status(vm_id):
    for line in ml("list").stdout.splitlines():
        if line.startswith(vm_id):
            return line.split()[1]
    return ""


# ---- exec family (one shared sandbox) ----

def test_exec_result_fields(client):
    r = client.exec("echo hello; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr) == (3, "hello\n", "err\n")
    assert r.duration_ms >= 0
    assert client.exec("pwd", working_dir="/tmp").stdout == "/tmp\n"


def test_exec_stream_delivers_both_streams(client):
    out, err = io.StringIO(), io.StringIO()
    r = client.exec_stream("for i in 1 2 3; do echo $i; done; echo oops >&2; exit 5", stdout=out, stderr=err)
    assert r.exit_code == 5
    assert out.getvalue() == "1\n2\n3\n"
    assert err.getvalue() == "oops\n"


def test_exec_pipe_binary_stdin(client):
    data = os.urandom(3 << 20)
    out = io.StringIO()
    r = client.exec_pipe("sha256sum", stdin=io.BytesIO(data), stdout=out)
    assert r.exit_code == 0
    assert out.getvalue().split()[0] == hashlib.sha256(data).hexdigest()
    # No stdin at all: the SDK sends EOF at once and the command sees an empty input.
    out = io.StringIO()
    assert client.exec_pipe("wc -c", stdout=out).exit_code == 0
    assert out.getvalue().strip() == "0"


def test_exec_interactive_has_a_terminal(client):
    out = io.StringIO()
    r = client.exec_interactive("tty; stty size", stdout=out, rows=30, cols=100)
    assert r.exit_code == 0
    text = out.getvalue()
    assert "/dev/pts/" in text
    assert "30 100" in text


def test_exec_interactive_stdin_and_resize(client):
    out = io.StringIO()
    r = client.exec_interactive(
        "read line; echo got:$line; sleep 1; stty size",
        stdin=io.StringIO("abc\n"),
        stdout=out,
        rows=24,
        cols=80,
        resize=[(40, 120)],
    )
    assert r.exit_code == 0
    assert "got:abc" in out.getvalue()
    assert "40 120" in out.getvalue()


def test_timeout_cancels_and_kills_the_guest_process(client):
    with pytest.raises(TimeoutError):
        client.exec("sleep 1234", timeout=1)
    # The cancel reached the guest: the process is gone, not just abandoned.
    assert wait_until(lambda: "sleep 1234" not in client.exec("ps -o args").stdout, 15)


def test_requests_run_concurrently(client):
    # Each command waits until all three have started: this only finishes if they overlap.
    client.exec("rm -rf /tmp/conc && mkdir /tmp/conc")
    results = {}

    def one(i):
        results[i] = client.exec(
            f"touch /tmp/conc/{i}; while [ $(ls /tmp/conc | wc -l) -lt 3 ]; do sleep 0.1; done; echo {i}",
            timeout=120,
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.stdout for r in results.values()) == ["0\n", "1\n", "2\n"]


# ---- files ----

def test_write_read_list_binary_files(client):
    blob = bytes(range(256)) * 4096 + os.urandom(12345)
    client.write_file("/data/deep/dir/blob.bin", blob)
    assert client.read_file("/data/deep/dir/blob.bin") == blob
    client.write_file("/data/script.sh", "#!/bin/sh\necho hi\n", mode=0o755)
    assert client.exec("/data/script.sh").stdout == "hi\n"
    assert client.exec("stat -c %a /data/script.sh").stdout.strip() == "755"
    files = {f.name: f for f in client.list_files("/data")}
    assert files["deep"].is_dir
    assert not files["script.sh"].is_dir
    assert files["script.sh"].size == len("#!/bin/sh\necho hi\n")
    assert files["script.sh"].mode & 0o777 == 0o755
    assert files["deep"].mode & (1 << 31)  # Go's os.ModeDir, as the SDK expects


def test_file_errors(client):
    with pytest.raises(RPCError) as e:
        client.read_file("/no/such/file")
    assert e.value.is_file_error()
    with pytest.raises(RPCError) as e:
        client.list_files("/no/such/dir")
    assert e.value.is_file_error()


def test_a_command_that_cannot_start_is_an_error_with_the_reason(client):
    # A missing working directory is matchlock's failure, not the command's exit status 126.
    with pytest.raises(RPCError) as e:
        client.exec("pwd", working_dir="/no/such/dir")
    assert e.value.is_exec_error() and "/no/such/dir" in str(e.value), e.value
    # A command the shell cannot find is the command's own failure: exit 127 with sh's message.
    r = client.exec("no-such-command-xyz")
    assert r.exit_code == 127 and "not found" in r.stderr, r


def test_oversized_request_gets_an_error_and_the_server_survives(client):
    with pytest.raises(RPCError) as e:
        client.write_file("/tmp/huge", b"x" * (70 << 20), timeout=120)
    assert "limit" in e.value.message
    assert client.exec("echo still-alive").stdout == "still-alive\n"


# ---- port forwarding ----

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_port_forward_reaches_a_guest_server(client):
    client.write_file("/srv/www/index.html", b"served from the sandbox\n")
    client.exec("setsid python3 -m http.server 8080 --bind 127.0.0.1 --directory /srv/www >/dev/null 2>&1 &")
    port = free_port()
    bindings = client.port_forward(f"{port}:8080")
    assert [(b.address, b.local_port, b.remote_port) for b in bindings] == [("127.0.0.1", port, 8080)]

    def fetch():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10) as r:
                return r.read()
        except OSError:
            return None

    assert wait_until(lambda: fetch() == b"served from the sandbox\n", 60)
    # Many at once.
    got = []
    threads = [threading.Thread(target=lambda: got.append(fetch())) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [b"served from the sandbox\n"] * 16
    # Explicit addresses; the new set replaces the old one.
    port2 = free_port()
    bindings = client.port_forward_with_addresses(["127.0.0.1"], f"{port2}:8080")
    assert [(b.address, b.local_port) for b in bindings] == [("127.0.0.1", port2)]
    port = port2
    assert fetch() == b"served from the sandbox\n"


# ---- lifecycle ----

def test_launch_runs_the_entrypoint_and_logs_it():
    with Client() as c:
        c.launch(Sandbox(BUSYBOX).with_entrypoint("sh", "-c", "echo launched-ok; sleep 300"))
        assert wait_until(lambda: "launched-ok" in c.log(), 30)
        buf = io.StringIO()
        with pytest.raises(TimeoutError):
            c.log_stream(stdout=buf, timeout=2)
        assert "launched-ok" in buf.getvalue()
        assert "sleep 300" in c.exec("ps -o args").stdout


def test_launch_starts_the_image_entrypoint():
    with Client() as c:
        c.launch(Sandbox(ENTRY))
        # ENTRYPOINT + CMD of the image, run as its USER in its WORKDIR.
        assert wait_until(lambda: "entry: default-cmd" in c.log(), 30)
        assert c.exec("id -un; pwd").stdout == "app\n/home/app\n"


def test_launch_fails_when_the_entrypoint_fails_at_once():
    with Client() as c:
        with pytest.raises(RPCError) as e:
            c.launch(Sandbox(BUSYBOX).with_entrypoint("sh", "-c", "exit 7"))
        assert e.value.is_vm_error()
        assert "code 7" in e.value.message


def test_create_options_env_user_and_resources():
    with Client() as c:
        vm = c.create(CreateOptions(image=BUSYBOX, cpus=1, memory_mb=256, env={"FOO": "bar baz"}))
        assert vm.startswith("vm-")
        assert c.exec('echo "$FOO"').stdout == "bar baz\n"
        mem_kb = int(c.exec("awk '/MemTotal/ {print $2}' /proc/meminfo").stdout)
        assert 150_000 < mem_kb <= 256 * 1024
    with Client() as c:
        c.create(Sandbox(BUSYBOX).with_user("1000:1000").with_hostname("box1").options())
        assert c.exec("id -u; hostname").stdout == "1000\nbox1\n"


def test_secrets_stay_on_the_host():
    with Client() as c:
        vm = c.create(Sandbox(BUSYBOX).add_secret("API_KEY", "sk-real-value-42", "api.example.com").options())
        seen = c.exec("echo $API_KEY").stdout.strip()
        assert seen.startswith("SANDBOX_SECRET_")
        assert "sk-real-value-42" not in c.exec("env; cat /proc/1/environ 2>/dev/null").stdout
        assert "sk-real-value-42" not in ml("get", vm).stdout
        home = pathlib.Path(os.environ["MATCHLOCK_HOME"])
        for f in home.rglob("*"):
            if f.is_file() and not f.name.endswith(".ext4") and not f.name.endswith(".sock"):
                assert b"sk-real-value-42" not in f.read_bytes(), f


def test_resources_timeout_is_enforced():
    with Client() as c:
        vm = c.create(Sandbox(BUSYBOX).with_timeout(3).options())
        assert wait_until(lambda: status(vm) == "stopped", 60)
        with pytest.raises(RPCError):
            c.exec("true")


def test_errors_before_and_during_create():
    with Client() as c:
        with pytest.raises(RPCError) as e:
            c.exec("true")
        assert e.value.is_vm_error() and e.value.message == "VM not created"
        with pytest.raises(MatchlockError):
            c.create(CreateOptions(image=""))
        # A registry on a closed loopback port: the pull fails without leaving the machine.
        with pytest.raises(RPCError) as e:
            c.create(CreateOptions(image="127.0.0.1:9/no-such/image:1"))
        assert e.value.is_vm_error()
        assert "127.0.0.1:9" in e.value.message


def test_second_create_replaces_the_first():
    with Client() as c:
        first = c.create(CreateOptions(image=BUSYBOX))
        second = c.create(CreateOptions(image=BUSYBOX))
        assert first != second
        assert status(first) == "stopped"
        assert c.exec("echo second").stdout == "second\n"


def test_rpc_sandboxes_are_ordinary_sandboxes():
    with Client() as c:
        vm = c.create(CreateOptions(image=BUSYBOX))
        assert status(vm) == "running"
        assert ml("exec", vm, "--", "echo", "from-cli").stdout == "from-cli\n"
        ml("kill", vm)
        with pytest.raises(RPCError):
            c.exec("true")


def test_close_then_remove():
    c = Client()
    c.start()
    vm = c.create(CreateOptions(image=BUSYBOX))
    c.close()
    assert status(vm) == "stopped"
    c.remove()
    assert status(vm) == ""
    assert ml("get", vm, check=False).returncode != 0


SDK_DIES = """
import os, signal, sys
from matchlock import Client, CreateOptions
c = Client()
c.start()
print(c.create(CreateOptions(image=sys.argv[1])), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sandbox_stops_when_the_sdk_process_dies():
    out = subprocess.run([sys.executable, "-c", SDK_DIES, BUSYBOX], capture_output=True, text=True, timeout=120)
    vm = out.stdout.strip()
    assert vm.startswith("vm-"), out.stderr
    assert wait_until(lambda: status(vm) == "stopped", 30)


def test_server_stops_the_sandbox_on_sigterm():
    p = subprocess.Popen([BIN, "rpc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    p.stdin.write(json.dumps({"jsonrpc": "2.0", "method": "create", "id": 1, "params": {"image": BUSYBOX}}) + "\n")
    p.stdin.flush()
    vm = json.loads(p.stdout.readline())["result"]["id"]
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)
    assert status(vm) == "stopped"


def test_stdout_carries_only_protocol_lines():
    p = subprocess.run(
        [BIN, "rpc"],
        input="not json\n" + json.dumps({"jsonrpc": "2.0", "method": "nope", "id": 5}) + "\n"
        + json.dumps({"jsonrpc": "2.0", "method": "exec_pipe", "params": {"command": "x"}}) + "\n",
        capture_output=True, text=True, timeout=30,
    )
    lines = [json.loads(l) for l in p.stdout.splitlines()]
    assert lines[0]["error"]["code"] == -32700
    assert lines[1] == {"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": 5}
    assert lines[2]["error"]["code"] == -32600 and "id" not in lines[2]


# ---- volumes (CLI contracts the SDK shells out to) ----

def test_volumes():
    c = Client()
    v = c.volume_create("pyvol", size_mb=64)
    assert v.name == "pyvol" and os.path.exists(v.path)
    assert "pyvol" in [x.name for x in c.volume_list()]
    ml("run", "--image", BUSYBOX, "--disk", "@pyvol:/data", "--", "sh", "-c", "echo persisted > /data/f")
    assert ml("run", "--image", BUSYBOX, "--disk", "@pyvol:/data:ro", "--", "cat", "/data/f").stdout == "persisted\n"
    c.volume_remove("pyvol")
    assert "pyvol" not in [x.name for x in c.volume_list()]


def test_interception_and_secrets_over_raw_rpc():
    """allowed_hosts + secrets over RPC, as the Go SDK sends them (plus the fork's
    allowed_private_hosts to reach a server on the host's loopback)."""
    import http.server

    seen = {}

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen["auth"] = self.headers.get("Authorization")
            body = ("echo " + str(self.headers.get("Authorization"))).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    p = subprocess.Popen([BIN, "rpc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def call(i, method, params):
        p.stdin.write(json.dumps({"jsonrpc": "2.0", "method": method, "id": i, "params": params}) + "\n")
        p.stdin.flush()
        while True:
            msg = json.loads(p.stdout.readline())
            if msg.get("id") == i:
                return msg

    try:
        r = call(1, "create", {"image": PYTHON, "network": {
            "allowed_hosts": ["api.test"], "block_private_ips": True,
            "allowed_private_hosts": ["127.0.0.1"],
            "add_hosts": [{"host": "api.test", "ip": "127.0.0.1"}, {"host": "other.test", "ip": "127.0.0.1"}],
            # Plain HTTP carries a secret only with allow_http (matchlock's extension);
            # PLAIN has no consent and is refused over it.
            "secrets": {"TOKEN": {"value": "tok-real-77", "hosts": ["api.test"], "allow_http": True},
                        "PLAIN": {"value": "plain-real-5", "hosts": ["api.test"]}}}})
        assert "result" in r, r
        script = (
            "import os, urllib.request, urllib.error\n"
            "def get(u):\n"
            "  try:\n"
            "    r = urllib.request.urlopen(urllib.request.Request(u, headers={'Authorization': 'Bearer ' + os.environ['TOKEN']}), timeout=20)\n"
            "    return r.status, r.read().decode()\n"
            "  except urllib.error.HTTPError as e:\n"
            "    return e.code, e.read().decode().strip()\n"
            f"print(get('http://api.test:{port}/'))\n"
            f"print(get('http://other.test:{port}/'))\n"
            "os.environ['TOKEN'] = os.environ['PLAIN']\n"
            f"print(get('http://api.test:{port}/'))\n"
        )
        r = call(2, "exec", {"command": "python3 -c " + shlex.quote(script)})
        out = base64.b64decode(r["result"]["stdout"]).decode()
        assert seen.get("auth") == "Bearer tok-real-77", out
        assert "tok-real-77" not in out
        assert "(200, 'echo Bearer SANDBOX_SECRET_" in out, out
        assert "(403, " in out and "not on this sandbox's allow-list" in out, out
        assert "secret PLAIN may not be sent to api.test over plain HTTP" in out, out
        assert "plain-real-5" not in out
        r = call(3, "allow_list_add", {"hosts": ["other.test"]})
        assert r["result"]["added"] == ["other.test"], r
        assert "other.test" in r["result"]["allowed_hosts"]
    finally:
        call(9, "close", {"timeout_seconds": 2})
        p.stdin.close()
        p.wait(timeout=30)
        srv.shutdown()


def test_network_hook_rules_static_and_callback():
    """The SDK's typed hook rules and an SDK-local callback, through our proxy."""
    import http.server
    from matchlock import (
        NetworkBodyTransform,
        NetworkHookRequestMutation,
        NetworkHookResult,
        NetworkHookRule,
        NetworkInterceptionConfig,
    )

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"hello foo hook={self.headers.get('X-From-Hook')} path={self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    calls = []

    def before(req):
        calls.append((req.phase, req.host, req.path))
        headers = dict(req.request_headers or {})
        headers["X-From-Hook"] = ["yes"]
        return NetworkHookResult(action="mutate", request=NetworkHookRequestMutation(headers=headers))

    sandbox = (
        Sandbox(PYTHON)
        .allow_private_ips()
        .add_host("api.test", "127.0.0.1")
        .allow_host("api.test")
        .with_network_interception(
            NetworkInterceptionConfig(
                rules=[
                    NetworkHookRule(phase="before", hosts=["api.test"], path="/blocked", action="block"),
                    NetworkHookRule(phase="before", hosts=["api.test"], hook=before, timeout_ms=5000),
                    NetworkHookRule(
                        phase="after",
                        hosts=["api.test"],
                        action="mutate",
                        set_response_headers={"X-Intercepted": "true"},
                        body_replacements=[NetworkBodyTransform(find="foo", replace="bar")],
                    ),
                ]
            )
        )
    )
    script = (
        "import urllib.request, urllib.error\n"
        "def get(u):\n"
        "  try:\n"
        "    r = urllib.request.urlopen(u, timeout=20)\n"
        "    return r.status, r.read().decode(), r.headers.get('X-Intercepted')\n"
        "  except urllib.error.HTTPError as e:\n"
        "    return e.code, e.read().decode().strip(), None\n"
        f"print(get('http://api.test:{port}/ok'))\n"
        f"print(get('http://api.test:{port}/blocked'))\n"
    )
    try:
        with Client() as c:
            c.create(sandbox.options())
            out = c.exec("python3 -c " + shlex.quote(script)).stdout
    finally:
        srv.shutdown()
    assert "(200, 'hello bar hook=yes path=/ok', 'true')" in out, out
    assert "(403, " in out and "blocked by rule" in out, out
    assert ("before", "api.test", "/ok") in calls, calls


# ---- workspace mounts (vfs.mounts) ----

def test_workspace_mounts_host_dir_readonly_overlay_and_memory(tmp_path):
    live, ro, snap = tmp_path / "live", tmp_path / "ro", tmp_path / "snap"
    for d in (live, ro, snap):
        d.mkdir()
        (d / "f.txt").write_text(f"{d.name}\n")
    # The python image (busybox + python3) so mmap can be exercised too.
    sb = (Sandbox(PYTHON).with_workspace("/workspace")
          .mount_memory("/workspace")
          .mount_host_dir("/workspace/live", str(live))
          .mount_host_dir_readonly("/workspace/ro", str(ro))
          .mount_overlay("/workspace/snap", str(snap)))
    with Client() as c:
        c.create(sb.options())
        r = c.exec("cat /workspace/live/f.txt /workspace/ro/f.txt /workspace/snap/f.txt")
        assert r.stdout == "live\nro\nsnap\n"
        assert c.exec("echo guest > /workspace/live/new.txt").exit_code == 0
        r = c.exec("echo x > /workspace/ro/f.txt")
        assert r.exit_code != 0 and "Read-only" in r.stderr
        assert c.exec("echo changed > /workspace/snap/f.txt; echo n > /workspace/snap/n").exit_code == 0
        assert c.exec("cat /workspace/snap/f.txt").stdout == "changed\n"
        # Shared mmap through the FUSE page cache: read, write back, msync.
        mm = ("import mmap\n"
              "with open('/workspace/live/f.txt', 'r+b') as f:\n"
              "    m = mmap.mmap(f.fileno(), 0)\n"
              "    print(m[:4].decode())\n"
              "    m[0:4] = b'LIVE'\n"
              "    m.flush()\n")
        r = c.exec(f"python3 -c \"{mm}\"")
        assert (r.exit_code, r.stdout) == (0, "live\n"), r.stderr
        # The memory workspace holds files too.
        assert c.exec("echo mem > /workspace/m; cat /workspace/m").stdout == "mem\n"
        # The SDK's file API goes through the same mounts.
        c.write_file("/workspace/live/sdk.txt", b"via sdk")
    assert (live / "f.txt").read_text() == "LIVE\n"
    assert (live / "new.txt").read_text() == "guest\n"
    assert (live / "sdk.txt").read_bytes() == b"via sdk"
    assert (ro / "f.txt").read_text() == "ro\n"
    assert (snap / "f.txt").read_text() == "snap\n"
    assert sorted(p.name for p in snap.iterdir()) == ["f.txt"]


def test_vfs_block_rules(tmp_path):
    (tmp_path / "secret.txt").write_text("s3cret\n")
    (tmp_path / "ok.txt").write_text("fine\n")
    rules = VFSInterceptionConfig(rules=[
        VFSHookRule(name="no-locks", action="block", ops=["create", "write"], path="/workspace/*.lock"),
        VFSHookRule(name="no-secrets", action="block", ops=["open"], path="/workspace/secret*"),
        VFSHookRule(name="noop", action="allow", ops=["write"]),
    ])
    sb = (Sandbox(BUSYBOX).with_workspace("/workspace").mount_host_dir("/workspace", str(tmp_path))
          .with_vfs_interception(rules))
    with Client() as c:
        c.create(sb.options())
        assert c.exec("cat /workspace/ok.txt").stdout == "fine\n"
        r = c.exec("cat /workspace/secret.txt")
        assert r.exit_code != 0 and "not permitted" in r.stderr
        r = c.exec("echo x > /workspace/a.lock")
        assert r.exit_code != 0 and "not permitted" in r.stderr
        assert c.exec("echo y > /workspace/b.txt").exit_code == 0
    assert not (tmp_path / "a.lock").exists()
    assert (tmp_path / "b.txt").read_text() == "y\n"


def test_vfs_after_hooks_get_events_and_owner_overrides_apply(tmp_path):
    seen = []
    got = threading.Event()

    def hook(event):
        seen.append((event.op, event.path, event.size))
        if event.op == "write" and event.path == "/workspace/a.txt":
            got.set()

    rules = VFSInterceptionConfig(rules=[
        VFSHookRule(name="writes", phase="after", ops=["write"], path="/workspace/*", hook=hook),
    ])
    sb = (Sandbox(BUSYBOX).with_workspace("/workspace")
          .mount_host_dir("/workspace", str(tmp_path), owner_uid=1000, owner_gid=1001)
          .with_vfs_interception(rules))
    with Client() as c:
        c.create(sb.options())
        assert c.exec("echo hello > /workspace/a.txt; cat /workspace/a.txt").stdout == "hello\n"
        # The SDK runs after-hooks from the server's event notifications.
        assert got.wait(20), seen
        assert ("write", "/workspace/a.txt", 6) in seen, seen
        # Only the hook's ops and paths reach it.
        assert all(op == "write" for op, _, _ in seen), seen
        # Files show the mount's owner in the guest; chown to it is a no-op, to others refused.
        assert c.exec("stat -c %u:%g /workspace/a.txt /workspace").stdout == "1000:1001\n1000:1001\n"
        assert c.exec("chown 1000:1001 /workspace/a.txt").exit_code == 0
        r = c.exec("chown 0 /workspace/a.txt")
        assert r.exit_code != 0 and "not permitted" in r.stderr
    st = (tmp_path / "a.txt").stat()
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert (tmp_path / "a.txt").read_text() == "hello\n"

