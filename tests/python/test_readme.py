"""The SDK README's examples, run unmodified.

The code blocks are read from the installed package's own metadata (the README that PyPI shows),
so what runs here is exactly what users copy. `alpine:latest` and `python:3.12-alpine` are local
test images under those names (conftest.py); the environment variables the examples read are set
to dummy secrets.
"""

import contextlib
import importlib.metadata
import io
import os
import re
import subprocess

import pytest

BLOCKS = re.findall(r"```python\n(.*?)```", importlib.metadata.metadata("matchlock").get_payload() or "", re.S)


def test_readme_has_examples():
    assert importlib.metadata.version("matchlock") == "0.2.17"
    assert len(BLOCKS) >= 10


# The one example that starts `sudo /usr/local/bin/matchlock`. It runs with real sudo (setup
# installs it; root needs no password), but on the binary under test: a test must not install
# into a system path.
NEEDS_SUDO = "use_sudo=True"
SYSTEM_BINARY = '"/usr/local/bin/matchlock"'


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example(index, monkeypatch):
    code = BLOCKS[index]
    if NEEDS_SUDO in code:
        sudo_works = subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0
        if not sudo_works and os.geteuid() != 0:
            pytest.skip("the example runs `sudo matchlock`; this user has no passwordless sudo")
        assert sudo_works, "sudo is missing or refuses root: scripts/setup installs it"
        assert SYSTEM_BINARY in code
        code = code.replace(SYSTEM_BINARY, repr(os.environ["MATCHLOCK_BIN"]))
    monkeypatch.setenv("API_KEY", "sk-test-api-key")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-key")
    # Snippets build on earlier ones the way a reader's session would (one uses `Sandbox` without
    # importing it), so every block runs with the SDK's public names already imported.
    ns = {"__name__": "readme_example"}
    exec("import os, sys\nfrom matchlock import *", ns)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"<README example {index}>", "exec"), ns)
    text = out.getvalue()
    # Where the README says what an example prints, check it.
    if 'client.exec("echo hello from the sandbox")' in code:
        assert "hello from the sandbox" in text
    if "print(1+1)" in code:
        assert "0\n2\n" in text
    if "Hello, world!" in code and "read_file" in code:
        assert "Hello, world!" in text
        assert "hello.txt (13 bytes, dir=False)" in text
    if "Exit code:" in code:
        assert "1\n2\n3\n" in text and "Exit code: 0" in text
    if "port_forward(" in code and "bindings[0]" in code:
        assert "127.0.0.1 18080 8080" in text
    if "client.vm_id" in code:
        assert "vm-" in text
