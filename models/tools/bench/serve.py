"""The serving benchmark: the HTTP server driven as ``vllm bench serve`` drives one
(:mod:`moe_relayfree_models.serving.loadgen`), and the feasible region per dispatch path.

* :func:`one_run`: one workload against a running server -> the report (completed / failed,
  throughput, TTFT / TPOT / ITL / E2EL mean, median, p90, p99, goodput under limits).
* :func:`sweep`: for each setting, a prefill budget (the server's ``--max-step-tokens``) and a
  max concurrency (its ``--max-seqs``: sequences decoding at once), one server per
  dispatch path (started here, every step shape compiled before it listens, then a few untimed
  requests), and for each round and request rate the same seeded workload sent to each path in
  turn (the order rotating); every point's goodput under each pair of limits, and per path the
  highest rate whose SLO attainment (the share of the requests sent that met every limit:
  DistServe's goodput criterion) stays >= ``fraction`` (median over rounds), as ratios to the
  best baseline at the same setting and limits; :func:`plot_map` draws the (rate, setting)
  map of each path. (Goodput per second, good requests over the
  run's duration, also counts the last requests' drain: at 64 requests and 32/s it read 0.85x
  the offered rate with every request within the limits.)

The command: ``scripts/bench_serve.py``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from moe_relayfree.tools.bench.report import table
from moe_relayfree_models.serving import loadgen

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``scripts/serve.py`` with ``args`` on a free local port (``--warm-up``: every step shape
    compiled before it listens), stopped by its own process id."""

    def __init__(self, args: list[str], ready_s: float = 1800):
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.devnull, "w")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "serve.py"),
                                      "--port", str(self.port), "--warm-up", *args],
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve.py {' '.join(args)} exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"serve.py {' '.join(args)} did not come up in {ready_s} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def one_run(url: str, model: str, workload: loadgen.Workload, limits: dict):
    """(the report, the per-request results)."""
    raw = loadgen.run(url, model, workload)
    report = loadgen.summarize(raw["results"], raw["duration_s"], limits)
    report["workload"] = dataclasses.asdict(workload)
    return report, raw["results"]


def highest_rate(points: list[dict], fraction: float) -> float:
    """The highest offered rate whose SLO attainment is >= ``fraction``, with every lower rate
    meeting it too (0: none)."""
    best = 0.0
    for p in sorted(points, key=lambda p: p["rate"]):
        if p["attainment"] >= fraction:
            best = p["rate"]
        else:
            break
    return best


def sweep(*, paths: list[str], budgets: list[int], rates: list[float], limit_pairs: list[dict],
          workload: loadgen.Workload, rounds: int, server_args: list[str], fraction: float = 0.9,
          model: str = "default", max_seqs: list[int | None] = (None,), log=print) -> dict:
    """See the module docstring; ``server_args``: the model flags given to every server;
    ``max_seqs``: the max concurrencies swept (None: what ``server_args`` sets)."""
    points = []
    for budget, seqs in [(b, n) for b in budgets for n in max_seqs]:
        servers = {}
        extra = ["--max-step-tokens", str(budget)] + (["--max-seqs", str(seqs)] if seqs else [])
        try:
            for path in paths:
                log(f"starting {path} (budget {budget}, max seqs {seqs or 'default'})")
                servers[path] = ServerProcess([*server_args, "--dispatch", path, *extra])
                # untimed: the first requests of a fresh server (caches, threads)
                loadgen.run(servers[path].url, model,
                            dataclasses.replace(workload, num_prompts=4, rate=math.inf))
            for r in range(rounds):
                for i, rate in enumerate(rates):
                    w = dataclasses.replace(workload, rate=rate, seed=workload.seed + r)
                    turn = (r + i) % len(paths)  # the order rotates: no path always goes first
                    for path in paths[turn:] + paths[:turn]:
                        raw = loadgen.run(servers[path].url, model, w)
                        for limits in limit_pairs:
                            s = loadgen.summarize(raw["results"], raw["duration_s"], limits)
                            points.append(dict(path=path, budget=budget, max_seqs=seqs,
                                               rate=rate, round=r,
                                               limits=limits, goodput=s["goodput"],
                                               attainment=s["good_requests"] / w.num_prompts,
                                               completed=s["completed"], failed=s["failed"],
                                               ttft_p90_ms=s["ttft_ms"]["p90"],
                                               tpot_p90_ms=s["tpot_ms"]["p90"],
                                               output_throughput=s["output_throughput"]))
                        log(f"round {r} rate {rate} {path}: {points[-1]['attainment']:.0%} within "
                            f"{limits}, goodput {points[-1]['goodput']:.2f}/s, "
                            f"TTFT p90 {points[-1]['ttft_p90_ms']:.0f} ms, "
                            f"TPOT p90 {points[-1]['tpot_p90_ms']:.1f} ms")
        finally:
            for s in servers.values():
                s.stop()
    return dict(points=points, feasible=feasible(points, paths, budgets, limit_pairs, fraction,
                                                 max_seqs),
                fraction=fraction)


def _median_points(points, **match) -> list[dict]:
    """Per rate, the median over rounds of goodput, TTFT p90 and TPOT p90."""
    chosen = [p for p in points if all(p.get(k) == v for k, v in match.items())]
    out = []
    for rate in sorted({p["rate"] for p in chosen}):
        at = [p for p in chosen if p["rate"] == rate]
        out.append(dict(rate=rate, **{k: float(np.median([p[k] for p in at]))
                                      for k in ("goodput", "attainment", "ttft_p90_ms",
                                                "tpot_p90_ms")}))
    return out


def _settings(points) -> list[tuple]:
    """The (budget, max_seqs) settings of a sweep's points, in the order they ran."""
    return list(dict.fromkeys((p["budget"], p.get("max_seqs")) for p in points))


def feasible(points, paths, budgets, limit_pairs, fraction, max_seqs=(None,)) -> list[dict]:
    rows = []
    for budget, seqs in [(b, n) for b in budgets for n in max_seqs]:
        for limits in limit_pairs:
            best = {p: highest_rate(_median_points(points, path=p, budget=budget,
                                                   max_seqs=seqs, limits=limits), fraction)
                    for p in paths}
            baselines = [best[p] for p in paths if p != "relayfree"]
            top = max(baselines, default=0.0)
            rows.append(dict(budget=budget, max_seqs=seqs, limits=limits, highest_rate=best,
                             relayfree_vs_best_baseline=(best.get("relayfree", 0.0) / top
                                                         if top else None)))
    return rows


def markdown(report: dict) -> str:
    lines = [f"# Serving benchmark ({report.get('checkpoint', '')})", "",
             f"Command: `{report['command']}`", ""]
    if "run" in report:
        r = report["run"]
        lines += [f"- completed {r['completed']}, failed {r['failed']}, "
                  f"{r['request_throughput']:.2f} req/s, {r['output_throughput']:.1f} output tok/s",
                  ""]
        lines += table(["metric (ms)", "mean", "median", "p90", "p99"],
                       [(m, *(f"{r[f'{m}_ms'][k]:.1f}" for k in ("mean", "median", "p90", "p99")))
                        for m in loadgen.METRICS])
        if "goodput" in r:
            lines += ["", f"Goodput under {r['goodput_limits_ms']}: {r['goodput']:.2f} req/s "
                          f"({r['good_requests']} of {r['completed']})"]
    if "sweep" in report:
        s = report["sweep"]
        lines += ["", f"## Highest rate with >= {s['fraction']:.0%} of requests within the limits", ""]
        paths = list(s["feasible"][0]["highest_rate"]) if s["feasible"] else []
        lines += table(["budget", "max seqs", "limits (ms)", *paths, "relay-free / best baseline"],
                       [(f["budget"], f.get("max_seqs") or "-",
                         ", ".join(f"{k} {v:g}" for k, v in f["limits"].items()),
                         *(f"{f['highest_rate'][p]:g}" for p in paths),
                         "-" if f["relayfree_vs_best_baseline"] is None
                         else f"{f['relayfree_vs_best_baseline']:.2f}") for f in s["feasible"]])
        lines += ["", "## Points (median over rounds)", ""]
        rows = []
        for budget, seqs in _settings(s["points"]):
            limits = s["points"][0]["limits"]
            for path in paths:
                for m in _median_points(s["points"], path=path, budget=budget, max_seqs=seqs,
                                        limits=limits):
                    rows.append((budget, seqs or "-", path, f"{m['rate']:g}",
                                 f"{m['attainment']:.0%}", f"{m['goodput']:.2f}",
                                 f"{m['ttft_p90_ms']:.0f}", f"{m['tpot_p90_ms']:.1f}"))
        lines += table(["budget", "max seqs", "path", "rate (req/s)", f"within {limits}",
                        "goodput (req/s)", "TTFT p90 ms", "TPOT p90 ms"], rows)
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """One run: the TTFT and TPOT distributions; a sweep: the share of requests within the
    limits against the offered rate per path (one panel per budget and limits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "sweep" in report:
        s = report["sweep"]
        panels = [(f["budget"], f.get("max_seqs"), f["limits"]) for f in s["feasible"]]
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (budget, seqs, limits) in zip(axes[0], panels):
            for name in s["feasible"][0]["highest_rate"]:
                m = _median_points(s["points"], path=name, budget=budget, max_seqs=seqs,
                                   limits=limits)
                ax.plot([p["rate"] for p in m], [p["attainment"] for p in m], "o-", label=name)
            ax.axhline(s["fraction"], color="k", linestyle=":", label=f"{s['fraction']:.0%}")
            ax.set(xlabel="offered rate (req/s)", ylabel="requests within the limits",
                   title=f"budget {budget}" + (f", {seqs} seqs" if seqs else "") + ", "
                   + ", ".join(f"{k}<={v:g}ms" for k, v in limits.items()))
            ax.legend(fontsize=7)
    else:
        r = report["_results"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, name in zip(axes, ("ttft", "tpot")):
            v = 1e3 * np.asarray([getattr(x, name) for x in r if x.ok], np.float64)
            ax.hist(v[np.isfinite(v)], bins=30)
            ax.set(xlabel=f"{name.upper()} (ms)", ylabel="requests")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_map(report: dict, path: str) -> None:
    """The feasible region as a picture: per pair of limits (rows) and dispatch path
    (columns), the share of requests within the limits at each (offered rate, setting), the
    settings being (prefill budget, max concurrency); the feasible region (every rate up to
    the highest whose share stays at or above the sweep's fraction) outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["sweep"]
    paths = list(s["feasible"][0]["highest_rate"])
    pairs = list({str(f["limits"]): f["limits"] for f in s["feasible"]}.values())
    settings = _settings(s["points"])
    rates = sorted({p["rate"] for p in s["points"]})
    fig, axes = plt.subplots(len(pairs), len(paths), squeeze=False,
                             figsize=(2.2 + 0.45 * len(rates) * len(paths),
                                      1.2 + (0.5 * len(settings) + 0.8) * len(pairs)))
    for row, limits in zip(axes, pairs):
        for ax, name in zip(row, paths):
            grid = np.full((len(settings), len(rates)), np.nan)
            for i, (budget, seqs) in enumerate(settings):
                for m in _median_points(s["points"], path=name, budget=budget, max_seqs=seqs,
                                        limits=limits):
                    grid[i, rates.index(m["rate"])] = m["attainment"]
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for i, (budget, seqs) in enumerate(settings):
                top = highest_rate(_median_points(s["points"], path=name, budget=budget,
                                                  max_seqs=seqs, limits=limits), s["fraction"])
                for j, rate in enumerate(rates):
                    if np.isnan(grid[i, j]):
                        continue
                    ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=6)
                    if rate <= top:  # the feasible region: every rate up to the highest
                        ax.add_patch(plt.Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False,
                                                   lw=2))
            ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates], fontsize=7)
            ax.set_yticks(range(len(settings)),
                          [f"{b}" + (f"/{n}" if n else "") for b, n in settings], fontsize=7)
            ax.set_title(f"{name}\n" + ", ".join(f"{k}<={v:g}ms" for k, v in limits.items()),
                         fontsize=8)
            ax.set_xlabel("offered rate (req/s)", fontsize=7)
        row[0].set_ylabel("budget / max seqs", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["ServerProcess", "feasible", "highest_rate", "markdown", "one_run", "plot",
           "plot_map", "sweep"]
