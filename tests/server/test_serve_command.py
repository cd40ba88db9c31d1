"""`slimlm serve`: impossible flags are one-line errors (exit 2) before anything loads, and SIGTERM
ends in-flight requests explicitly and stops the process within seconds."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from slimlm.cli import main  # noqa: E402


@pytest.mark.parametrize("flags, text", [
    (["--slots", "0"], "slots 0 must be at least 1 (--slots)"),
    (["--port", "70000"], "port 70000 must be in 1..65535 (--port)"),
    (["--port", "0"], "port 0 must be in 1..65535 (--port)"),
    (["--max-queue", "0"], "--max-queue"),
    (["--max-tokens", "-1"], "--max-tokens"),
    (["--max-len", "1"], "--max-len"),
    (["--timeout", "0"], "--timeout"),
    (["--timeout", "nan"], "--timeout"),
    (["--shutdown-grace", "-1"], "--shutdown-grace"),
])
def test_impossible_flags_are_one_line_errors(flags, text, capsys):
    code = main(["serve", "demo", *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"slimlm serve: error: {err.split('error: ', 1)[1].strip()}"
    assert text in err and len(err.strip().splitlines()) == 1


def test_a_taken_port_is_a_one_line_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code = main(["serve", "demo", "--port", str(taken.getsockname()[1])])
    err = capsys.readouterr().err
    assert code == 2 and "cannot listen on 127.0.0.1" in err and len(err.strip().splitlines()) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_fails_in_flight_requests_explicitly_and_exits(tiny_folder):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slimlm", "serve", str(tiny_folder("llama")), "--port", str(port),
                             "--slots", "1", "--max-len", "256", "--shutdown-grace", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().decode().startswith("serving")
        body = json.dumps({"prompt": "Once", "max_tokens": 250, "n": 8, "stream": True}).encode()  # seconds of work
        stream = urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", data=body), timeout=30)
        assert stream.readline().startswith(b"data: {")  # running, holding the only slot; 7 more queued
        waiting = {}

        def wait_in_queue():
            body = json.dumps({"prompt": "x", "max_tokens": 5}).encode()
            req = urllib.request.Request(url + "/v1/completions", data=body)
            try:
                urllib.request.urlopen(req, timeout=30)
            except urllib.error.HTTPError as e:
                waiting["reply"] = (e.code, json.loads(e.read()))

        queued = threading.Thread(target=wait_in_queue)
        queued.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        events = [line[6:].strip() for line in stream if line.startswith(b"data: ")]
        queued.join(timeout=10)
        proc.wait(timeout=10)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert took < 5, took
    assert proc.returncode in (0, -signal.SIGTERM), proc.stderr.read().decode()[-2000:]
    assert events[-1] == b"[DONE]" and "shutting down" in json.loads(events[-2])["error"]["message"]
    assert waiting["reply"][0] == 503 and "shutting down" in waiting["reply"][1]["error"]["message"]


def test_the_serve_verb_checks_its_settings_before_loading():
    import slimlm
    from slimlm.core.errors import SlimError

    for settings, text in (({"slots": 0}, "slots"), ({"port": 70000}, "port"), ({"max_queue": 0}, "max_queue"),
                           ({"timeout": -1}, "timeout"), ({"api_key": "caf\u00e9"}, "ASCII")):
        with pytest.raises(SlimError, match=text):
            slimlm.serve("no/such/folder", **settings)  # refused before the (missing) model is looked for


def test_ctrl_c_to_the_process_group_lets_running_requests_finish(tiny_folder):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it; systemd sends SIGTERM the same
    way) reaches the engine process too: it leaves the shutdown to the front end, so a running stream
    finishes within the grace instead of failing, and the server exits 130."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slimlm", "serve", str(tiny_folder("llama")), "--port", str(port),
                             "--slots", "1", "--max-len", "256", "--shutdown-grace", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        assert proc.stdout.readline().decode().startswith("serving")
        body = json.dumps({"prompt": "Once", "max_tokens": 250, "stream": True}).encode()  # running (a waiting one fails)
        stream = urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", data=body), timeout=60)
        assert stream.readline().startswith(b"data: {")
        os.killpg(proc.pid, signal.SIGINT)
        events = [line[6:].strip() for line in stream if line.startswith(b"data: ")]
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert events[-1] == b"[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert "error" not in last and last["choices"][0]["finish_reason"] in ("length", "stop"), last
    assert proc.returncode == 130, proc.stderr.read().decode()[-2000:]
