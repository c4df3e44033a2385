"""End to end, as a user runs btrm on a cluster: a Ray head started with `ray start --head`, training and
evaluation submitted with `ray job submit --working-dir .`, the scoring service deployed with `serve deploy`
and called over HTTP; then the three must agree: the evaluation job's accuracy is the one training
recorded in the export's manifest, and the service's rewards are the evaluation job's, pair by pair.

The cluster is this test's own: loopback dashboard, non-default ports, its own --temp-dir (so its session,
sockets and `ray_current_cluster` file are apart from any other Ray on the machine) and its own token
file (RAY_AUTH_TOKEN_PATH; ~/.ray is neither read nor written). It is stopped whatever fails on the way:
`serve shutdown`, SIGTERM to `ray start --block` (which stops every process it started), then SIGKILL to
whatever of this cluster is left, found by process ancestry and session (never by name), and a check that
none of it is left and its ports are free.
Nothing here uses the test session's private `ray.init(address="local")` instance, nor stops it.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import RAY_TRAIN_QUICK_POLL, REPO, write_parquet_shards

BIN = Path(sys.executable).parent  # the venv's bin: ray, serve and the python the jobs run with
if not (BIN / "ray").exists() and shutil.which("ray"):
    BIN = Path(shutil.which("ray")).parent
JOB_ENV_VARS = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline",
                "SWANLAB_MODE": "offline", **RAY_TRAIN_QUICK_POLL}
# The upload of --working-dir, as the README submits it: Ray leaves out what .gitignore (.venv, outputs, runs, ...)
# and .rayignore (.git) name.
RUNTIME_ENV = {"env_vars": JOB_ENV_VARS}
PORT_NAMES = ("gcs", "dashboard", "client_server", "object_manager", "node_manager", "agent_listen", "agent_grpc",
              "runtime_env_agent", "metrics_export", "http")
MAX_LENGTH = 256
TRAIN_PAIRS, EVAL_PAIRS, MAX_STEPS = 200, 60, 6
APP = "btrm"


def _free_ports(count: int) -> list[int]:
    """Distinct free ports (all held open until every one is chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT connections do not count
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _tail(text: str, chars: int = 15000) -> str:
    return text if len(text) <= chars else "...\n" + text[-chars:]


# ----------------------------------------------------------------------------------------------
# Which processes belong to the cluster: the descendants of `ray start` and its session (Ray workers
# take their own process group, job drivers their own session; ancestry finds both).


def _process_table() -> dict[int, tuple[int, int, int, str]]:
    """pid → (parent pid, session id, start time, state), from /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
        table[int(entry.name)] = (int(fields[1]), int(fields[3]), int(fields[19]), fields[0])
    return table


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when pytest dies (even by SIGKILL), so the cluster never outlives it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


@dataclass
class JobRun:
    submission_id: str
    status: str
    submit_output: str
    logs: str

    def describe(self) -> str:
        return f"job {self.submission_id}: {self.status}\n--- ray job logs ---\n{_tail(self.logs)}"


@dataclass
class Cluster:
    head: subprocess.Popen
    temp_dir: Path
    ports: dict[str, int]
    env: dict[str, str]  # for the CLI clients: this cluster's address and token, nothing else of Ray's
    head_log: Path
    seen: dict[int, int] = field(default_factory=dict)  # pid → start time of every process of the cluster seen

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    def cli(self, *args: str, timeout: float = 90, check: bool = True, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
        """`ray ...` / `serve ...` of this venv, from the repository root, against this cluster only."""
        command = [str(BIN / args[0]), *args[1:]]
        try:
            result = subprocess.run(command, env=env or self.env, cwd=REPO, capture_output=True, text=True,
                                    timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            raise AssertionError(f"`{shlex.join(args)}` still running after {timeout} s\n{_tail(out)}") from None
        if check:
            assert result.returncode == 0, (f"`{shlex.join(args)}` exited {result.returncode}\n"
                                            f"{_tail(result.stdout)}\n{_tail(result.stderr)}")
        self.track()
        return result

    def head_output(self) -> str:
        return _tail(self.head_log.read_text(errors="replace"), 6000) if self.head_log.exists() else ""

    # --- jobs

    def job_status(self, submission_id: str) -> str:
        result = self.cli("ray", "job", "status", "--address", self.address, "--log-style", "record",
                          "--log-color", "false", submission_id, check=False)
        text = result.stdout + result.stderr
        for pattern, status in ((r"Job '[^']+' succeeded", "SUCCEEDED"), (r"Job '[^']+' failed", "FAILED"),
                                (r"Job '[^']+' was stopped", "STOPPED")):
            if re.search(pattern, text):
                return status
        match = re.search(r"Status for job '[^']+': (\w+)", text)
        return match.group(1) if match else f"UNKNOWN ({_tail(text, 2000)})"

    def submit(self, name: str, entrypoint: list[str], timeout: float) -> JobRun:
        """`ray job submit --working-dir . -- <entrypoint>` from the repository root, as a user types it; waits
        for the job (the CLI tails its logs) and returns its final status with `ray job logs`."""
        submission_id = f"btrm-e2e-{name}-{uuid.uuid4().hex[:8]}"
        args = ["ray", "job", "submit", "--address", self.address, "--submission-id", submission_id,
                "--working-dir", ".", "--runtime-env-json", json.dumps(RUNTIME_ENV), "--log-style", "record",
                "--log-color", "false", "--", *entrypoint]
        try:
            submitted = self.cli(*args, timeout=timeout, check=False)
            output = submitted.stdout + submitted.stderr
        except AssertionError as e:  # still running: stop it, then report what it printed
            self.cli("ray", "job", "stop", "--address", self.address, submission_id, check=False, timeout=60)
            output = str(e)
        status = self.job_status(submission_id)
        logs = self.cli("ray", "job", "logs", "--address", self.address, submission_id, check=False).stdout
        return JobRun(submission_id, status, output, logs)

    # --- processes

    def _members(self) -> dict[int, int]:
        table = _process_table()
        children = defaultdict(list)
        for pid, (ppid, _, _, _) in table.items():
            children[ppid].append(pid)
        members, stack = set(), [self.head.pid]
        members.update(pid for pid, (_, sid, _, _) in table.items() if sid == self.head.pid)
        stack.extend(members)
        while stack:
            pid = stack.pop()
            for child in children.get(pid, []):
                if child not in members:
                    members.add(child)
                    stack.append(child)
        members &= set(table)
        return {pid: table[pid][2] for pid in members if table[pid][3] != "Z"}

    def track(self) -> None:
        if self.head.poll() is None:  # once it is gone, its pid and session id may be someone else's
            self.seen.update(self._members())

    def alive(self) -> dict[int, str]:
        """Processes of this cluster still running: every one seen (same pid and start time), every one
        descending from `ray start`, and any whose command line names this cluster's temp dir."""
        table = _process_table()
        alive = {pid for pid, start in self.seen.items()
                 if pid in table and table[pid][2] == start and table[pid][3] != "Z"}
        if self.head.poll() is None:
            alive |= set(self._members())
        marker = str(self.temp_dir)
        alive |= {pid for pid, row in table.items() if row[3] != "Z" and pid != os.getpid() and marker in _cmdline(pid)}
        return {pid: _cmdline(pid)[:160] for pid in sorted(alive)}

    def stop(self) -> tuple[dict[int, str], dict[int, str]]:
        """Stops this cluster and only it; returns (processes that needed a SIGKILL, processes still alive)."""
        self.track()
        if self.head.poll() is None:
            self.head.send_signal(signal.SIGTERM)  # `ray start --block` drains the node and stops its processes
            try:
                self.head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.head.pid, signal.SIGTERM)
                try:
                    self.head.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.head.pid, signal.SIGKILL)
                    self.head.wait(timeout=10)
        deadline = time.monotonic() + 20  # stragglers (watchers of a parent that is gone) exit by themselves
        while (left := self.alive()) and time.monotonic() < deadline:
            time.sleep(0.5)
        killed = dict(left)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while (left := self.alive()) and time.monotonic() < deadline:
                time.sleep(0.5)
            if not left:
                break
        return killed, left


def _start_cluster() -> Cluster:
    temp_dir = Path(tempfile.mkdtemp(prefix="btrm-e2e-", dir="/tmp"))  # short: Ray's socket paths must stay < 108
    ports = dict(zip(PORT_NAMES, _free_ports(len(PORT_NAMES))))
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # nothing of another Ray
    base.update(JOB_ENV_VARS)
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"  # `python` in a job entry point: this venv's
    base["RAY_AUTH_MODE"] = "token"
    base["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    # On SIGTERM, `ray start` would wait up to 30 s for the node to drain (for Serve on Kubernetes): a lone
    # test node has nowhere to drain to.
    base["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    base.pop("BTRM_API_TOKEN", None)
    address = f"http://127.0.0.1:{ports['dashboard']}"
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
    client_env = {**base, "RAY_ADDRESS": address, "RAY_API_SERVER_ADDRESS": address, "RAY_DASHBOARD_ADDRESS": address,
                  "NO_PROXY": no_proxy, "no_proxy": no_proxy}
    command = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
               "--port", str(ports["gcs"]),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"]),
               "--include-dashboard", "true", "--ray-client-server-port", str(ports["client_server"]),
               "--object-manager-port", str(ports["object_manager"]), "--node-manager-port", str(ports["node_manager"]),
               "--dashboard-agent-listen-port", str(ports["agent_listen"]),
               "--dashboard-agent-grpc-port", str(ports["agent_grpc"]),
               "--runtime-env-agent-port", str(ports["runtime_env_agent"]),
               "--metrics-export-port", str(ports["metrics_export"]),
               # More logical CPUs than the 2 cores: 2 train workers + data tasks + the job driver (PLATFORM.md).
               "--num-cpus", "6", "--num-gpus", "0", "--object-store-memory", str(400 * 1024 * 1024),
               "--temp-dir", str(temp_dir)]
    head_log = temp_dir / "ray-start.log"
    with open(head_log, "w") as log:
        head = subprocess.Popen(command, env=base, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    return Cluster(head=head, temp_dir=temp_dir, ports=ports, env=client_env, head_log=head_log)


def _wait_until_ready(cluster: Cluster, timeout: float = 180) -> None:
    """`ray start` says the runtime started, and the dashboard answers `ray job list` with the token."""
    deadline = time.monotonic() + timeout
    while True:
        assert cluster.head.poll() is None, (f"`ray start --head` exited {cluster.head.returncode}\n"
                                             f"{cluster.head_output()}")
        if "Ray runtime started" in cluster.head_output():
            result = cluster.cli("ray", "job", "list", "--address", cluster.address, check=False, timeout=60)
            if result.returncode == 0:
                return
            problem = _tail(result.stderr, 3000)
        else:
            problem = "`ray start` has not said 'Ray runtime started'"
        assert time.monotonic() < deadline, (f"the cluster was not ready after {timeout} s: {problem}\n"
                                             f"--- ray start ---\n{cluster.head_output()}")
        time.sleep(1)


@pytest.fixture(scope="module")
def cluster(shared_data):  # without ../shared/data there is nothing to run on it: skip before starting it
    cluster = _start_cluster()
    failure = None
    try:
        _wait_until_ready(cluster)
        yield cluster
    finally:
        killed, left = cluster.stop()
        closed = [name for name in ("gcs", "dashboard", "client_server", "http")
                  if not _port_is_free(cluster.ports[name])]
        if killed:
            print(f"\n[e2e] killed what outlived `ray start`'s shutdown: {killed}")
        if not left and not closed:
            shutil.rmtree(cluster.temp_dir, ignore_errors=True)
        failure = (f"processes of the cluster still alive after SIGKILL: {left}" if left else
                   f"ports of the cluster still taken after it stopped: {closed}" if closed else None)
    assert failure is None, failure


# ----------------------------------------------------------------------------------------------
# The jobs and the service


@dataclass
class Trained:
    run: JobRun
    model_dir: Path
    eval_dir: Path


@dataclass
class Evaluated:
    run: JobRun
    pairs: list[dict]
    summary: dict


@pytest.fixture(scope="module")
def data_dirs(hh_helpful, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("e2e-data")
    return (write_parquet_shards(hh_helpful["train"][:TRAIN_PAIRS], tmp / "train", shards=2),
            write_parquet_shards(hh_helpful["test"][:EVAL_PAIRS], tmp / "test"))


@pytest.fixture(scope="module")
def trained(cluster, tiny_qwen_dir, data_dirs, tmp_path_factory) -> Trained:
    train_dir, eval_dir = data_dirs
    out = tmp_path_factory.mktemp("e2e-train")
    run = cluster.submit("train", [
        "python", "jobs/train.py", "--model_name", tiny_qwen_dir, "--train_set_path", str(train_dir),
        "--eval_set_path", str(eval_dir), "--output_path", str(out / "model"), "--storage_path", str(out / "runs"),
        "--run_name", "e2e", "--num_workers", "2", "--max_steps", str(MAX_STEPS), "--max_length", str(MAX_LENGTH),
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16",
        "--gradient_accumulation_steps", "2", "--learning_rate", "2e-3", "--warmup_ratio", "0", "--logging_steps", "2",
        "--gradient_checkpointing", "false", "--deepspeed", "zero2", "--num_data_workers", "1",
        "--data_worker_cpus", "0.5"], timeout=420)
    assert run.status == "SUCCEEDED", f"{run.describe()}\n--- ray job submit ---\n{_tail(run.submit_output, 3000)}"
    return Trained(run, out / "model", eval_dir)


@pytest.fixture(scope="module")
def evaluated(cluster, trained, tmp_path_factory) -> Evaluated:
    """The evaluation job, reading the pairs through a processor given as a file of the uploaded directory
    (a relative path, as a user passes their own: the driver and every data task load it from their copy).
    The file is the standard processor's, so the pairs are training's eval pairs."""
    output = tmp_path_factory.mktemp("e2e-eval") / "pairs.parquet"
    run = cluster.submit("evaluate", [
        "python", "jobs/evaluate.py", "--model_path", str(trained.model_dir), "--data_path", str(trained.eval_dir),
        "--output", str(output), "--custom_bt_dataset_path", "btrm/processors/standard.py",
        "--custom_bt_dataset_name", "StandardDataset", "--batch_size", "32", "--num_data_workers", "1",
        "--data_worker_cpus", "0.5", "--show", "2"], timeout=300)
    assert run.status == "SUCCEEDED", f"{run.describe()}\n--- ray job submit ---\n{_tail(run.submit_output, 3000)}"
    summary = json.loads(output.with_suffix(".summary.json").read_text())
    return Evaluated(run, pq.read_table(output).to_pylist(), summary)


@dataclass
class Service:
    url: str
    token: str

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, trust_env=False)


def _serve_status(cluster: Cluster) -> dict:
    result = cluster.cli("serve", "status", "-a", cluster.address, check=False, timeout=60)
    try:
        status = yaml.safe_load(result.stdout)
    except yaml.YAMLError:
        status = None
    return status if isinstance(status, dict) else {"unreadable": result.stdout + result.stderr}


@pytest.fixture(scope="module")
def service(cluster, trained, tmp_path_factory):
    """serve/config.yaml as a user adapts it: the exported model, a free port on 127.0.0.1, the repository as
    the application's working_dir (`local://`: it is already on the node), a token file."""
    tmp = tmp_path_factory.mktemp("e2e-serve")
    token = secrets.token_hex(16)
    (tmp / "token").write_text(token + "\n")
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=cluster.ports["http"])
    (app,) = config["applications"]
    assert app["name"] == APP and app["import_path"] == "serve.app:app_builder"
    app["args"].update(model_path=str(trained.model_dir), token_file=str(tmp / "token"))
    app["runtime_env"] = {"working_dir": f"local://{REPO}", "env_vars": JOB_ENV_VARS}
    config_file = tmp / "serve.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    cluster.cli("serve", "deploy", "-a", cluster.address, str(config_file), timeout=120)
    try:
        deadline = time.monotonic() + 240
        while True:
            status = _serve_status(cluster)
            state = (status.get("applications") or {}).get(APP, {})
            if state.get("status") == "RUNNING":
                break
            assert state.get("status") not in ("DEPLOY_FAILED", "UNHEALTHY"), yaml.safe_dump(status)
            assert time.monotonic() < deadline, f"not RUNNING after 240 s:\n{yaml.safe_dump(status)}"
            time.sleep(3)
        url = f"http://127.0.0.1:{cluster.ports['http']}"
        with httpx.Client(base_url=url, timeout=10, trust_env=False) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"{url}/health did not answer 200 within 60 s of RUNNING"
                time.sleep(1)
        yield Service(url, token)
    finally:
        result = cluster.cli("serve", "shutdown", "-y", "-a", cluster.address, check=False, timeout=90)
        if result.returncode != 0:
            print(f"\n[e2e] serve shutdown exited {result.returncode}: {_tail(result.stderr, 2000)}")


# ----------------------------------------------------------------------------------------------
# Checks


def test_cluster_refuses_a_client_without_its_token(cluster):
    """Token auth is on (so the CLI calls that work do authenticate), and the dashboard is on loopback."""
    refused = cluster.cli("ray", "job", "list", "--address", cluster.address, check=False, timeout=60,
                          env={**cluster.env, "RAY_AUTH_TOKEN": "not-the-token"})
    assert refused.returncode != 0, refused.stdout
    assert "Invalid authentication token" in refused.stderr, _tail(refused.stderr, 3000)
    listening = [line.split()[1] for table in ("tcp", "tcp6")
                 for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]
                 if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == cluster.ports["dashboard"]]
    assert listening == [f"0100007F:{cluster.ports['dashboard']:04X}"], listening  # on 127.0.0.1 only


def test_working_dir_upload_leaves_out_the_venv_and_git(cluster, trained):
    # Both jobs uploaded the same tree: one package, unpacked in this cluster's session (not session_latest,
    # a link to it).
    packages = {p.resolve() for p in cluster.temp_dir.glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
                if p.is_dir()}
    assert len(packages) == 1, packages
    for package in packages:
        names = {p.name for p in package.iterdir()}
        assert {"btrm", "jobs", "serve", "pyproject.toml"} <= names
        assert not names & {".venv", ".git", "outputs", "runs", "btrm.egg-info"}, names
        size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
        assert size < 20 * 1024 * 1024, f"the uploaded working dir is {size / 2**20:.1f} MiB"


def test_training_job_logs_progress_and_exports(trained):
    logs = trained.run.logs
    steps = [(int(a), int(b)) for a, b in re.findall(r"\[btrm\] step (\d+)/(\d+) \(", logs)]
    assert steps and steps[-1] == (MAX_STEPS, MAX_STEPS), trained.run.describe()
    assert all(total == MAX_STEPS for _, total in steps), trained.run.describe()
    assert len(steps) == len(set(steps)), trained.run.describe()  # each progress line once
    assert "Reporting training result" not in logs, trained.run.describe()  # Ray Train's INFO noise stays out
    assert re.search(rf"\[btrm\] eval accuracy [0-9.]+ over {EVAL_PAIRS} pairs", logs), trained.run.describe()
    assert f"[btrm] model exported to {trained.model_dir}" in logs, trained.run.describe()
    # Workers draw no Ray Data progress bars (tqdm's "Running Dataset <name>: 0 row [...]") into the job log.
    assert "Running Dataset dataset_" not in logs, trained.run.describe()
    for name in ("config.json", "model.safetensors", "btrm.json", "eval_rewards.parquet", "tokenizer_config.json"):
        assert (trained.model_dir / name).is_file(), name


def test_evaluation_job_matches_the_training_export(trained, evaluated):
    manifest = json.loads((trained.model_dir / "btrm.json").read_text())
    summary, pairs = evaluated.summary, evaluated.pairs
    assert "[btrm] per-pair results" in evaluated.run.logs, evaluated.run.describe()
    assert summary["pairs"] == len(pairs) == manifest["eval"]["pairs"] == EVAL_PAIRS - summary["data"]["dropped_total"]
    assert summary["unscored"] == 0 and summary["tokenization"]["max_length"] == MAX_LENGTH
    # The same pairs, the same accuracy: training's final evaluation (DeepSpeed engine, sharded over two
    # workers) and the evaluation job (Ray Data actors holding the exported model).
    assert summary["accuracy"] == pytest.approx(manifest["eval"]["accuracy"], abs=1e-12), (summary, manifest["eval"])
    printed = re.search(r"\[btrm\] eval accuracy ([0-9.]+) over", trained.run.logs).group(1)
    assert f"{summary['accuracy']:.4f}" == printed
    engine = {row["id"]: row for row in pq.read_table(trained.model_dir / "eval_rewards.parquet").to_pylist()}
    assert set(engine) == {pair["id"] for pair in pairs}
    for pair in pairs:
        assert pair["reward_chosen"] == pytest.approx(engine[pair["id"]]["reward_chosen"], abs=1e-4), pair["id"]
        assert pair["reward_rejected"] == pytest.approx(engine[pair["id"]]["reward_rejected"], abs=1e-4), pair["id"]


def test_service_scores_equal_the_evaluation_job(service, evaluated, hh_helpful):
    """Every evaluated pair, in one batch request (max_pairs 64 in serve/config.yaml), and one on its own."""
    originals = {p["id"]: p for p in hh_helpful["test"][:EVAL_PAIRS]}
    chosen = evaluated.pairs
    assert any(p["truncated"] for p in chosen)  # prompts cut to max_length, by the manifest's policy

    def body(pair: dict) -> dict:
        original = originals[pair["id"]]
        return {"id": pair["id"], "messages": original["chosen"][:-1], "chosen": original["chosen"][-1]["content"],
                "rejected": original["rejected"][-1]["content"]}

    with service.client() as client:
        batch = client.post("/compare", json={"pairs": [body(p) for p in chosen]})
        single = client.post("/compare", json=body(chosen[0]))
    with service.client(token="not-the-token") as intruder:
        refused = intruder.post("/compare", json=body(chosen[0]))
    assert batch.status_code == 200, batch.text
    assert single.status_code == 200, single.text
    assert refused.status_code == 401, refused.text
    results = batch.json()["results"]
    assert [r["id"] for r in results] == [p["id"] for p in chosen]
    for result, pair in zip(results, chosen):
        assert result["reward_chosen"] == pytest.approx(pair["reward_chosen"], abs=1e-4), pair["id"]
        assert result["reward_rejected"] == pytest.approx(pair["reward_rejected"], abs=1e-4), pair["id"]
        assert result["truncated_prompt_tokens"] == pair["truncated_tokens"], pair["id"]
    assert single.json()["reward_chosen"] == pytest.approx(results[0]["reward_chosen"], abs=1e-4)


def test_btrm_serve_on_a_cluster_leaves_the_services_there_alone(cluster, trained, service):
    """`btrm serve --ray_address` on a cluster that already serves: a wrong token file stops it before it
    touches the cluster (it used to start Serve, fail, and shut down every application there), and an
    application of its name is refused, not replaced; the service deployed there answers after both."""
    command = [str(BIN / "btrm"), "serve", "--model_path", str(trained.model_dir),
               "--ray_address", f"127.0.0.1:{cluster.ports['gcs']}"]
    typo = subprocess.run([*command, "--token_file", "/nonexistent/token"], env=cluster.env, cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    taken = subprocess.run(command, env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=180)
    cluster.track()
    assert typo.returncode != 0 and "--token_file /nonexistent/token: no such file" in typo.stderr, typo.stderr
    assert taken.returncode != 0 and f"already serves an application named '{APP}'" in taken.stderr, _tail(taken.stderr)
    assert _serve_status(cluster)["applications"][APP]["status"] == "RUNNING"
    with service.client() as client:
        assert client.get("/health").status_code == 200


def test_a_job_refuses_to_write_into_its_unpacked_working_directory(cluster, data_dirs):
    """Relative paths to write to in a job submitted with --working-dir name the job's temporary copy of the
    repository: refused before any work, every such option named at once (--output_path, the default
    --storage_path, and the default --tracking_dir of a job that reports to a tracker: an offline run's files
    would go with the session)."""
    train_dir, _ = data_dirs
    run = cluster.submit("relative", ["python", "jobs/train.py", "--train_set_path", str(train_dir),
                                      "--output_path", "outputs/rm", "--report_to", "wandb"], timeout=180)
    assert run.status == "FAILED", run.describe()
    assert ("--output_path outputs/rm, --storage_path ./runs, --tracking_dir ./tracking: relative paths, and this Ray "
            "job runs in its unpacked copy") in run.logs, run.logs
