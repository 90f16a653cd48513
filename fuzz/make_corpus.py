#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target under fuzz/corpus/<target>/ (seed-* files).

Every seed is built here from first principles (no downloads): DNS queries, HTTP/1.1 and h2
requests, a TLS ClientHello, postcard frames and a yamux session, Ethernet frames with real
checksums, FUSE request sequences, JSON-RPC lines, image manifests and configs, and tarballs made
with the `tar` CLI. Run it from anywhere; it only rewrites seed-* files, leaving whatever a long
fuzzing run added next to them. The formats each target expects are described in the
//! comment at the top of fuzz/fuzz_targets/<target>.rs.
"""

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data)


def clean(target):
    d = CORPUS / target
    if d.exists():
        for f in d.glob("seed-*"):
            f.unlink()


def sha256(b):
    return hashlib.sha256(b).hexdigest()


# ---------------------------------------------------------------- HTTP, TLS, h2 (classify, proxy)

def tls_client_hello(sni=None, alpn=(), sigalgs=True):
    exts = b""
    if sni is not None:
        name = sni.encode()
        entry = b"\x00" + struct.pack(">H", len(name)) + name
        lst = struct.pack(">H", len(entry)) + entry
        exts += struct.pack(">HH", 0, len(lst)) + lst
    if alpn:
        protos = b"".join(bytes([len(p)]) + p.encode() for p in alpn)
        lst = struct.pack(">H", len(protos)) + protos
        exts += struct.pack(">HH", 16, len(lst)) + lst
    if sigalgs:
        algs = struct.pack(">HHHH", 0x0403, 0x0804, 0x0401, 0x0503)
        lst = struct.pack(">H", len(algs)) + algs
        exts += struct.pack(">HH", 13, len(lst)) + lst
        # supported_versions (TLS 1.3, 1.2) and a P-256-less key_share-free hello still parse.
        vers = b"\x04\x03\x04\x03\x03"
        exts += struct.pack(">HH", 43, len(vers)) + vers
        groups = struct.pack(">HHH", 4, 0x001D, 0x0017)
        exts += struct.pack(">HH", 10, len(groups)) + groups
    body = b"\x03\x03" + bytes(range(32))  # version, random
    body += b"\x20" + bytes(32)  # session id
    suites = struct.pack(">HHHH", 0x1301, 0x1302, 0xC02B, 0xC02F)
    body += struct.pack(">H", len(suites)) + suites
    body += b"\x01\x00"  # compression: null
    body += struct.pack(">H", len(exts)) + exts
    hs = b"\x01" + struct.pack(">I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack(">H", len(hs)) + hs


def http(method, path, host, headers=(), body=b"", version="HTTP/1.1"):
    lines = [f"{method} {path} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += list(headers)
    if body and not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def hpack_literal(index, value):
    """Literal header field without indexing, name from the static table, no Huffman."""
    v = value.encode()
    assert index < 15 and len(v) < 127
    return bytes([index]) + bytes([len(v)]) + v


def hpack_new_name(name, value):
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def h2_request(authority, path="/", extra=(), data=None):
    block = b"\x82"  # :method GET
    if data is not None:
        block = b"\x83"  # :method POST
    block += b"\x86"  # :scheme http
    block += hpack_literal(4, path)  # :path
    block += hpack_literal(1, authority)  # :authority
    for name, value in extra:
        block += hpack_new_name(name, value)
    out = H2_PREFACE + h2_frame(4, 0, 0, b"")  # SETTINGS
    flags = 0x4 | (0x1 if data is None else 0)  # END_HEADERS, END_STREAM
    out += h2_frame(1, flags, 1, block)
    if data is not None:
        out += h2_frame(0, 0x1, 1, data)
    out += h2_frame(4, 0x1, 0, b"")  # SETTINGS ack
    return out


def classify_and_proxy():
    for t in ("classify", "http_proxy"):
        clean(t)
    common = {
        "h1-get": http("GET", "/index.html", "example.com", ["User-Agent: curl/8.5", "Accept: */*"]),
        "h1-10": http("GET", "/", None, version="HTTP/1.0"),
        "h1-post": http("POST", "/api/v1/items?x=1", "api.test:8080", ["Content-Type: application/json"], b'{"a":1}'),
        "h2-preface": H2_PREFACE,
        "tls-sni-alpn": tls_client_hello("api.test", ["h2", "http/1.1"]),
        "tls-no-sigalgs": tls_client_hello("Legacy.Example.com", ["http/1.1"], sigalgs=False),
        "tls-no-sni": tls_client_hello(None, ["imap"]),
        "ssh": b"SSH-2.0-OpenSSH_9.6\r\n",
    }
    for name, data in common.items():
        write("classify", name, data)
        write("http_proxy", name, data)
    write("classify", "h1-connect", http("CONNECT", "api.test:443", "api.test:443"))

    ph, ph2 = "MATCHLOCK_PLACEHOLDER_API_KEY", "MATCHLOCK_PLACEHOLDER_OTHER"
    basic = base64.b64encode(f"user:{ph2}".encode()).decode()
    proxy = {
        "never-allowed": http("GET", "/", "never.invalid"),
        "secret-cleartext": http("GET", "/v1", "api.test", [f"Authorization: Bearer {ph}"]),
        "secret-other-host": http("GET", "/", "other.test", [f"X-Key: {ph}"]),
        "secret-injected": http("GET", "/data?key=" + ph2 + "&drop=1", "other.test",
                                [f"X-Key: {ph2}", "Accept-Encoding: gzip"]),
        "secret-basic": http("GET", "/", "other.test", [f"Authorization: Basic {basic}"]),
        "secret-in-path": http("GET", "/" + ph2, "api.test"),
        "secret-body": http("POST", "/upload", "other.test", ["Content-Type: text/plain"],
                            f"token={ph}".encode()),
        "chunked": http("POST", "/c", "other.test", ["Transfer-Encoding: chunked"],
                        b"5\r\nhello\r\n0\r\n\r\n"),
        "rule-block": http("GET", "/blocked/x", "other.test"),
        "rule-mutate": http("GET", "/rw/x?drop=1&keep=2", "other.test", ["X-Drop: 1"]),
        "websocket": http("GET", "/ws", "other.test", ["Connection: Upgrade", "Upgrade: websocket",
                          "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]),
        "keepalive-two": http("GET", "/1", "other.test") + http("GET", "/2", "api.test"),
        "absolute-uri": http("GET", "http://other.test/abs", "api.test"),
        "no-host": http("GET", "/", None),
        "h2-get": h2_request("other.test", "/h2", [("x-key", ph2)]),
        "h2-post": h2_request("api.test", "/h2", [("authorization", f"Bearer {ph}")], b"data"),
        "tls-other": tls_client_hello("other.test", ["h2"]),
    }
    for name, data in proxy.items():
        write("http_proxy", name, data)


# ---------------------------------------------------------------- DNS

def dns_name(name):
    out = b""
    for label in name.strip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def dns_query(qid, name, qtype=1, qclass=1, flags=0x0100, edns=None, extra_questions=()):
    qs = [(name, qtype, qclass)] + list(extra_questions)
    ar = 1 if edns is not None else 0
    msg = struct.pack(">HHHHHH", qid, flags, len(qs), 0, 0, ar)
    for n, t, c in qs:
        msg += dns_name(n) + struct.pack(">HH", t, c)
    if edns is not None:
        payload, options = edns
        msg += b"\x00" + struct.pack(">HHIH", 41, payload, 0, len(options)) + options
    return msg


def dns():
    clean("dns")
    seeds = {
        "a-local": dns_query(0x1234, "db.internal"),
        "aaaa-local": dns_query(0x1235, "DB.Internal.", 28),
        "a-allowed": dns_query(0x1236, "api.allowed.test"),
        "a-sinkhole": dns_query(0x1237, "exfil.evil.example"),
        "txt-edns": dns_query(0x1238, "allowed.test", 16, edns=(4096, b"")),
        "edns-option": dns_query(0x1239, "allowed.test", 1, edns=(1232, struct.pack(">HH", 12, 4) + b"\0\0\0\0")),
        "axfr": dns_query(0x123A, "allowed.test", 252),
        "any": dns_query(0x123B, "db.internal", 255),
        "chaos": dns_query(0x123C, "version.bind", 16, 3),
        "two-questions": dns_query(0x123D, "allowed.test", 1, extra_questions=[("c2VjcmV0.evil.example", 1, 1)]),
        "update": dns_query(0x123E, "allowed.test", 1, flags=0x2800),
        "response": dns_query(0x123F, "db.internal", flags=0x8180),
        "compressed": struct.pack(">HHHHHH", 0x4242, 0x0100, 2, 0, 0, 0)
        + dns_name("db.internal") + b"\x00\x01\x00\x01" + b"\xc0\x0c\x00\x1c\x00\x01",
    }
    for name, data in seeds.items():
        write("dns", name, data)
    return seeds


# ---------------------------------------------------------------- JSON-RPC

def rpc():
    clean("rpc")
    create = {
        "jsonrpc": "2.0", "method": "create", "id": 1,
        "params": {
            "image": "alpine:3.20",
            "privileged": False,
            "resources": {"cpus": 1.5, "memory_mb": 512, "disk_size_mb": 1024, "timeout_seconds": 30},
            "network": {
                "allowed_hosts": ["api.example.com", "*.openai.com"],
                "add_hosts": [{"host": "db.internal", "ip": "10.0.0.5"}],
                "block_private_ips": True,
                "secrets": {"API_KEY": {"value": "sk-test", "hosts": ["api.example.com"], "placeholder": "PH", "allow_http": False}},
                "interception": {"rules": [{"name": "r", "phase": "before", "hosts": ["api.example.com"],
                                            "methods": ["GET"], "path": "/v1/*", "action": "mutate",
                                            "set_headers": {"X-A": "b"}, "set_query": {"k": "v"}}]},
                "dns_servers": ["1.1.1.1", "9.9.9.9:53"],
                "hostname": "sandbox",
                "mtu": 1400,
            },
            "vfs": {
                "workspace": "/workspace",
                "mounts": {"/workspace/tmp": {"type": "memory"}, "/workspace/src": {"type": "host_fs", "host_path": "/tmp", "readonly": True}},
                "interception": {"emit_events": True, "rules": [{"name": "no-write", "ops": ["write"], "path": "/workspace/src/*", "action": "block"}]},
            },
            "env": {"FOO": "bar"},
            "extra_disks": [{"host_path": "/tmp/disk.ext4", "guest_mount": "/data", "readonly": True}],
            "image_config": {"user": "1000:1000", "working_dir": "/app", "entrypoint": ["/bin/sh", "-c"], "cmd": ["echo hi"], "env": {"PATH": "/bin"}},
        },
    }
    minimal = {"jsonrpc": "2.0", "method": "create", "id": "a", "params": {"image": "busybox"}}
    lines = {
        "create-full": json.dumps(create) + "\n",
        "create-minimal": json.dumps(minimal) + "\n",
        "create-bad": '{"jsonrpc":"2.0","method":"create","id":2,"params":{"image":"","id":"x","resources":{"timeout_seconds":-1}}}\n',
        "session": "\n".join([
            json.dumps(minimal),
            json.dumps({"jsonrpc": "2.0", "method": "exec", "id": 2, "params": {"command": "echo hi", "working_dir": "/", "user": "root"}}),
            json.dumps({"jsonrpc": "2.0", "method": "exec_pipe", "id": 3, "params": {"command": "cat"}}),
            json.dumps({"jsonrpc": "2.0", "method": "exec_pipe.stdin", "params": {"id": 3, "data": "aGVsbG8="}}),
            json.dumps({"jsonrpc": "2.0", "method": "exec_pipe.stdin_eof", "params": {"id": 3}}),
            json.dumps({"jsonrpc": "2.0", "method": "write_file", "id": 4, "params": {"path": "/tmp/x", "content": "aGk=", "mode": 420}}),
            json.dumps({"jsonrpc": "2.0", "method": "cancel", "id": 5, "params": {"id": 2}}),
            json.dumps({"jsonrpc": "2.0", "method": "allow_list_add", "id": 6, "params": {"hosts": ["a.test"]}}),
            json.dumps({"jsonrpc": "2.0", "method": "close", "id": 7, "params": {"timeout_seconds": 1}}),
        ]) + "\n",
        "garbage": "\n  \nnot json\n[1,2]\n{\"method\":3}\n{\"id\":{\"nested\":[1]},\"method\":\"nope\"}\n",
    }
    for name, data in lines.items():
        write("rpc", name, data.encode())


# ---------------------------------------------------------------- postcard / yamux (proto_frame)

def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def zigzag(n):
    return varint((n << 1) ^ (n >> 31))


def pstr(s):
    b = s.encode() if isinstance(s, str) else s
    return varint(len(b)) + b


def popt(v, enc):
    return b"\x00" if v is None else b"\x01" + enc(v)


def pvec(items, enc):
    return varint(len(items)) + b"".join(enc(i) for i in items)


MSG = {name: i for i, name in enumerate([
    "Setup", "Exec", "WriteFile", "ReadFile", "ListFiles", "Shutdown", "Stdin", "StdinEof",
    "Resize", "Signal", "Terminate", "Started", "Stdout", "Stderr", "Exited", "Data", "Eof",
    "Ok", "Error", "FileInfo", "Entries", "Connect",
])}


def msg(name, body=b""):
    return varint(MSG[name]) + body


def frame(body):
    return struct.pack(">I", len(body)) + body


def proto():
    clean("proto_frame")
    pair = lambda kv: pstr(kv[0]) + pstr(kv[1])
    setup = (pstr("sandbox") + pvec([("10.0.0.5", "db.internal")], pair) + pstr("ml-root")
             + popt("ml-upper", pstr) + varint(1_700_000_000_000) + popt((50000, 100000), lambda t: varint(t[0]) + varint(t[1]))
             + b"\x01"
             + pvec([("ml-disk1", "/data", True, 1000, None)],
                    lambda d: pstr(d[0]) + pstr(d[1]) + bytes([d[2]]) + popt(d[3], varint) + popt(d[4], varint))
             + popt((bytes([192, 168, 127, 2]), 24, bytes([192, 168, 127, 1]), 1500),
                    lambda n: n[0] + bytes([n[1]]) + n[2] + varint(n[3]))
             + pvec([(0, "/workspace", False, False, True)],
                    lambda m: varint(m[0]) + pstr(m[1]) + bytes([m[2], m[3], m[4]])))
    exec_req = (pvec(["echo", "hi"], pstr) + pvec([("A", "b")], pair) + popt("/", pstr) + popt("1000:1000", pstr)
                + popt((24, 80), lambda w: varint(w[0]) + varint(w[1])) + b"\x01\x00")
    host = [
        msg("Setup", setup),
        msg("Exec", exec_req),
        msg("WriteFile", pstr("/tmp/x") + varint(0o644) + popt(1000, varint) + popt(None, varint)),
        msg("ReadFile", pstr("/etc/hosts")),
        msg("ListFiles", pstr("/")),
        msg("Stdin", pstr(b"input\n")),
        msg("StdinEof"),
        msg("Resize", varint(40) + varint(120)),
        msg("Signal", zigzag(15)),
        msg("Terminate", varint(1000)),
        msg("Connect", varint(8080)),
        msg("Shutdown", varint(2000)),
    ]
    guest = [
        msg("Started", varint(42)),
        msg("Stdout", pstr(b"hello\n")),
        msg("Stderr", pstr(b"warning\n")),
        msg("Exited", zigzag(137) + popt(9, zigzag)),
        msg("FileInfo", varint(5) + varint(0o100644)),
        msg("Data", pstr(b"hello")),
        msg("Eof"),
        msg("Entries", pvec([("etc", 4096, 0o40755, True), ("f", 5, 0o100644, False)],
                            lambda e: pstr(e[0]) + varint(e[1]) + varint(e[2]) + bytes([e[3]]))),
        msg("Ok"),
        msg("Error", pstr("no such file")),
    ]
    write("proto_frame", "host-requests", b"".join(frame(m) for m in host))
    write("proto_frame", "guest-replies", b"".join(frame(m) for m in guest))
    write("proto_frame", "too-large", struct.pack(">I", 0xFFFFFFFF) + b"\x11")

    # yamux: version 0, type (0 data, 1 window update, 2 ping, 3 go away), flags (SYN 1, ACK 2,
    # FIN 4, RST 8), stream id, length. The guest is the server: its streams are even.
    def ymx(kind, flags, stream, length, payload=b""):
        return struct.pack(">BBHII", 0, kind, flags, stream, length) + payload

    def data(stream, payload, flags=0):
        return ymx(0, flags, stream, len(payload), payload)

    exec_stream = b"".join(frame(m) for m in guest[:4])
    files_stream = b"".join(frame(m) for m in guest[4:8])
    session = (
        ymx(1, 1, 2, 0)  # open stream 2
        + data(2, exec_stream)
        + ymx(2, 1, 0, 7)  # ping
        + data(4, files_stream, 1)  # open stream 4 with data
        + ymx(1, 0, 2, 65536)  # window update
        + data(2, b"", 4)  # FIN stream 2
        + data(4, b"", 4)
        + ymx(3, 0, 0, 0)  # go away, normal
    )
    write("proto_frame", "yamux-session", session)


# ---------------------------------------------------------------- Ethernet (net_frame)

GUEST_MAC = bytes([0x02, 0x4D, 0x4C, 0, 0, 2])
GW_MAC = bytes([0x02, 0x4D, 0x4C, 0, 0, 1])
GUEST_IP = bytes([192, 168, 127, 2])
GW_IP = bytes([192, 168, 127, 1])


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f">{len(b)//2}H", b))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def ipv4(proto, payload, src=GUEST_IP, dst=GW_IP, ident=1):
    hdr = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, 64, proto, 0, src, dst)
    hdr = hdr[:10] + struct.pack(">H", csum(hdr)) + hdr[12:]
    return hdr + payload


def eth(payload, ethertype=0x0800, dst=GW_MAC, src=GUEST_MAC):
    return dst + src + struct.pack(">H", ethertype) + payload


def l4(proto, seg, src, dst, at):
    pseudo = src + dst + struct.pack(">BBH", 0, proto, len(seg))
    c = csum(pseudo + seg)
    if proto == 17 and c == 0:
        c = 0xFFFF
    return seg[:at] + struct.pack(">H", c) + seg[at + 2:]


def udp(sport, dport, data, src=GUEST_IP, dst=GW_IP):
    seg = struct.pack(">HHHH", sport, dport, 8 + len(data), 0) + data
    return eth(ipv4(17, l4(17, seg, src, dst, 6), src, dst))


def tcp(sport, dport, seq, ack, flags, data=b"", src=GUEST_IP, dst=GW_IP, options=b""):
    off = (20 + len(options)) // 4
    seg = struct.pack(">HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, 64240, 0, 0) + options + data
    return eth(ipv4(6, l4(6, seg, src, dst, 16), src, dst))


def icmp_echo(dst, ident=7, seq=1, data=b"ping"):
    msg_ = struct.pack(">BBHHH", 8, 0, 0, ident, seq) + data
    msg_ = msg_[:2] + struct.pack(">H", csum(msg_)) + msg_[4:]
    return eth(ipv4(1, msg_, GUEST_IP, dst))


def arp_request(target_ip):
    body = struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1) + GUEST_MAC + GUEST_IP + bytes(6) + target_ip
    return eth(body, 0x0806, dst=b"\xff" * 6)


def frames(*fs, flags=3):
    return b"".join(struct.pack(">HB", len(f), flags) + f for f in fs)


def net(dns_seeds):
    clean("net_frame")
    public = bytes([93, 184, 216, 34])
    syn_opts = struct.pack(">BBH", 2, 4, 1460) + b"\x01\x01\x04\x02"  # MSS, NOP NOP, SACK permitted
    seeds = {
        "arp": frames(arp_request(GW_IP)),
        "ping-gateway": frames(arp_request(GW_IP), icmp_echo(GW_IP)),
        "ping-public": frames(icmp_echo(public)),
        "dns-query": frames(udp(40001, 53, dns_seeds["a-local"]), udp(40002, 53, dns_seeds["a-sinkhole"])),
        "udp-refused": frames(udp(40003, 123, b"\x1b" + bytes(47), dst=bytes([8, 8, 8, 8]))),
        "tcp-syn-proxy": frames(tcp(40004, 80, 1000, 0, 0x02, dst=public, options=syn_opts)),
        "tcp-syn-then-data": frames(
            tcp(40005, 80, 5000, 0, 0x02, dst=public, options=syn_opts),
            tcp(40005, 80, 5001, 1, 0x18, b"GET / HTTP/1.1\r\nHost: never.invalid\r\n\r\n", dst=public),
            tcp(40005, 80, 5040, 1, 0x11, dst=public),
        ),
        "tcp-gateway": frames(tcp(40006, 22, 1, 0, 0x02, options=syn_opts)),
        "tcp-rst-unknown": frames(tcp(40007, 443, 9, 9, 0x04, dst=public)),
        "spoofed-source": frames(udp(1, 53, dns_seeds["a-local"], src=bytes([10, 0, 0, 9]))),
        "ipv6": frames(eth(bytes([0x60, 0, 0, 0, 0, 8, 17, 64]) + bytes(32) + bytes(8), 0x86DD)),
        "alias": frames(tcp(40008, 8080, 77, 0, 0x02, dst=bytes([198, 18, 0, 1]), options=syn_opts)),
        "raw-checksums": frames(icmp_echo(GW_IP), flags=0),
    }
    for name, data in seeds.items():
        write("net_frame", name, data)


# ---------------------------------------------------------------- FUSE (vfs_fuse)

NODE_ID_LIMIT = 1 << 48
R0, R1 = NODE_ID_LIMIT + 1, 2 * NODE_ID_LIMIT + 1


def NODE(i):
    return (0x4E4F4445 << 32) | i


def FH(i):
    return (0x46484E44 << 32) | i


OP = dict(LOOKUP=1, FORGET=2, GETATTR=3, SETATTR=4, READLINK=5, SYMLINK=6, MKNOD=8, MKDIR=9,
          UNLINK=10, RMDIR=11, RENAME=12, LINK=13, OPEN=14, READ=15, WRITE=16, STATFS=17,
          RELEASE=18, FSYNC=20, FLUSH=25, OPENDIR=27, READDIR=28, RELEASEDIR=29, FSYNCDIR=30,
          CREATE=35, DESTROY=38, BATCH_FORGET=42, FALLOCATE=43, READDIRPLUS=44, RENAME2=45,
          LSEEK=46, SYNCFS=50)


class Fuse:
    def __init__(self):
        self.out = b""
        self.unique = 100

    def req(self, op, node, body=b"", payload=b"", uid=0, gid=0):
        self.unique += 1
        length = 40 + len(body) + len(payload)
        r = struct.pack("<IIQQIIIHH", length, OP[op], self.unique, node, uid, gid, 4242, 0, 0) + body
        self.out += struct.pack("<HH", len(r), len(payload)) + r + payload
        return self


def u32(*v):
    return struct.pack(f"<{len(v)}I", *v)


def u64(*v):
    return struct.pack(f"<{len(v)}Q", *v)


def name(s):
    return s.encode() + b"\0"


def read_in(fh, offset, size):
    return u64(fh, offset) + u32(size, 0) + u64(0) + u32(0, 0)


def setattr_in(valid, fh=0, size=0, mode=0, uid=0, gid=0, atime=0, mtime=0):
    return (u32(valid, 0) + u64(fh, size, 0, atime, mtime, 0) + u32(0, 0, 0) + u32(mode, 0)
            + u32(uid, gid, 0))


def vfs():
    clean("vfs_fuse")
    # Nodes known before any reply: NODE(0) the synthetic root, NODE(1) mount 0, NODE(2) mount 1;
    # learned ones follow in reply order.
    s = (Fuse()
         .req("LOOKUP", R0, name("f"))                      # NODE(3)
         .req("OPEN", NODE(3), u32(os.O_RDONLY, 0))         # FH(0)
         .req("READ", NODE(3), read_in(FH(0), 0, 4096))
         .req("GETATTR", NODE(3), u32(1, 0) + u64(FH(0)))
         .req("LSEEK", NODE(3), u64(FH(0), 0) + u32(3, 0))
         .req("RELEASE", NODE(3), u64(FH(0)) + u32(0, 0) + u64(0))
         .req("FORGET", NODE(3), u64(1)))
    write("vfs_fuse", "read-shared", s.out)

    s = (Fuse()
         .req("CREATE", R1, u32(os.O_RDWR | os.O_CREAT, 0o100644, 0o022, 0) + name("new"), uid=1000, gid=1000)
         .req("WRITE", NODE(3), u64(FH(0), 0) + u32(5, 0) + u64(0) + u32(0, 0), b"hello", uid=1000)
         .req("FSYNC", NODE(3), u64(FH(0)) + u32(1, 0))
         .req("SETATTR", NODE(3), setattr_in(0x1 | 0x8 | 0x40, fh=FH(0), size=3, mode=0o4755))
         .req("FALLOCATE", NODE(3), u64(FH(0), 0, 8192) + u32(0, 0))
         .req("READ", NODE(3), read_in(FH(0), 1, 10))
         .req("RELEASE", NODE(3), u64(FH(0)) + u32(0, 0) + u64(0))
         .req("RENAME", R1, u64(R1) + name("new") + name("renamed"))
         .req("RENAME2", R1, u64(R1) + u32(1, 0) + name("renamed") + name("f"))
         .req("UNLINK", R1, name("renamed"))
         .req("STATFS", R1))
    write("vfs_fuse", "write-private", s.out)

    s = (Fuse()
         .req("OPENDIR", R0, u32(0, 0))                     # FH(0)
         .req("READDIRPLUS", R0, read_in(FH(0), 0, 4096))
         .req("READDIR", R0, read_in(FH(0), 2, 4096))
         .req("RELEASEDIR", R0, u64(FH(0)) + u32(0, 0) + u64(0))
         .req("MKDIR", R0, u32(0o40755, 0o022) + name("sub"))   # NODE(3)
         .req("SYMLINK", R0, name("ln") + name("sub"))           # NODE(4)
         .req("READLINK", NODE(4))
         .req("LOOKUP", R0, name("f"))                           # NODE(5)
         .req("LINK", R0, u64(NODE(5)) + name("hard"))           # NODE(5) again
         .req("MKNOD", R0, u32(0o10644, 0, 0o022, 0) + name("fifo"))
         .req("RMDIR", R0, name("sub"))
         .req("LOOKUP", R0, name(".."))
         .req("LOOKUP", R0, name("l"))
         .req("SYNCFS", R0, u64(0))
         .req("BATCH_FORGET", 0, u32(2, 0) + u64(NODE(3), 1, NODE(4), 1)))
    write("vfs_fuse", "directories", s.out)

    s = (Fuse()
         .req("GETATTR", 1, u32(0, 0) + u64(0))
         .req("LOOKUP", 1, name("1"))
         .req("OPENDIR", 1, u32(0, 0))
         .req("READDIRPLUS", 1, read_in(0xFFFFFFFFFFFFFFFF, 0, 4096))
         .req("STATFS", 1)
         .req("MKDIR", 1, u32(0o40755, 0) + name("x"))
         .req("LOOKUP", R1, name("d"))                      # NODE(3)
         .req("LOOKUP", NODE(3), name("g"))                 # NODE(4)
         .req("OPEN", NODE(4), u32(os.O_RDWR, 0))           # FH(1): rules refuse writes in d/
         .req("WRITE", NODE(4), u64(FH(1), 0) + u32(1, 0) + u64(0) + u32(0, 0), b"x")
         .req("UNLINK", NODE(3), name("g"))
         .req("LOOKUP", R1, name("p"))                      # NODE(5): a FIFO
         .req("OPEN", NODE(5), u32(os.O_RDONLY | os.O_NONBLOCK, 0))
         .req("CREATE", R1, u32(os.O_WRONLY | os.O_CREAT, 0o100600, 0, 0) + name("secret.txt"))
         .req("LINK", R1, u64(R0) + name("cross"))
         .req("DESTROY", 0))
    write("vfs_fuse", "root-and-rules", s.out)


# ---------------------------------------------------------------- images

def tar_cli(src, out, files=None, extra=()):
    cmd = ["tar", "--format=gnu", "--blocking-factor=1", "--sort=name", "--owner=0", "--group=0", "--numeric-owner",
           "--mtime=@0", *extra, "-C", str(src), "-cf", str(out)]
    cmd += files if files else ["."]
    subprocess.run(cmd, check=True)
    return Path(out).read_bytes()


def image_config(diff_ids):
    ids = ",".join(f'"{d}"' for d in diff_ids)
    return ('{"architecture":"amd64","os":"linux","created":"2024-01-01T00:00:00Z","config":{"Env":["PATH=/bin"],'
            '"Cmd":["/bin/sh"],"WorkingDir":"/","User":"0"},"rootfs":{"type":"layers","diff_ids":[' + ids + ']}}').encode()


def oci_manifest(config, layer):
    return ('{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":'
            f'"application/vnd.oci.image.config.v1+json","digest":"sha256:{sha256(config)}","size":{len(config)}}},'
            '"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar",'
            f'"digest":"sha256:{sha256(layer)}","size":{len(layer)}}}]}}').encode()


def oci_index(manifest):
    return ('{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":'
            f'"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{sha256(manifest)}","size":{len(manifest)},'
            '"platform":{"architecture":"amd64","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"latest"}}]}').encode()


def images():
    clean("image_tar")
    clean("image_manifest")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # A layer with directories, a file, an executable, symlinks, a hard link and a FIFO.
        root = tmp / "layer1"
        (root / "etc").mkdir(parents=True)
        (root / "bin").mkdir()
        (root / "etc" / "hostname").write_text("sandbox\n")
        (root / "bin" / "tool").write_text("#!/bin/sh\necho hi\n")
        os.chmod(root / "bin" / "tool", 0o4755)
        os.symlink("tool", root / "bin" / "alias")
        os.symlink("/etc/hostname", root / "hostname-link")
        os.link(root / "etc" / "hostname", root / "etc" / "hostname.bak")
        os.mkfifo(root / "bin" / "pipe")
        layer1 = tar_cli(root, tmp / "layer1.tar")
        # A second layer: whiteouts of a file and of a directory's contents.
        root2 = tmp / "layer2"
        (root2 / "etc").mkdir(parents=True)
        (root2 / "etc" / ".wh.hostname.bak").write_bytes(b"")
        (root2 / "bin" / "new").mkdir(parents=True)
        (root2 / "bin" / "new" / ".wh..wh..opq").write_bytes(b"")
        layer2 = tar_cli(root2, tmp / "layer2.tar")
        # Hostile entries that a layer must refuse: '..', an absolute path, a link out.
        root3 = tmp / "layer3"
        (root3 / "x").mkdir(parents=True)
        (root3 / "x" / "f").write_text("f")
        os.symlink("/", root3 / "escape")
        (root3 / "z").write_text("pwned")
        (root3 / "w").write_bytes(b"")
        layer3 = tar_cli(root3, tmp / "layer3.tar", extra=[
            "--absolute-names",
            "--transform=s,^\\./x/f$,../../outside,",
            "--transform=s,^\\./escape$,./x/up,",
            "--transform=s,^\\./z$,./x/up/tmp/pwned,",
            "--transform=s,^\\./w$,/x/up/tmp/.wh.pwned,",
        ])
        write("image_tar", "layer-files", layer1)
        write("image_tar", "layer-whiteouts", layer2)
        write("image_tar", "layer-hostile", layer3)
        write("image_tar", "layer-gzip", gzip.compress(layer2, mtime=0))
        write("image_tar", "empty-tar", bytes(1024))

        # `docker save` and OCI archives whose diff_ids are right: these import in full.
        config = image_config([f"sha256:{sha256(layer1)}", f"sha256:{sha256(layer2)}"])
        ds = tmp / "docker"
        (ds / "blobs" / "sha256").mkdir(parents=True)
        (ds / "blobs" / "sha256" / sha256(config)).write_bytes(config)
        (ds / "l1").mkdir()
        (ds / "l1" / "layer.tar").write_bytes(layer1)
        (ds / "l2").mkdir()
        (ds / "l2" / "layer.tar").write_bytes(layer2)
        (ds / "manifest.json").write_text(json.dumps([{
            "Config": f"blobs/sha256/{sha256(config)}", "RepoTags": ["fuzz:latest"],
            "Layers": ["l1/layer.tar", "l2/layer.tar"]}]))
        write("image_tar", "docker-save", tar_cli(ds, tmp / "docker.tar"))

        oci = tmp / "oci"
        blobs = oci / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        cfg1 = image_config([f"sha256:{sha256(layer2)}"])
        manifest = oci_manifest(cfg1, layer2)
        for b in (cfg1, layer2, manifest):
            (blobs / sha256(b)).write_bytes(b)
        (oci / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        (oci / "index.json").write_bytes(oci_index(manifest))
        write("image_tar", "oci-layout", tar_cli(oci, tmp / "oci.tar"))

    # image_manifest: a mode byte, then the document. The harness's fixed blobs (see
    # fuzz_targets/image_manifest.rs and common/image.rs): an empty-tar layer and a config whose
    # diff_id is deliberately not the layer's.
    layer = bytes(1024)
    cfg = image_config([f"sha256:{sha256(b'not this layer')}"])
    manifest = oci_manifest(cfg, layer)
    nested = oci_index(manifest)
    m = lambda mode, doc: bytes([mode]) + (doc.encode() if isinstance(doc, str) else doc)
    seeds = {
        "ref-short": m(0, "busybox"),
        "ref-tag": m(0, "alpine:3.20"),
        "ref-registry": m(0, "ghcr.io/owner/repo/sub:v1.2.3"),
        "ref-port-digest": m(0, "localhost:5000/img@sha256:" + sha256(b"x")),
        "ref-both": m(0, "docker.io/library/ubuntu:24.04@sha256:" + sha256(b"y")),
        "docker-manifest": m(1, '[{"Config":"config.json","RepoTags":["fuzz:latest"],"Layers":["layer.tar"]}]'),
        "docker-manifest-blob": m(1, json.dumps([
            {"Config": f"blobs/sha256/{sha256(cfg)}", "RepoTags": ["other:1", "docker.io/library/fuzz:latest"],
             "Layers": [f"blobs/sha256/{sha256(layer)}"]},
            {"Config": "config.json", "RepoTags": ["other:2"], "Layers": ["layer.tar"]}])),
        "oci-index": m(2, oci_index(manifest)),
        "oci-index-nested": m(2, json.dumps({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": f"sha256:{sha256(nested)}",
             "size": len(nested), "annotations": {"io.containerd.image.name": "docker.io/library/fuzz:latest"}},
            {"digest": f"sha256:{sha256(manifest)}",
             "annotations": {"vnd.docker.reference.type": "attestation-manifest"}}]})),
        "oci-index-platforms": m(2, json.dumps({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{sha256(manifest)}",
             "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{sha256(manifest)}",
             "size": len(manifest), "platform": {"architecture": "amd64", "os": "linux"}}]})),
        "oci-manifest": m(3, manifest),
        "oci-manifest-two-layers": m(3, json.dumps({"schemaVersion": 2, "config": {
            "digest": f"sha256:{sha256(cfg)}", "size": len(cfg)}, "layers": [
            {"digest": f"sha256:{sha256(layer)}"}, {"digest": f"sha256:{sha256(layer)}", "size": 1024}]})),
        "config": m(4, cfg),
        "config-strings": m(4, json.dumps({"created": "now", "config": {
            "Env": ["A=1", "B"], "Entrypoint": "/bin/sh", "Cmd": ["-c", "echo"], "WorkingDir": "", "User": "nobody"},
            "rootfs": {"diff_ids": [f"sha256:{sha256(b'not this layer')}"]}})),
    }
    for n, data in seeds.items():
        write("image_manifest", n, data)


def model_usage():
    """Byte 0 is the chunk size less one; the rest is an answer, a body or a string."""
    t = "model_usage"
    clean(t)
    write(t, "openai-sse", b"\x07" + b'data: {"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":3}}\n\ndata: [DONE]\n\n')
    write(t, "openai-json", b"\x00" + b'{"model":"gpt-4o","usage":{"prompt_tokens":120,"completion_tokens":30,"prompt_tokens_details":{"cached_tokens":100}}}')
    write(t, "anthropic-sse", b"\x10" + b'event: message_start\ndata: {"type":"message_start","message":{"model":"claude-3-5-haiku","usage":{"input_tokens":25,"cache_read_input_tokens":5}}}\n\nevent: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":15}}\n\n')
    write(t, "openrouter-cost", b"\x20" + b'{"model":"openai/gpt-4o-mini","usage":{"prompt_tokens":40,"completion_tokens":60,"cost":0.001}}')
    write(t, "ollama-native", b"\x05" + b'{"model":"llama3.1:8b","prompt_eval_count":26,"eval_count":290,"done":true}')
    write(t, "route-body", b"\x03" + b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}')
    write(t, "route-string", b"\x01" + b"openrouter.ai/google/gemini-2.0-flash-001=llama3.1:8b@127.0.0.1:11434")
    write(t, "prices", b"\x02" + b'{"m":{"input":1,"output":2,"cached_input":0.5}}')


# ---------------------------------------------------------------- ingress routes file
def ingress_routes():
    clean("ingress_routes")
    # The last line of each seed is the client path the harness routes.
    write("ingress_routes", "basic",
          b"/ :8000\n/api :9000 strip\n# comment\n/api/v2/ :9001 strip_prefix=false\n/api/v2/users\n")
    write("ingress_routes", "bad-lines",
          b"/x :0\n/y nope\n/ :80\n/ :81\n\xff\xfe :3\n/z :80 strip junk\n/apix\n")
    write("ingress_routes", "nested", b"/a :1\n/a/b :2 strip\n/a/b/c/ :3\n/a/b/c/d?q=1\n")
    write("ingress_routes", "many", b"".join(b"/r%d :%d\n" % (i, i + 1) for i in range(300)) + b"/r299/x\n")


# ---------------------------------------------------------------- Dockerfiles (matchlock build)
def dockerfile():
    clean("dockerfile")
    write("dockerfile", "multi-stage",
          b"# syntax=docker/dockerfile:1\nARG BASE=busybox\nFROM ${BASE} AS build\nARG V\n"
          b"ENV A=1 B=\"two words\"\nWORKDIR /src\nCOPY --chown=1:1 --chmod=755 . .\n"
          b"RUN make && \\\n  # comment\n\n  make install\nFROM scratch\n"
          b"COPY --from=build /out /\nCMD [\"/app\"]\n")
    write("dockerfile", "heredocs",
          b"FROM a\nRUN <<EOF\n#!/bin/sh\necho $V\nEOF\nRUN cat <<-'X' <<Y > /f\n\tx\n\tX\ny\nY\n"
          b"COPY <<EOF /etc/motd\nhello ${V:-you}\nEOF\n")
    write("dockerfile", "escape-and-config",
          b"# escape=`\nFROM a`\n  AS b\nSHELL [\"cmd\", \"/S\"]\nLABEL \"c d\"=\"e f\" x=y\n"
          b"EXPOSE 80 53/udp\nVOLUME [\"/data\"]\nSTOPSIGNAL SIGINT\nUSER app:app\n"
          b"HEALTHCHECK --interval=5s --retries=3 CMD curl -f localhost\nONBUILD RUN x\nENTRYPOINT [\"/e\"]\n")


def main():
    dockerfile()
    ingress_routes()
    classify_and_proxy()
    model_usage()
    dns_seeds = dns()
    rpc()
    proto()
    net(dns_seeds)
    vfs()
    images()
    total = {}
    for d in sorted(CORPUS.iterdir()):
        seeds = list(d.glob("seed-*"))
        total[d.name] = (len(seeds), sum(f.stat().st_size for f in seeds))
    for t, (n, size) in total.items():
        print(f"{t:16} {n:3} seeds {size:7} bytes")


if __name__ == "__main__":
    main()
