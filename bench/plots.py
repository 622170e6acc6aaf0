"""PNG plots of the benchmark results (matplotlib, the `bench` extra).

    .venv/bin/python bench/plots.py bench/results/all.json [--out docs/perf]

Reads the document `run_all.py` writes (each benchmark's own JSON under
"benches") and draws what is there: throughput bars, NSCA rates, gateway
latency and bulk, hub memory per tunnel vs N, bring-up and reconnect time vs N.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

Doc = dict[str, Any]
HUB, SSHD, OTHER = "#1f77b4", "#ff7f0e", "#7f7f7f"
SIZE = (7.0, 3.6)


def save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def label_bars(ax: Axes, bars: Any, fmt: str = "{:.0f}") -> None:
    for bar in bars:
        ax.annotate(fmt.format(bar.get_height()), (bar.get_x() + bar.get_width() / 2,
                                                   bar.get_height()),
                    ha="center", va="bottom", fontsize=7)


def short(cipher: str) -> str:
    """`chacha20-poly1305@openssh.com` -> `chacha20`: tick labels that fit."""
    return cipher.split("@")[0].removesuffix("-poly1305")


def throughput(doc: Doc, out: Path) -> Path:
    rows = [r for r in doc["results"] if r["server"] in ("hub", "sshd")]
    cases = list(dict.fromkeys((short(r["cipher"]), r["direction"]) for r in rows))
    value = {(r["server"], short(r["cipher"]), r["direction"]): r["median_mb_per_s"]
             for r in rows}
    fig, ax = plt.subplots(figsize=(8.0, 3.8))
    width = 0.38
    xs = range(len(cases))
    for offset, server, colour in ((-width / 2, "hub", HUB), (width / 2, "sshd", SSHD)):
        bars = ax.bar([x + offset for x in xs], [value.get((server, *c), 0) for c in cases],
                      width, label=server, color=colour)
        label_bars(ax, bars)
    for x, case in zip(xs, cases, strict=True):
        hub, sshd = value.get(("hub", *case), 0), value.get(("sshd", *case), 0)
        if sshd:
            ax.annotate(f"{hub / sshd:.2f}x", (x, max(hub, sshd) * 1.08), ha="center",
                        fontsize=8, fontweight="bold")
    ax.set_xticks(list(xs), [f"{c}\n{d}" for c, d in cases], fontsize=7)
    ax.set_ylabel("MB/s (median)")
    ax.set_ylim(0, max(value.values(), default=1) * 1.25)
    ax.set_title("Throughput through a per-device port: hub vs OpenSSH sshd", fontsize=10)
    ax.legend(fontsize=8)
    return save(fig, out / "throughput.png")


def nsca(doc: Doc, out: Path) -> Path:
    rows = doc["results"]
    fig, ax = plt.subplots(figsize=SIZE)
    colours = [HUB if r["path"].startswith("hub") else SSHD for r in rows]
    rates = [sorted(r["rates"])[len(r["rates"]) // 2] if r["rates"] else 0 for r in rows]
    bars = ax.bar([r["path"] for r in rows], rates, color=colours)
    label_bars(ax, bars, "{:,.0f}")
    ax.set_ylabel("results/s stored (median)")
    ax.set_title(f"NSCA intake, {doc['senders']} x send_nsca, {doc['results_per_sender']} "
                 "results each", fontsize=10)
    return save(fig, out / "nsca.png")


def gateway(doc: Doc, out: Path) -> Path:
    rows = doc["results"]
    several = len({r.get("workers", 1) for r in rows}) > 1
    paths = [f"{r['path']} w{r['workers']}" if several else r["path"] for r in rows]
    fig, (lat, bulk) = plt.subplots(1, 2, figsize=SIZE)
    width = 0.38
    xs = range(len(rows))
    for offset, key, colour in ((-width / 2, "p50_us", HUB), (width / 2, "p99_us", SSHD)):
        bars = lat.bar([x + offset for x in xs], [r[key] for r in rows], width,
                       label=key.split("_")[0], color=colour)
        label_bars(lat, bars)
    lat.set_xticks(list(xs), paths, rotation=45, ha="right", fontsize=7)
    lat.set_ylabel("echo round trip, us")
    lat.legend(fontsize=8)
    lat.set_title("Echo round trip", fontsize=10)
    bars = bulk.bar(paths, [r["bulk_mb_per_s"] for r in rows], color=OTHER)
    label_bars(bulk, bars)
    bulk.set_xticks(list(xs), paths, rotation=45, ha="right", fontsize=7)
    bulk.set_ylabel("MB/s")
    bulk.set_title(f"Bulk output ({doc['size_mib']} MiB)", fontsize=10)
    return save(fig, out / "gateway.png")


def by_server(docs: list[Doc], server: str) -> list[Doc]:
    rows = [r for doc in docs for r in doc["results"] if r["server"] == server and r["up"]]
    return sorted({r["n"]: r for r in rows}.values(), key=lambda r: r["n"])


def tunnel_memory(docs: list[Doc], out: Path) -> Path:
    hub, sshd = by_server(docs, "hub"), by_server(docs, "sshd")
    fig, ax = plt.subplots(figsize=SIZE)
    ax.plot([r["n"] for r in hub], [r["rss_per_tunnel_kib"] for r in hub], "o-", color=HUB,
            label="hub (RSS_N - RSS_0) / N")
    ax.plot([r["n"] for r in hub], [r["pss_per_tunnel_kib"] for r in hub], "s--", color=HUB,
            alpha=0.6, label="hub PSS delta / N")
    ax.plot([r["n"] for r in sshd], [r["pss_per_tunnel_kib"] for r in sshd], "^-", color=SSHD,
            label="sshd PSS per connection")
    ax.axhline(50, color="green", linestyle=":", label="target 50 KiB")
    for r in hub + sshd:
        ax.annotate(f"{r['pss_per_tunnel_kib']:.0f}", (r["n"], r["pss_per_tunnel_kib"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("idle tunnels N")
    ax.set_ylabel("KiB per tunnel")
    ax.set_title("Server memory per idle tunnel", fontsize=10)
    ax.legend(fontsize=7)
    return save(fig, out / "tunnels_memory.png")


def tunnel_times(docs: list[Doc], out: Path) -> Path:
    hub, sshd = by_server(docs, "hub"), by_server(docs, "sshd")
    fig, ax = plt.subplots(figsize=SIZE)
    storm = [r for r in hub if r["storm_up"]]
    ax.plot([r["n"] for r in storm], [r["storm_restore_s"] for r in storm], "o-", color=HUB,
            label="hub reconnect storm: restart -> all forwards back")
    ax.plot([r["n"] for r in hub], [r["bring_up_s"] for r in hub], "s--", color=HUB, alpha=0.6,
            label="hub first bring-up")
    ax.plot([r["n"] for r in sshd], [r["bring_up_s"] for r in sshd], "^-", color=SSHD,
            label="sshd first bring-up")
    ax.axhline(60, color="green", linestyle=":", label="target 60 s (10k storm)")
    for r in storm:
        ax.annotate(f"{r['storm_restore_s']:.0f}s", (r["n"], r["storm_restore_s"]),
                    textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("devices N")
    ax.set_ylabel("seconds")
    ax.set_title("Reconnect storm and bring-up time", fontsize=10)
    ax.legend(fontsize=7)
    return save(fig, out / "tunnels_time.png")


def render(all_doc: Doc, out: Path) -> list[Path]:
    """Every plot the document has data for; the files written."""
    out.mkdir(parents=True, exist_ok=True)
    benches = all_doc.get("benches", {})
    made = []
    single: dict[str, Callable[[Doc, Path], Path]] = {
        "throughput": throughput, "nsca": nsca, "gateway": gateway}
    for name, draw in single.items():
        if benches.get(name):
            made.append(draw(benches[name], out))
    tunnel_docs = [doc for name, doc in benches.items() if name.startswith("tunnels") and doc]
    if tunnel_docs:
        made += [tunnel_memory(tunnel_docs, out), tunnel_times(tunnel_docs, out)]
    return made


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("all_json", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/perf"))
    args = p.parse_args(argv)
    for path in render(json.loads(args.all_json.read_text()), args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
