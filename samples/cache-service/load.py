"""Load driver for the cache-service sample: fill → idle → fill again, sampling /stats throughout.

    python3 samples/cache-service/load.py [--url http://127.0.0.1:8080] [--fill-mb 64] [--idle 30]
                                          [--out timeline.jsonl] [--shutdown]

Phases (names as they appear in the timeline):
  fill1  POST /fill in --chunk-mb steps up to --fill-mb, then --reads GETs of hot keys
  idle   no load for --idle seconds: only GET /stats every --sample seconds (this is when
         `jvmkit run --balloon` should take memory back: the cache's shrinker hook evicts)
  fill2  the same as fill1 (the cache refills; the balloon should give memory back)
Every sample is a JSON line (t, phase and the service's /stats fields) on --out, and a short human
line on stdout. Bounded: a fixed number of requests, each with a timeout, and an overall --deadline;
only loopback addresses are accepted as --url. Standard library only. Importable:
`run_load(LoadPlan(...))` returns the samples as dicts.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True)
class LoadPlan:
    url: str = "http://127.0.0.1:8080"
    fill_mb: int = 64
    chunk_mb: int = 8
    item_kb: int = 256
    reads: int = 50
    read_kb: int = 64
    hot_keys: int = 16
    idle: float = 30.0
    sample: float = 1.0
    deadline: float = 300.0
    wait_ready: float = 60.0
    shutdown: bool = False


class LoadError(Exception):
    """The service did not answer as expected, or the deadline passed."""


def check_loopback(url: str) -> str:
    """Only 127.0.0.0/8, ::1 and localhost: this script never sends load anywhere else."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise LoadError(f"--url must be http://HOST:PORT, not {url!r}")
    host = parts.hostname
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, parts.port or 80, proto=socket.IPPROTO_TCP)}
    except socket.gaierror as exc:
        raise LoadError(f"cannot resolve {host}: {exc}") from None
    if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        raise LoadError(f"{host} is not a loopback address; load.py only drives services on this machine")
    return url.rstrip("/")


class Client:
    def __init__(self, base: str, deadline_at: float):
        self.base = base
        self.deadline_at = deadline_at
        self.requests = 0

    def call(self, method: str, path: str) -> tuple[int, bytes]:
        left = self.deadline_at - time.monotonic()
        if left <= 0:
            raise LoadError("the --deadline passed")
        req = urllib.request.Request(self.base + path, method=method, data=b"" if method == "POST" else None)
        self.requests += 1
        try:
            with urllib.request.urlopen(req, timeout=min(REQUEST_TIMEOUT, left)) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, method: str, path: str) -> dict:
        status, body = self.call(method, path)
        if status != 200:
            raise LoadError(f"{method} {path} answered {status}: {body[:200]!r}")
        return json.loads(body)


def wait_ready(client: Client, seconds: float) -> None:
    end = time.monotonic() + seconds
    last = None
    while time.monotonic() < end:
        try:
            if client.call("GET", "/health")[0] == 200:
                return
        except (OSError, urllib.error.URLError) as exc:
            last = exc
        time.sleep(0.5)
    raise LoadError(f"{client.base}/health did not answer within {seconds:.0f} s ({last})")


def run_load(plan: LoadPlan, out=None, echo=print) -> list[dict]:
    """Drive the phases; returns every sample (and writes each as a JSON line to `out`)."""
    start = time.monotonic()
    client = Client(check_loopback(plan.url), start + plan.deadline)
    samples: list[dict] = []

    def sample(phase: str, event: str) -> dict:
        stats = client.json("GET", "/stats")
        row = {"t": round(time.monotonic() - start, 3), "phase": phase, "event": event, **stats}
        samples.append(row)
        if out is not None:
            out.write(json.dumps(row) + "\n")
            out.flush()
        echo(f"{row['t']:7.1f}s {phase:<5} {event:<7} cache {stats['cache_bytes'] / 2**20:7.1f}M "
             f"({stats['entries']} items)  heap used {stats['heap_used'] / 2**20:7.1f}M "
             f"committed {stats['heap_committed'] / 2**20:7.1f}M  shrinks {stats['shrinks']} "
             f"released {stats['shrink_released_bytes'] / 2**20:.1f}M")
        return row

    def fill(phase: str) -> None:
        left = plan.fill_mb
        while left > 0:
            mb = min(plan.chunk_mb, left)
            client.json("POST", f"/fill?mb={mb}&item_kb={plan.item_kb}")
            left -= mb
            sample(phase, "fill")
        for i in range(plan.reads):
            status, _ = client.call("GET", f"/item/hot-{i % max(1, plan.hot_keys)}?kb={plan.read_kb}")
            if status != 200:
                raise LoadError(f"GET /item answered {status}")
        sample(phase, "reads")

    wait_ready(client, plan.wait_ready)
    sample("start", "ready")
    fill("fill1")
    idle_end = time.monotonic() + plan.idle
    while True:
        now = time.monotonic()
        if now >= idle_end:
            break
        time.sleep(min(plan.sample, idle_end - now))
        sample("idle", "sample")
    fill("fill2")
    if plan.shutdown:
        client.json("POST", "/shutdown")
        echo("service asked to shut down")
    echo(f"done: {client.requests} requests in {time.monotonic() - start:.1f} s")
    return samples


def main(argv: list[str] | None = None) -> int:
    d = LoadPlan()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=d.url, help=f"the service (loopback only) [{d.url}]")
    p.add_argument("--fill-mb", type=int, default=d.fill_mb, help=f"MiB to add in each fill phase [{d.fill_mb}]")
    p.add_argument("--chunk-mb", type=int, default=d.chunk_mb, help=f"MiB per POST /fill [{d.chunk_mb}]")
    p.add_argument("--item-kb", type=int, default=d.item_kb, help=f"size of filled items [{d.item_kb}]")
    p.add_argument("--reads", type=int, default=d.reads, help=f"GETs of hot keys after each fill [{d.reads}]")
    p.add_argument("--read-kb", type=int, default=d.read_kb, help=f"size of hot items [{d.read_kb}]")
    p.add_argument("--idle", type=float, default=d.idle, help=f"seconds without load between fills [{d.idle:g}]")
    p.add_argument("--sample", type=float, default=d.sample, help=f"seconds between /stats samples [{d.sample:g}]")
    p.add_argument("--deadline", type=float, default=d.deadline, help=f"bound on the whole run [{d.deadline:g}]")
    p.add_argument("--wait-ready", type=float, default=d.wait_ready, help=f"wait for /health [{d.wait_ready:g}]")
    p.add_argument("--out", type=argparse.FileType("w"), help="write the samples as JSON lines here")
    p.add_argument("--shutdown", action="store_true", help="POST /shutdown at the end")
    a = p.parse_args(argv)
    if min(a.fill_mb, a.chunk_mb, a.item_kb, a.read_kb) < 1 or a.reads < 0 or a.idle < 0 or a.sample <= 0:
        p.error("sizes must be at least 1, --reads and --idle not negative, --sample positive")
    plan = LoadPlan(url=a.url, fill_mb=a.fill_mb, chunk_mb=a.chunk_mb, item_kb=a.item_kb, reads=a.reads,
                    read_kb=a.read_kb, idle=a.idle, sample=a.sample, deadline=a.deadline,
                    wait_ready=a.wait_ready, shutdown=a.shutdown)
    try:
        run_load(plan, out=a.out)
    except LoadError as exc:
        print(f"load.py: {exc}", file=sys.stderr)
        return 1
    finally:
        if a.out:
            a.out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
