"""Routing benchmark on a real NVIDIA Dynamo 1.6.1 deployment on CPU: N `dynamo.vllm` workers
behind the KV router (`dynamo.frontend --router-mode kv`), a multi-turn chat workload whose
working set exceeds each worker's vLLM cache. Mean TTFT and fleet hit rate in three arms, each on
a fresh deployment (tests/dynamo_app/deployment.py) serving the same seeded workload:

  events     XConnector on, its host-memory blocks reported as KV events: the router sees them;
  no-events  XConnector on, `report_kv_events` off: the router sees only vLLM's GPU events;
  off        XConnector disabled on the workers (XCONNECTOR_DISABLE=1): vLLM's GPU cache only.

The workload: S chat sessions, each with a distinct random prefix (its system prompt and
history), then T turns; a turn's prompt is the session's previous prompt plus a new user message
(random token ids, seeded), so it shares the whole prior conversation as a prefix. Sessions are
interleaved round-robin, so between two turns of one session the others push its blocks out of
its worker's small vLLM cache (--gpu-blocks blocks of 32 tokens); only a copy elsewhere
(XConnector's host memory) can still serve them. Before each request the benchmark waits until
the router has applied every KV event the workers sent (`Deployment.settle`): this isolates
routing quality from event lag. Requests stream (TTFT: first text chunk at the client, through
the frontend) and run one at a time. A short warm-up (random prompts, each sent twice) precedes
the workload in every arm and is not counted.

Per arm: requests; TTFT mean and p50 (all turns) and mean over turns >= 2; fleet hit rate =
sum(cached_tokens) / sum(prompt_tokens) from the responses' usage; the cached tokens by source
from vLLM's counters (vLLM's own prefix cache, or loaded by XConnector from host memory); the mean
`host_pinned_blocks` of the router's "Selected worker" records; "to holder", the fraction of
turns >= 2 routed to the worker that served the session's previous turn (it holds that whole
prompt, in its GPU cache or in XConnector's host memory); and how requests split over workers.
Then each arm's mean TTFT and hit rate against the `off` arm of the same run, and a note when a
worker's log says an XConnector lookup timed out (it then answers 0: a miss whatever the routing;
its 100 ms bound can be hit on a busy 2-core machine).

Runs in the Dynamo environment (scripts/dynamo_env.sh), from the repository root:

    PYTHONPATH=.:tests .venv-dynamo/bin/python benchmarks/dynamo_routing.py \\
        [--workers 2] [--sessions 16] [--turns 4] [--seed 0] [--gpu-blocks 64] \\
        [--arms events,no-events,off] [--quick]

`--quick`: 4 sessions x 3 turns on 34-block caches (a smoke run); `--per-request` prints every
request; `--root DIR` keeps the deployments' logs. Each deployment takes about a minute to start
(2 workers, 2 CPU cores); the default run takes about four minutes. Each worker gets one unbound
OpenMP thread (`--omp-threads`; vLLM's CPU backend otherwise binds every worker's threads to the
same cores, and on a 2-core machine their spin-waits stall requests for up to a second). On CPU
with a tiny model, prefill is cheap and TTFT is mostly serving-stack overhead, with outliers:
compare the p50 and the turns >= 2 mean too. The numbers are what this machine gives, printed
with a note on it (cores, versions, load average before and after).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from dynamo_app.deployment import BLOCK, Deployment, Served, make_model  # noqa: E402

SECTION: dict[str, Any] = {"adapters": [{"name": "lmcache", "config": {"max_cache_size": "64MiB"}}]}
ARMS = ("events", "no-events", "off")
MAX_MODEL_LEN = 1024  # the harness's --max-model-len
VOCAB = (3, 512)  # token ids past <unk>, <s>, </s>
CACHED_BY_SOURCE = "vllm:prompt_tokens_cached_by_source_total"
LOOKUP_TIMEOUT = "did not answer within"  # XConnector's lookup client, on a busy machine


@dataclass
class Turn:
    session: int
    turn: int
    prompt: list[int]


@dataclass
class Result:
    arm: str
    served: list[tuple[Turn, Served, dict[str, Any]]] = field(default_factory=list)
    cached_by_source: dict[str, float] = field(default_factory=dict)
    lookup_timeouts: int = 0  # workers whose log says an XConnector lookup timed out


def workload(seed: int, sessions: int, turns: int, prefix: int, chunk: int) -> list[Turn]:
    """Round-robin turns of `sessions` conversations: a session's prefix is `prefix` * [3/4, 1]
    tokens, each turn appends a user message of `chunk` * [3/4, 1] tokens."""
    rng = random.Random(seed)

    def tokens(most: int) -> list[int]:
        return [rng.randrange(*VOCAB) for _ in range(rng.randint(most * 3 // 4, most))]

    prompts = [tokens(prefix) for _ in range(sessions)]
    out: list[Turn] = []
    for t in range(turns):
        for s in range(sessions):
            prompts[s] = prompts[s] + tokens(chunk)
            out.append(Turn(s, t, prompts[s]))
    return out


def worker_env(arm: str, omp_threads: int) -> dict[str, str]:
    """XCONNECTOR_DISABLE in the `off` arm; with `omp_threads`, that many unbound OpenMP threads
    per worker (vLLM's CPU backend otherwise binds every worker's threads to the same cores,
    where their spin-waits contend: stalls of up to a second on a 2-core machine)."""
    env = {"XCONNECTOR_DISABLE": "1"} if arm == "off" else {}
    if omp_threads:
        env |= {"OMP_NUM_THREADS": str(omp_threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    return env


def arm_deployment(arm: str, model: str, root: Path, args: argparse.Namespace) -> Deployment:
    return Deployment(
        model,
        root,
        workers=args.workers,
        xconnector=SECTION,
        report_kv_events=arm == "events",
        gpu_blocks=args.gpu_blocks,
        env=worker_env(arm, args.omp_threads),
    )


def warm_up(d: Deployment, workers: int, max_tokens: int, tries: int = 12) -> None:
    """Random prompts, each sent twice (a cold prefill, then a GPU prefix hit), until every worker
    has served both: the first request of each kind on a worker is slow once."""
    rng = random.Random(-1)  # its own stream: the workload is the same in every arm
    warm: set[int] = set()
    for _ in range(tries):
        prompt = [rng.randrange(*VOCAB) for _ in range(8 * BLOCK)]
        d.settle()
        first = d.complete(prompt, max_tokens, stream=True)
        d.settle()
        d.complete(prompt, max_tokens, stream=True)
        warm.add(first.worker)
        if len(warm) >= workers:
            return


def cached_by_source(d: Deployment, workers: int) -> dict[str, float]:
    """vLLM's cached prompt tokens by source, summed over the workers."""
    out: dict[str, float] = {}
    for i in range(workers):
        for line in d.worker_metrics(i).splitlines():
            if line.startswith(CACHED_BY_SOURCE + "{") and 'source="' in line:
                source = line.split('source="', 1)[1].split('"', 1)[0]
                out[source] = out.get(source, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def run_arm(
    arm: str, model: str, root: Path, args: argparse.Namespace, turns: list[Turn]
) -> Result:
    result = Result(arm)
    ready, workload_s = 0.0, 0.0
    t0 = time.monotonic()
    d = arm_deployment(arm, model, root, args)
    try:  # not `with`: a deployment that fails to start is stopped too
        d.start()
        ready = time.monotonic() - t0
        warm_up(d, args.workers, args.max_tokens)
        before = cached_by_source(d, args.workers)
        t1 = time.monotonic()
        for turn in turns:
            d.settle()  # the router's view includes every event sent so far
            n = len(d.selections())
            served = d.complete(turn.prompt, args.max_tokens, stream=True)
            records = d.selections()[n:]
            if len(records) != 1 or int(records[0]["worker_id"]) != served.worker:
                raise RuntimeError(f"{arm}: no single selection record for a request: {records}")
            result.served.append((turn, served, records[0]))
        workload_s = time.monotonic() - t1
        d.settle()
        after = cached_by_source(d, args.workers)
    finally:
        d.stop()
    # Logged once per worker: a lookup that times out answers 0 (a miss, served by recompute).
    result.lookup_timeouts = sum(
        LOOKUP_TIMEOUT in log.read_text(errors="replace") for log in d.logs[1:]
    )
    print(f"  {arm}: deployment ready in {ready:.0f} s, workload {workload_s:.0f} s", flush=True)
    result.cached_by_source = {k: after[k] - before.get(k, 0.0) for k in after}
    return result


@dataclass
class Summary:
    requests: int
    ttft_mean: float
    ttft_p50: float
    ttft_later: float  # mean over turns >= 2
    no_ttft: int  # responses without a text chunk (not in the TTFT figures)
    hit_rate: float
    device_tokens: float
    host_tokens: float
    host_pinned: float
    to_holder: float
    split: str


def summarize(r: Result) -> Summary:
    ttfts = [s.ttft_ms for _, s, _ in r.served if s.ttft_ms is not None]
    later = [s.ttft_ms for t, s, _ in r.served if s.ttft_ms is not None and t.turn > 0]
    holder: dict[int, int] = {}
    to_holder = followups = 0
    for turn, served, _ in r.served:
        if turn.session in holder:
            followups += 1
            to_holder += holder[turn.session] == served.worker
        holder[turn.session] = served.worker
    order = list(dict.fromkeys(s.worker for _, s, _ in r.served))
    per_worker = Counter(s.worker for _, s, _ in r.served)
    prompt = sum(s.prompt_tokens for _, s, _ in r.served)
    return Summary(
        requests=len(r.served),
        ttft_mean=statistics.fmean(ttfts) if ttfts else float("nan"),
        ttft_p50=statistics.median(ttfts) if ttfts else float("nan"),
        ttft_later=statistics.fmean(later) if later else float("nan"),
        no_ttft=len(r.served) - len(ttfts),
        hit_rate=sum(s.cached_tokens for _, s, _ in r.served) / prompt if prompt else 0.0,
        device_tokens=r.cached_by_source.get("device", 0.0),
        host_tokens=r.cached_by_source.get("host", 0.0),
        host_pinned=statistics.fmean(int(rec["host_pinned_blocks"]) for _, _, rec in r.served),
        to_holder=to_holder / followups if followups else float("nan"),
        split="/".join(str(per_worker[w]) for w in order),
    )


def print_requests(arm: str, r: Result) -> None:
    workers = list(dict.fromkeys(s.worker for _, s, _ in r.served))
    print(f"\n{arm}: session turn worker prompt cached TTFT-ms host-blk")
    for turn, served, record in r.served:
        ttft = "-" if served.ttft_ms is None else f"{served.ttft_ms:.1f}"
        print(
            f"  {turn.session:>7} {turn.turn + 1:>4} {workers.index(served.worker):>6} "
            f"{served.prompt_tokens:>6} {served.cached_tokens:>6} {ttft:>7} "
            f"{int(record['host_pinned_blocks']):>8}"
        )


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def machine_note() -> str:
    versions = []
    for dist in ("ai-dynamo", "vllm-cpu"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} ?")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: {os.cpu_count()} CPU cores ({platform.machine()}), {', '.join(versions)}, "
        f"tiny 2-layer fp32 Llama on vLLM's CPU backend; load average {load}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu-blocks", type=int, default=64, help="each worker's vLLM cache")
    ap.add_argument("--prefix", type=int, default=320, help="a session's prefix, at most")
    ap.add_argument("--chunk", type=int, default=160, help="a turn's user message, at most")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument(
        "--omp-threads",
        type=int,
        default=1,
        help="OpenMP threads per worker, unbound (0: vLLM's default, bound to all cores)",
    )
    ap.add_argument(
        "--arms", default=",".join(ARMS), help="a comma-separated subset of " + "/".join(ARMS)
    )
    ap.add_argument("--quick", action="store_true", help="4 sessions x 3 turns, 34-block caches")
    ap.add_argument("--per-request", action="store_true", help="print every request too")
    ap.add_argument("--root", type=Path, help="keep the deployments' logs here")
    args = ap.parse_args()
    if args.quick:
        args.sessions, args.turns, args.gpu_blocks = 4, 3, 34
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or any(a not in ARMS for a in arms):
        ap.error(f"--arms: a subset of {','.join(ARMS)}")
    longest = args.prefix + args.turns * args.chunk + args.max_tokens
    if longest > MAX_MODEL_LEN:
        ap.error(
            f"the last turn may reach {longest} tokens, over --max-model-len {MAX_MODEL_LEN}: "
            "lower --turns, --prefix or --chunk"
        )
    fewest = MAX_MODEL_LEN // BLOCK + 1  # a whole max-model-len request, and vLLM's null block
    if args.gpu_blocks < fewest:
        ap.error(f"--gpu-blocks: at least {fewest}")

    turns = workload(args.seed, args.sessions, args.turns, args.prefix, args.chunk)
    last = {t.session: len(t.prompt) for t in turns}
    working_set = sum(-(-n // BLOCK) for n in last.values())
    print(machine_note())
    print(
        f"{args.workers} workers x {args.gpu_blocks} vLLM blocks of {BLOCK} tokens; "
        f"{args.sessions} sessions x {args.turns} turns = {len(turns)} requests, prompts "
        f"{min(len(t.prompt) for t in turns)}-{max(len(t.prompt) for t in turns)} tokens, "
        f"max_tokens {args.max_tokens}, seed {args.seed}; worker threads: "
        + (f"{args.omp_threads} unbound" if args.omp_threads else "vLLM's default binding")
    )
    print(
        f"working set {working_set} blocks = {working_set / args.gpu_blocks:.1f}x one worker's "
        f"vLLM cache; requests one at a time, each after the router applied every KV event so "
        f"far (settle: routing quality, not event lag)",
        flush=True,
    )

    root = args.root or Path(tempfile.mkdtemp(prefix="xconnector-dynamo-routing-"))
    root.mkdir(parents=True, exist_ok=True)
    model = make_model(root / "model")
    results: dict[str, Result] = {}
    try:
        for arm in arms:
            results[arm] = run_arm(arm, model, root / arm, args, turns)
    except BaseException:
        print(f"logs: {root}", file=sys.stderr)
        raise
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)

    if args.per_request:
        for arm, r in results.items():
            print_requests(arm, r)
    summaries = {arm: summarize(r) for arm, r in results.items()}
    print()
    print(
        f"{'arm':<10} {'reqs':>4} {'TTFT ms':>8} {'p50':>6} {'turn>=2':>7} {'hit rate':>8} "
        f"{'vLLM tok':>8} {'host tok':>8} {'host blk':>8} {'to holder':>9} {'split':>7}"
    )
    for arm, s in summaries.items():
        print(
            f"{arm:<10} {s.requests:>4} {s.ttft_mean:>8.1f} {s.ttft_p50:>6.1f} "
            f"{s.ttft_later:>7.1f} {s.hit_rate:>8.1%} {s.device_tokens:>8.0f} "
            f"{s.host_tokens:>8.0f} {s.host_pinned:>8.2f} {s.to_holder:>9.0%} {s.split:>7}"
        )
    for arm, r in results.items():
        if r.lookup_timeouts:
            print(
                f"({arm}: an XConnector lookup timed out on {r.lookup_timeouts} worker(s), "
                "answering 0: misses there, whatever the routing)"
            )
    missing = sum(s.no_ttft for s in summaries.values())
    if missing:
        print(f"({missing} responses had no text chunk: not in the TTFT figures)")
    print(
        "TTFT: mean over all requests, p50, mean over turns >= 2; hit rate: cached / prompt "
        "tokens; vLLM / host tok: cached tokens from vLLM's own prefix cache (its GPU cache, here "
        "in CPU memory) / loaded by XConnector from host memory; "
        "host blk: mean host_pinned_blocks of the router's selections; to holder: turns >= 2 "
        "sent to the worker that served the session's previous turn; split: requests per worker"
    )
    if "off" in summaries:
        base = summaries["off"]
        print()
        for arm, s in summaries.items():
            if arm == "off":
                continue
            print(
                f"{arm} vs off: mean TTFT {ratio(s.ttft_mean, base.ttft_mean)} "
                f"(turns >= 2: {ratio(s.ttft_later, base.ttft_later)}), hit rate "
                f"{ratio(s.hit_rate, base.hit_rate)} ({s.hit_rate:.1%} vs {base.hit_rate:.1%})"
            )
    print(machine_note().split("; ")[-1] + " (after)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
