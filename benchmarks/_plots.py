"""PNG plots for the benchmark scripts. matplotlib is an optional extra (`pip install -e
'.[plots]'`): without it every function here says so once and returns None, and the scripts
still write their JSON and Markdown."""

from __future__ import annotations

import statistics
from pathlib import Path

import click
from _common import RESULTS

_warned = False


def _pyplot():
    global _warned
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned:
            click.echo("matplotlib is not installed (pip install -e '.[plots]'), so no PNG; "
                       "JSON and Markdown are written as usual.")
            _warned = True
        return None
    return plt


def _save(plt, fig, name: str, machine: dict) -> Path:
    m = machine or {}
    d = m.get("during", {})
    note = (f"{m.get('cpus')} cores, {m.get('cpu')}; {m.get('date')}; "
            f"load before {m.get('load_before', 0):.2f}")
    if d:
        note += f", during mean {d.get('load_1min_mean', 0):.2f}"
    fig.text(0.01, -0.01, note, fontsize=7, color="0.4", ha="left", va="top")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    click.echo(f"Wrote {path}")
    return path


def latency_cdf(name: str, samples: dict[str, list[float]], machine: dict) -> Path | None:
    """One CDF curve per system; samples in seconds."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for label, lat in samples.items():
        if not lat:
            continue
        xs = sorted(x * 1000 for x in lat)
        n = len(xs)
        ax.step(xs, [(i + 1) / n for i in range(n)], where="post",
                label=f"{label} (p50 {xs[n // 2]:.2f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("write latency, ms (log scale)")
    ax.set_ylabel("fraction of writes completed within")
    ax.set_ylim(0, 1.0)
    for q in (0.5, 0.95, 0.99):
        ax.axhline(q, color="0.85", lw=0.8, zorder=0)
    ax.grid(True, which="both", axis="x", color="0.92")
    ax.set_title("Write latency, one client, sequential single-row INSERTs")
    ax.legend(fontsize=8, loc="lower right")
    return _save(plt, fig, name, machine)


_LABELS = {
    "raftsql_kill9": "raftsql, kill -9 leader",
    "raftsql_graceful": "raftsql, SIGTERM leader (leadership transfer)",
    "etcd_default_kill9": "etcd, defaults 100/1000 ms, kill -9 leader",
    "etcd_default_graceful": "etcd, defaults, SIGTERM leader",
    "etcd_raftsql_settings_kill9": "etcd at raftsql's heartbeat/election settings, kill -9 leader",
}


def failover_timeline(name: str, raw: dict, machine: dict) -> Path | None:
    """Per system one panel, per trial one row: the client's outage (bar, from its last successful
    write before the fault to its first after) and the moment a new leader was known (dot),
    on one shared time axis starting at the fault."""
    plt = _pyplot()
    if plt is None:
        return None
    systems = [(k, v) for k, v in raw.items() if isinstance(v, list) and v]
    if not systems:
        return None
    height = sum(max(1.2, 0.16 * len(v) + 0.6) for _, v in systems)
    fig, axes = plt.subplots(len(systems), 1, figsize=(9, height + 0.8), sharex=True, squeeze=False)
    for ax, (key, trials) in zip(axes[:, 0], systems, strict=True):
        gaps = []
        for i, t in enumerate(trials):
            if t.get("gap_s") is not None:
                start = t.get("gap_start_s") or 0.0
                ax.barh(i, t["gap_s"], left=start, height=0.7, color="tab:red", alpha=0.55)
                gaps.append(t["gap_s"])
            else:
                why = t.get("error", "no successful write within 15 s")[:80]
                ax.text(0, i, f" {why}", va="center", fontsize=7, color="tab:red")
            if t.get("election_s") is not None:
                ax.plot(t["election_s"], i, "o", ms=3.5, color="tab:blue")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_ylim(len(trials) - 0.4, -0.6)
        ax.set_yticks([])
        ax.set_ylabel("trials", fontsize=8)
        summary = f"gap median {statistics.median(gaps):.3f} s, max {max(gaps):.3f} s" if gaps else "no gaps measured"
        ax.set_title(f"{_LABELS.get(key, key)}: {summary}", fontsize=9, loc="left")
        ax.grid(True, axis="x", color="0.92")
    axes[-1, 0].set_xlabel("seconds since the leader was signalled "
                           "(red bar: client saw no successful write; blue dot: new leader known)")
    fig.suptitle("Failover timeline, one row per trial", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return _save(plt, fig, name, machine)


def throughput_bars(name: str, doc: dict) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 3, 2]})
    series = [("raftsql 3 nodes", doc.get("concurrency", []), "tab:blue")]
    if isinstance(doc.get("etcd_concurrency"), list):
        series.append(("etcd 3 members", doc["etcd_concurrency"], "tab:orange"))
    clients = sorted({r["clients"] for _, rs, _ in series for r in rs})
    width = 0.8 / len(series)
    for j, (label, rs, color) in enumerate(series):
        by = {r["clients"]: r for r in rs}
        xs = [i + (j - (len(series) - 1) / 2) * width for i, c in enumerate(clients) if c in by]
        a1.bar(xs, [by[c]["writes_per_s"] for c in clients if c in by], width, label=label, color=color)
        cx = [i for i, c in enumerate(clients) if c in by]
        a2.plot(cx, [by[c]["p50_ms"] for c in clients if c in by], "o-", color=color, label=f"{label} p50")
        a2.plot(cx, [by[c]["p99_ms"] for c in clients if c in by], "s--", color=color, label=f"{label} p99")
    a1.axhline(5000, color="tab:red", ls="--", lw=0.8, label="target at 64 clients: 5,000 writes/s")
    s = doc.get("sqlite_full", {})
    if s.get("writes_per_s"):
        a1.axhline(s["writes_per_s"], color="0.4", ls=":", label="SQLite file, synchronous=FULL, 1 writer")
    for a in (a1, a2):
        a.set_xticks(range(len(clients)), [str(c) for c in clients])
        a.set_xlabel("concurrent clients")
        a.grid(True, axis="y", color="0.92")
    a1.set_ylabel("single-row writes/s")
    a1.set_title("Write throughput", fontsize=10)
    a1.legend(fontsize=7)
    a2.set_yscale("log")
    a2.set_ylabel("latency, ms (log scale)")
    a2.set_title("Write latency under concurrency", fontsize=10)
    a2.legend(fontsize=7)
    b = doc.get("batched", {})
    bars = [("raftsql\n3 nodes", b.get("rows_per_s"), "tab:blue"),
            ("SQLite file\nFULL", s.get("batched_rows_per_s"), "0.5")]
    bars = [x for x in bars if x[1]]
    a3.bar([x[0] for x in bars], [x[1] for x in bars], color=[x[2] for x in bars])
    a3.axhline(100_000, color="tab:red", ls="--", lw=0.8, label="target: 100,000 rows/s")
    a3.legend(fontsize=7, loc="upper left")
    a3.set_ylabel("rows/s")
    a3.set_title(f"Batched, {b.get('rows_per_entry', 1000)} rows per write", fontsize=10)
    a3.grid(True, axis="y", color="0.92")
    fig.tight_layout()
    return _save(plt, fig, name, doc.get("machine", {}))


def _read_label(key: str) -> str:
    if key.startswith(("etcd", "sqlite")):
        return key.replace("_", "\n")
    return f"raftsql\n{key}"


def _read_color(key: str) -> str:
    return "0.5" if key.startswith("sqlite") else "tab:orange" if key.startswith("etcd") else "tab:blue"


def reads_bars(name: str, doc: dict) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    seq = doc.get("sequential", {})
    conc = doc.get("concurrent", {})
    levels = list(seq)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4))
    xs = range(len(levels))
    a1.bar([x - 0.2 for x in xs], [seq[k]["p50_ms"] for k in levels], 0.4, label="p50",
           color=[_read_color(k) for k in levels])
    a1.bar([x + 0.2 for x in xs], [seq[k]["p99_ms"] for k in levels], 0.4, label="p99 (hatched)",
           color=[_read_color(k) for k in levels], alpha=0.5, hatch="//")
    a1.set_yscale("log")
    a1.set_ylabel("read latency, ms (log scale)")
    a1.set_title("One client, sequential point SELECTs: p50 and p99", fontsize=10)
    clevels = [k for k in levels if k in conc]
    a2.bar(range(len(clevels)), [conc[k]["reads_per_s"] for k in clevels], color=[_read_color(k) for k in clevels])
    a2.set_yscale("log")
    threads = next((conc[k].get("threads") for k in clevels), "")
    a2.set_ylabel("reads/s (log scale)")
    a2.set_title(f"{threads} concurrent clients: reads/s", fontsize=10)
    for a, ks in ((a1, levels), (a2, clevels)):
        a.set_xticks(range(len(ks)), [_read_label(k) for k in ks], fontsize=8)
        a.set_axisbelow(True)
        a.grid(True, axis="y", color="0.9")
    fig.tight_layout()
    return _save(plt, fig, name, doc.get("machine", {}))
