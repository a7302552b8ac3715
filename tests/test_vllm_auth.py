"""GRPO's vLLM server is closed by default: on 127.0.0.1 when the trainer shares its node, and
behind the job's token when other nodes reach it (slurm.vllm_nodes=1). The token middleware runs
in a real HTTP server on 127.0.0.1 (FastAPI + uvicorn, as vLLM loads a `--middleware`, with a
stand-in for vLLM's routes: /health, /v1/models and the dev-mode /collective_rpc); the client is
a `requests.Session`, TRL's VLLMClient's own, reading the token from $NETRC."""

from __future__ import annotations

import importlib.util
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from rlm_train import cli
from rlm_train.serve.vllm_auth import MIDDLEWARE, TOKEN_FILE_ENV, RequireToken, TokenError, main, read_token, write_job_token

REPO = Path(__file__).resolve().parents[1]
needs_server = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "requests")),
                                  reason="needs fastapi, uvicorn and requests")


class VLLMStandIn:
    """A stand-in for vLLM's HTTP server: its routes, with RequireToken added the way vLLM adds a
    `--middleware` class (app.add_middleware), served by uvicorn on 127.0.0.1 in a thread."""

    def __init__(self) -> None:
        import uvicorn
        from fastapi import FastAPI

        app = FastAPI()
        app.get("/health")(lambda: {})
        app.get("/v1/models")(lambda: {"data": [{"id": "stand-in"}]})
        app.post("/collective_rpc")(lambda: {"results": []})
        app.add_middleware(RequireToken)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "VLLMStandIn":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the stand-in server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@needs_server
def test_a_server_for_other_nodes_answers_only_the_jobs_token(tmp_path, monkeypatch):
    import requests

    token_file, netrc = tmp_path / "vllm-token", tmp_path / "vllm-netrc"
    monkeypatch.setenv(TOKEN_FILE_ENV, str(token_file))
    monkeypatch.setenv("NETRC", str(netrc))
    assert main(["127.0.0.1"]) == 0  # what slurm/grpo.sbatch runs: python -m rlm_train.serve.vllm_auth HOST
    for file in (token_file, netrc):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
    token = read_token(token_file)
    assert len(token) == 64 and f"machine 127.0.0.1 login rlm-train password {token}" in netrc.read_text()

    with VLLMStandIn() as server:
        bare = requests.Session()
        bare.trust_env = False  # no netrc: what anyone else on the network sends
        assert bare.get(f"{server.url}/health", timeout=10).status_code == 200  # the job's health wait
        assert bare.get(f"{server.url}/v1/models", timeout=10).status_code == 401
        assert bare.post(f"{server.url}/collective_rpc", json={"method": "x"}, timeout=10).status_code == 401
        wrong = bare.post(f"{server.url}/collective_rpc", headers={"Authorization": "Bearer " + "0" * 64}, timeout=10)
        assert wrong.status_code == 401
        ok = bare.post(f"{server.url}/collective_rpc", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert ok.status_code == 200
        trl_like = requests.Session()  # TRL's VLLMClient: a plain Session, netrc from $NETRC
        assert trl_like.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"] == "stand-in"
        assert trl_like.post(f"{server.url}/collective_rpc", timeout=10).status_code == 200
        assert requests.get(f"{server.url}/v1/models", timeout=10).status_code == 200  # module-level get, as check_server


def test_the_token_file_must_be_private_and_set(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    write_job_token("node1", token_file, tmp_path / "netrc")
    os.chmod(token_file, 0o644)
    with pytest.raises(TokenError, match="other users can read it"):
        read_token(token_file)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    with pytest.raises(TokenError, match=f"{TOKEN_FILE_ENV} is not set"):
        RequireToken(app=None)  # vLLM would fail closed: no server without a token
    monkeypatch.delenv("NETRC", raising=False)
    assert main(["node1"]) == 2


def grpo_vllm_command(capsys, *overrides: str) -> str:
    assert cli.main(["grpo", "--recipe", str(REPO / "recipes/qwen3-8b-grpo.yaml"), "--vllm-command", *overrides]) == 0
    return capsys.readouterr().out.strip()


def test_grpo_vllm_binds_loopback_unless_it_serves_another_node(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    local = grpo_vllm_command(capsys)
    assert "--host 127.0.0.1 " in local and "--middleware" not in local and "0.0.0.0" not in local
    remote = grpo_vllm_command(capsys, "rollout.vllm_server_url=http://node7:8000", "rollout.vllm_gpus=8")
    assert f"--host 0.0.0.0 --port 8000 --middleware {MIDDLEWARE} --data-parallel-size 8 " in remote


def test_the_grpo_job_script_closes_its_server(tmp_path, monkeypatch):
    """The rendered GRPO job: on a shared node the server line is asked for a 127.0.0.1 URL; with a
    node of its own (vllm_nodes=1) the job makes a token (mode 600, in the state dir) before the
    server starts, serves on all of that node's GPUs, and the trainers read the token from $NETRC."""
    import yaml

    monkeypatch.chdir(REPO)
    recipe = tmp_path / "p.yaml"
    stages = [{"name": "grpo", "run": "grpo", "recipe": "recipes/qwen3-8b-grpo.yaml",
               "slurm": {"nodes": 1, "gpus_per_node": 8, "time": "01:00:00"}},
              {"name": "grpo2", "run": "grpo", "recipe": "recipes/qwen3-8b-grpo.yaml", "after": [],
               "slurm": {"nodes": 3, "vllm_nodes": 1, "gpus_per_node": 8, "time": "01:00:00"}}]
    recipe.write_text(yaml.safe_dump({"name": "p", "out_dir": str(tmp_path / "out"), "stages": stages}))
    from rlm_train.launch.jobs import build_scripts, load_launch_pipeline
    from rlm_train.launch.render import render

    pipeline = load_launch_pipeline(str(recipe), [], None, None)
    shared, own = (render(job, "p", tmp_path / "state", REPO) for job in build_scripts(pipeline, pipeline.stages))
    assert "VLLM_NODES=0" in shared and "VLLM_NODES=1" in own
    for script in (shared, own):
        start = script.index('if [ "$VLLM_GPUS" -gt 0 ]; then')
        vllm_part = script[start:script.index("SERVER_PIDS+=($!)", start)]
        node_branch, local_branch = vllm_part.split("    VLLM_HOST=127.0.0.1", 1)
        assert local_branch.index('VLLM_CMD=$(rlm grpo --recipe "$RECIPE" --vllm-command '
                                  '"rollout.vllm_server_url=http://$VLLM_HOST:$VLLM_PORT")') >= 0
        token_at = node_branch.index(f'export {TOKEN_FILE_ENV}="$STATE/')
        assert 'NETRC="$STATE/' in node_branch and node_branch.index('-m rlm_train.serve.vllm_auth "$VLLM_HOST"') > token_at
        assert node_branch.index("VLLM_GPUS=$GPUS_PER_NODE") < node_branch.index('"rollout.vllm_gpus=$VLLM_GPUS"')
        assert node_branch.index("--vllm-command") < node_branch.index("srun ")


# Stand-ins for the job's run: Slurm's `scontrol` (the job's two nodes: two loopback addresses) and
# `srun` (the step runs here; the training step is replaced by a probe that calls the server as TRL's
# client does), and `vllm serve` (the stand-in server, loading the --middleware it is given, as vLLM).
SCONTROL = "#!/bin/sh\nprintf '127.0.0.2\\n127.0.0.3\\n'\n"
SRUN = """#!/bin/bash
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done   # srun's own options
case "$*" in *accelerate.commands.launch*) exec "$PY" "$PROBE" ;; esac
exec "$@"
"""
VLLM = """#!{python}
import importlib, json, os, sys
import uvicorn
from fastapi import FastAPI
args = sys.argv[2:]
opt = lambda flag: args[args.index(flag) + 1]
with open(os.environ["SERVER_RECORD"], "w") as fh:
    json.dump({{"argv": sys.argv[1:], "token_file": os.environ.get("{token_env}"),
               "dev_mode": os.environ.get("VLLM_SERVER_DEV_MODE")}}, fh)
app = FastAPI()
app.get("/health")(lambda: {{}})
app.get("/v1/models")(lambda: {{"data": [{{"id": "stand-in"}}]}})
app.post("/collective_rpc")(lambda: {{"results": []}})
if "--middleware" in args:
    module, name = opt("--middleware").rsplit(".", 1)
    app.add_middleware(getattr(importlib.import_module(module), name))
uvicorn.run(app, host=opt("--host"), port=int(opt("--port")), log_level="error")
"""
PROBE = """import json, os, stat, requests
url = os.environ["EXTRA_ARGS"].split("rollout.vllm_server_url=", 1)[1].split()[0]
bare = requests.Session()
bare.trust_env = False
trl = requests.Session()
secrets = [os.environ["NETRC"], os.environ["RLM_TRAIN_VLLM_TOKEN_FILE"]]
out = {"url": url, "netrc": os.environ.get("NETRC"), "modes": [oct(stat.S_IMODE(os.stat(p).st_mode)) for p in secrets],
       "bare": [bare.get(url + "/v1/models").status_code, bare.post(url + "/collective_rpc").status_code],
       "trl": [trl.get(url + "/v1/models").status_code, trl.post(url + "/collective_rpc").status_code]}
with open(os.environ["PROBE_RECORD"], "w") as fh:
    json.dump(out, fh)
"""


@needs_server
def test_a_grpo_job_whose_server_has_a_node_of_its_own_runs_it_behind_the_jobs_token(tmp_path, monkeypatch):
    """slurm/grpo.sbatch with vllm_nodes=1, as `rlm-train launch` renders it, run by bash with the
    stand-ins above: the job writes a token (mode 600, in its state dir) before the server starts;
    the server binds every interface, on all of its node's GPUs, loading the token middleware; the
    training step (on the other node) reaches it through $NETRC, while a client without it gets 401.
    The token and the netrc are gone when the job ends; its logs and exit record stay."""
    import json
    import subprocess
    import sys

    import yaml

    from rlm_train.launch.jobs import build_scripts, load_launch_pipeline
    from rlm_train.launch.render import render
    from rlm_train.serve.launcher import free_port

    monkeypatch.chdir(REPO)
    port = free_port()
    recipe = tmp_path / "p.yaml"
    recipe.write_text(yaml.safe_dump({"name": "p", "out_dir": str(tmp_path / "out"), "stages": [
        {"name": "grpo", "run": "grpo", "recipe": "recipes/qwen3-8b-grpo.yaml",
         "with": {"rollout": {"vllm_server_url": f"http://127.0.0.1:{port}"}},
         "slurm": {"nodes": 2, "vllm_nodes": 1, "gpus_per_node": 8, "time": "01:00:00"}}]}))
    pipeline = load_launch_pipeline(str(recipe), [], None, None)
    pipeline.write_stage_recipes()
    state = tmp_path / "state"
    for sub in ("logs", "exit"):
        (state / sub).mkdir(parents=True)
    (job,) = build_scripts(pipeline, pipeline.stages)
    script = tmp_path / "grpo.sbatch"
    script.write_text(render(job, "p", state, REPO))
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN),
                       ("vllm", VLLM.format(python=sys.executable, token_env=TOKEN_FILE_ENV))):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    (tmp_path / "probe.py").write_text(PROBE)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-2]",
           "PROBE": str(tmp_path / "probe.py"), "PROBE_RECORD": str(tmp_path / "probe.json"),
           "SERVER_RECORD": str(tmp_path / "server.json")}
    env.pop(TOKEN_FILE_ENV, None)
    env.pop("NETRC", None)
    run = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (state / "exit" / "grpo.42").read_text().strip() == "0"

    token_file, netrc = state / "grpo-vllm-token.42", state / "grpo-vllm-netrc.42"
    assert not token_file.exists() and not netrc.exists()  # removed with the job
    assert (state / "logs" / "grpo-vllm.42.log").is_file()
    server = json.loads((tmp_path / "server.json").read_text())
    assert server["token_file"] == str(token_file) and server["dev_mode"] == "1"
    argv = " ".join(server["argv"])
    assert f"--host 0.0.0.0 --port {port} --middleware {MIDDLEWARE} --data-parallel-size 8 " in argv
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["url"] == f"http://127.0.0.2:{port}" and probe["netrc"] == str(netrc)
    assert probe["modes"] == ["0o600", "0o600"]  # while the job ran: its user's alone
    assert probe["bare"] == [401, 401] and probe["trl"] == [200, 200]
