"""Fixtures for the server tests: the built `edgechat` binary serving the tiny Gemma 3 fixture (with the
byte-level tokenizer of tests/fixtures/tiny/make_tokenizer.py) and, when present, the real demo model.

The binary is $EDGECHAT_BIN (cargo xtask test sets it), else target/debug/edgechat. The real model is
looked up in $EDGECHAT_HOME (`cargo xtask demo-model` puts it there); its tests are skipped without it,
unless EDGECHAT_REQUIRE_REAL_MODEL=1.
"""

import os
import re
import subprocess
import threading
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("EDGECHAT_BIN", ROOT / "target/debug/edgechat"))
TINY = "tiny-gemma3"
REAL = "gemma-3-270m"


def edgechat(home, *args, check=True):
    env = {**os.environ, "EDGECHAT_HOME": str(home)}
    env.pop("EDGECHAT_LOG", None)
    return subprocess.run([str(BIN), *args], env=env, capture_output=True, text=True, check=check, timeout=600)


class Server:
    """`edgechat serve` on a free port; stopped at the end of the test (or module)."""

    def __init__(self, home, *args, log=None):
        env = {**os.environ, "EDGECHAT_HOME": str(home)}
        env.pop("EDGECHAT_LOG", None)
        if log:
            env["EDGECHAT_LOG"] = log
        self.process = subprocess.Popen([str(BIN), "serve", "--port", "0", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr = []
        threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True).start()
        line = self.process.stdout.readline()
        match = re.search(r"http://(\S+)/v1", line)
        if not match:
            self.process.kill()
            raise RuntimeError(f"edgechat serve did not start: {line!r} {''.join(self.stderr)}")
        self.base = f"http://{match.group(1)}"

    def client(self, api_key="none", **kwargs):
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=api_key, max_retries=0, timeout=600, **kwargs)

    def stop(self):
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    edgechat(home, "import", str(ROOT / "tests/fixtures/tiny/tiny-gemma3"), "--tokenizer", str(ROOT / "tests/fixtures/tiny/tokenizer"), "--id", TINY)
    return home


@pytest.fixture(scope="module")
def server(tiny_home):
    s = Server(tiny_home)
    yield s
    s.stop()


@pytest.fixture
def start(tiny_home):
    """Starts a server with extra flags, stopped after the test."""
    started = []

    def start(*args, home=None, log=None):
        s = Server(home or tiny_home, *args, log=log)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def real_home():
    home = os.environ.get("EDGECHAT_HOME")
    if home and (Path(home) / "Models" / REAL / "manifest.json").exists():
        return Path(home)
    if os.environ.get("EDGECHAT_REQUIRE_REAL_MODEL") == "1":
        pytest.fail(f"EDGECHAT_REQUIRE_REAL_MODEL=1 but {REAL} is not in $EDGECHAT_HOME (run `cargo xtask demo-model`)")
    pytest.skip(f"{REAL} is not downloaded (cargo xtask demo-model)")
