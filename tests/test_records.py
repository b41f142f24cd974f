"""The run directory's records (backend/records.py) and the net helpers (backend/net.py)."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path
from typing import Iterator

import pytest

from backend import net, records
from backend.records import MetricRecord, ProcessInfo, RolloutRecord, RunInfo, RunInfoError
from backend.rundir import RunDirectory, write_json_atomic


def _info() -> RunInfo:
    return RunInfo(
        name="r", status=records.RUN_RUNNING, supervisor_pid=123, started_at=1.0, ports={"server": 8000, "sync": 9},
        server_url="http://127.0.0.1:8000", max_steps=5,
        processes={"server": ProcessInfo("server", ["python"], "logs/server.log", status=records.HEALTHY, pid=7,
                                         health_url="http://127.0.0.1:8000/health"),
                   "prepare": ProcessInfo("prepare", [], "logs/prepare.log", status=records.EXITED)},
        history=[records.HistoryEntry(1.0, None, records.RUN_STARTING)],
    )


def test_run_info_round_trips_through_run_json(tmp_path: Path) -> None:
    rd = RunDirectory(tmp_path)
    write_json_atomic(rd.run_json, _info().to_json())
    back = rd.run_info()
    assert back == _info()
    assert [p.name for p in back.procs()] == ["prepare", "server"]  # display order
    assert back.pids() == {"server": 7} and back.proc("server").health_url.endswith("/health")
    assert not back.finished and RunDirectory(tmp_path / "missing").run_info() is None


@pytest.mark.parametrize("version,says", [(1, "older vlmrl"), (records.RUN_JSON_VERSION + 1, "newer vlmrl"),
                                          (None, "no schema version")])
def test_another_run_json_version_gets_a_clear_message(tmp_path: Path, version: int | None, says: str) -> None:
    data = _info().to_json()
    if version is None:
        del data["version"]
    else:
        data["version"] = version
    (tmp_path / "run.json").write_text(json.dumps(data))
    with pytest.raises(RunInfoError, match=says) as err:
        RunInfo.read(tmp_path / "run.json")
    assert str(tmp_path / "run.json") in str(err.value)


def test_a_wrong_field_is_named(tmp_path: Path) -> None:
    data = _info().to_json()
    data["processes"]["server"]["status"] = "sleeping"
    with pytest.raises(RunInfoError, match=r"processes\.server: status must be one of"):
        RunInfo.from_json(data)
    data = _info().to_json()
    data["ports"] = {"server": "8000"}
    with pytest.raises(RunInfoError, match="ports must be an object of port numbers"):
        RunInfo.from_json(data)


def test_a_half_written_run_json_reads_as_not_yet_there(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text('{"version": 2, "na')
    assert RunInfo.read(tmp_path / "run.json") is None


def test_metric_record_keeps_values_and_writes_nan_as_null() -> None:
    m = MetricRecord(3, {records.LOSS: float("nan"), records.REWARD_MEAN: 0.5, records.DROPPED: 2, "flag": True})
    assert m.get(records.REWARD_MEAN) == 0.5 and m.get(records.DROPPED) == 2.0
    assert m.get("flag") is None and m.get(records.KL) is None  # not a number / absent
    assert m.get(records.LOSS) != m.get(records.LOSS) and m.finite(records.LOSS) is None  # NaN
    line = m.to_json()
    assert line[records.STEP] == 3 and line[records.LOSS] is None
    assert MetricRecord.from_json(json.loads(json.dumps(line))) == MetricRecord(3, line)
    assert MetricRecord.from_json({records.LOSS: 1.0}) is None and MetricRecord.from_json([1]) is None


def test_step_line_shows_missing_values_only_when_asked() -> None:
    rec = {records.STEP: 2, records.REWARD_MEAN: 0.5, records.STEP_S: 0.25}
    assert records.step_line(rec, 4) == "step 2/4 reward=0.50 0.25s/it"
    assert records.step_line(rec, 4, missing="-") == "step 2/4 reward=0.50 loss=- ir=- ent=- kl=- 0.25s/it"
    assert records.step_line({records.STEP: 2}, 0, step_s=1.5) == "step 2 1.50s/it"


def test_rollout_record_round_trips_and_names_a_bad_field() -> None:
    r = RolloutRecord(step=1, index=2, group=0, example_id="e", prompt="<image> colour?", completion="red",
                      reward=1.0, reward_parts={"correct": 1.0}, advantage=0.5, answer="red", images=["rollouts/1/e-0.png"])
    assert RolloutRecord.from_json(json.loads(json.dumps(r.to_json()))) == r
    assert records.rollout_position(r.to_json()) == (1, 2)
    with pytest.raises(ValueError, match="'reward'"):
        RolloutRecord.from_json({**r.to_json(), "reward": "high"})


def test_hosts_and_urls() -> None:
    assert net.connect_host("0.0.0.0") == "127.0.0.1" and net.connect_host("") == "127.0.0.1"
    assert net.connect_host("::") == "::1" and net.connect_host("10.0.0.5") == "10.0.0.5"
    assert net.http_url("::", 8000) == "http://[::1]:8000" and net.http_url("0.0.0.0", 80) == "http://127.0.0.1:80"
    assert net.is_loopback("localhost") and net.is_loopback("127.0.0.1") and not net.is_loopback("10.0.0.5")


def test_port_checks_see_a_listening_socket() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not net.port_free("127.0.0.1", port) and net.bind_error("127.0.0.1", port) is not None
    assert net.port_free("127.0.0.1", net.free_port())


@pytest.fixture
def http_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            status = 200 if self.path == "/health" else 503
            body = json.dumps({"status": "ok"} if status == 200 else {"error": {"message": "warming up"}}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_probe_reports_status_latency_and_reason(http_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a shell proxy must not swallow local probes
    ok = net.probe_http(http_server + "/health")
    assert ok.ok and ok.status == 200 and ok.latency_ms is not None and ok.json() == {"status": "ok"}
    busy = net.probe_http(http_server + "/other")
    assert not busy.ok and busy.status == 503 and busy.error == "HTTP 503: warming up"
    down = net.probe_http(f"http://127.0.0.1:{net.free_port()}/health", timeout_s=1.0)
    assert not down.ok and down.status is None and "Connection" in (down.error or "")
