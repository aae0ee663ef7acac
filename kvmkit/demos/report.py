"""The report: Markdown with tables, PNG plots (matplotlib, no display needed) and the raw
figures as JSON, from the demo's figures and/or benchmark results.

Sections appear when their figures exist: ``host``, ``engines``, ``exits``, ``qmp``,
``linux`` (hot-plug, migration with its ``query-migrate`` timeline), ``io`` (its plots are
drawn by :func:`write_io_plots` when the step runs) and ``benchmarks``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _engines(figs: list[dict[str, Any]], out: Path, md: list[str]) -> None:
    done = [e for e in figs if not e.get("skipped") and not e.get("failed")]
    best = max((e["rate_per_s"] for e in done), default=0.0)
    rows = []
    for e in figs:
        if e.get("failed"):
            rows.append([e["engine"], "-", "-", "-", "-", "-", f"FAILED: {e['failed']}"])
            continue
        if e.get("skipped"):
            rows.append([e["engine"], "-", "-", "-", "-", "-", f"skipped: {e['skipped']}"])
            continue
        slow = f"{best / e['rate_per_s']:.1f}x" if e["rate_per_s"] else "-"
        rows.append(
            [
                e["engine"],
                f"{e['n']:,}",
                f"{e['compute_s']:.3f}",
                f"{e['boot_s']:.3f}",
                str(e["exits"]) if e["exits"] is not None else "n/a",
                f"{e['rate_per_s']:.3g}",
                slow,
            ]
        )
    md += [
        "## Engine comparison: the same `compute` guest four ways",
        "",
        _table(["engine", "n", "workload s", "boot s", "exits", "numbers/s", "slowdown"], rows),
        "",
    ]
    if done:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 3.2))
        names = [e["engine"] for e in done]
        ax.barh(names, [e["rate_per_s"] for e in done], color="#4477aa")
        ax.set_xscale("log")
        ax.set_xlabel("numbers sieved per second (log scale, higher is faster)")
        ax.invert_yaxis()
        for i, e in enumerate(done):
            ax.text(e["rate_per_s"], i, f" {e['rate_per_s']:.3g}", va="center", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "engines.png", dpi=110)
        plt.close(fig)
        md += ["![engine comparison](engines.png)", ""]


def _exits(figs: dict[str, Any], out: Path, md: list[str]) -> None:
    from kvmkit.demos.exits import AGREEMENT, ExitFigure, ExitTable, table_rows

    fields = ("case", "way", "n1", "n2", "marks_us", "whole_process_us", "samples")
    table = ExitTable(
        [ExitFigure(**{k: f[k] for k in fields}) for f in figs["figures"]],
        dict(figs.get("unavailable", {})),
    )
    md += [
        "## Exit cost by kind (µs per exit)",
        "",
        "Between the guest's own two marks, so set-up is outside on every side; checked "
        "against whole processes of N1 and N2 exits, (T(N2) - T(N1)) / (N2 - N1). A figure "
        f"whose two measures differ by more than {AGREEMENT:.0%} is marked UNRELIABLE.",
        "",
        _table(
            ["exit", "way", "µs/exit", "vs raw C", "whole-process µs/exit"],
            [[str(c) for c in row] for row in table_rows(table)],
        ),
        "",
    ]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(table.figures) + 1.2))
    labels = [f"{f.case}: {f.way}" for f in table.figures]
    ax.barh(labels, [f.marks_us for f in table.figures], color="#4477aa", label="guest marks")
    ax.plot(
        [f.whole_process_us for f in table.figures],
        labels,
        "o",
        color="#ee6677",
        label="whole processes",
    )
    ax.set_xlabel("µs per exit")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "exit_cost.png", dpi=110)
    plt.close(fig)
    md += ["![exit cost](exit_cost.png)", ""]


def _qmp(figs: list[dict[str, Any]], out: Path, md: list[str]) -> None:
    rows = [[q["client"], q["mode"], f"{q['per_s']:.0f}"] for q in figs]
    md += [
        "## QMP throughput (`query-status` round trips per second)",
        "",
        _table(["client", "mode", "per second"], rows),
        "",
    ]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.barh(
        [f"{q['client']} ({q['mode']})" for q in figs], [q["per_s"] for q in figs], color="#228833"
    )
    ax.set_xlabel("query-status per second")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "qmp_throughput.png", dpi=110)
    plt.close(fig)
    md += ["![QMP throughput](qmp_throughput.png)", ""]


def _linux(figs: dict[str, Any], out: Path, md: list[str]) -> None:
    md += [f"## A Linux guest under QEMU ({figs.get('accel', '?')})", ""]
    rows = [["boot to shell", f"{figs.get('boot_s', 0):.2f} s"]]
    if "hotplug_disk" in figs:
        d = figs["hotplug_disk"]
        rows.append([f"hot-added disk seen as /dev/{d['guest_name']}", f"{d['seconds']:.2f} s"])
    if "unplug_s" in figs:
        rows.append(["disk unplug (DEVICE_DELETED)", f"{figs['unplug_s']:.2f} s"])
    mig = figs.get("migration")
    if mig:
        rows += [
            [
                f"migration of a {figs.get('memory_mib', '?')} MiB guest: total",
                f"{mig['total_time_ms']} ms",
            ],
            ["migration downtime", f"{mig['downtime_ms']} ms"],
            ["migration setup", f"{mig['setup_time_ms']} ms"],
            ["bytes transferred", f"{mig['transferred_bytes'] / 2**20:.1f} MiB"],
            ["throughput", f"{mig['throughput_mib_s']} MiB/s"],
            ["guest counter before / after", f"{mig['counter_before']} / {mig['counter_after']}"],
        ]
    md += [_table(["what", "figure"], rows), ""]
    samples = (mig or {}).get("samples") or []
    if samples:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot(
            [s["t_s"] for s in samples],
            [s["remaining_bytes"] / 2**20 for s in samples],
            marker=".",
            color="#aa3377",
        )
        ax.set_xlabel("seconds since migrate")
        ax.set_ylabel("RAM still to send (MiB)")
        ax.set_title("migration timeline (query-migrate samples)")
        fig.tight_layout()
        fig.savefig(out / "migration_timeline.png", dpi=110)
        plt.close(fig)
        md += ["![migration timeline](migration_timeline.png)", ""]


def _benchmarks(results: list[dict[str, Any]], out: Path, md: list[str]) -> None:
    md += ["## Benchmarks (ratios to a baseline measured in the same run)", ""]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["benchmark"], []).append(r)
    plt = _pyplot()
    for name, rows in groups.items():
        table = [
            [
                r["case"],
                f"{r['value']:.2f} {r['unit']}"
                + ("" if r.get("reliable") or r.get("published") else " (UNRELIABLE)"),
                f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-",
                r.get("baseline_case") or "",
                f"{r['check']:.2f}" if r.get("check") is not None else "-",
                r.get("target") or (f"published: {r['published']}" if r.get("published") else ""),
            ]
            for r in rows
        ]
        slug = "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
        md += [
            f"### {name}",
            "",
            _table(["case", "value", "ratio", "baseline", "cross-check", "target"], table),
            "",
        ]
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
        ax.barh([r["case"] for r in rows], [r["value"] for r in rows], color="#4477aa")
        ax.set_xlabel(rows[0]["unit"])
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out / f"bench_{slug}.png", dpi=110)
        plt.close(fig)
        md += [f"![{name}](bench_{slug}.png)", ""]


_EMULATED, _PARAVIRTUAL = "#cc6677", "#4477aa"
#: Where a bar of 0 sits on a log axis (it is labelled "0").
_LOG_FLOOR = 1e-3


def _log_bars(ax: Any, labels: list[str], values: list[float], kinds: list[str]) -> None:
    """Bars on a log axis, coloured emulated/paravirtual, each labelled with its value
    (a 0 drawn at the floor and labelled 0)."""
    colors = [_EMULATED if k == "emulated" else _PARAVIRTUAL for k in kinds]
    shown = [max(v, _LOG_FLOOR) for v in values]
    bars = ax.bar(range(len(values)), shown, color=colors)
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, fontsize=7, rotation=20, ha="right")
    ax.set_yscale("log")
    ax.set_ylim(bottom=_LOG_FLOOR / 2)
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(color=_EMULATED, label="emulated"),
            Patch(color=_PARAVIRTUAL, label="paravirtual"),
        ],
        fontsize=7,
    )


def write_io_plots(figures: dict[str, Any], directory: Path) -> list[str]:
    """The ``io`` step's plots: ``io_exits.png`` (exits per KiB, log scale) and
    ``io_throughput.png`` (MiB/s: the runner's ways, log scale, beside QEMU's disks);
    each names the KVM backend and the accelerator.  Returns the names written."""
    plt = _pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    backend = figures.get("backend", "?")
    notes = "; ".join(figures.get("notes", []))
    names = []
    runner = figures.get("runner")
    qemu = figures.get("qemu")
    if runner:
        ts = runner["transfers"]
        fig, ax = plt.subplots(figsize=(8, 4.2))
        _log_bars(
            ax, [t["label"] for t in ts], [t["exits_per_kib"] for t in ts], [t["kind"] for t in ts]
        )
        ax.set_ylabel("VM exits per KiB sent (log scale)", fontsize=8)
        ax.set_title(
            f"kvmkit runner, accel {runner['accel']} (KVM backend {backend}): "
            "exits per KiB, counted",
            fontsize=9,
        )
        fig.text(0.01, 0.01, _wrap(notes), fontsize=5, color="grey")
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        fig.savefig(directory / "io_exits.png", dpi=110)
        plt.close(fig)
        names.append("io_exits.png")
    if runner or qemu:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [3, 1.3]})
        if runner:
            ts = runner["transfers"]
            _log_bars(
                axes[0],
                [t["label"] for t in ts],
                [t["mib_per_s"] or 0 for t in ts],
                [t["kind"] for t in ts],
            )
            axes[0].set_ylabel("MiB/s (log scale)", fontsize=8)
            axes[0].set_title(f"kvmkit runner, accel {runner['accel']}", fontsize=9)
        else:
            axes[0].set_axis_off()
        if qemu:
            ws = qemu["writes"]
            colors = [_EMULATED if w["kind"] == "emulated" else _PARAVIRTUAL for w in ws]
            bars = axes[1].bar(
                [w["disk"].split(" (")[0] for w in ws], [w["mib_per_s"] for w in ws], color=colors
            )
            axes[1].bar_label(bars, labels=[f"{w['mib_per_s']:.3g}" for w in ws], fontsize=7)
            axes[1].set_ylabel(f"MiB/s, dd {ws[0]['mib']} MiB oflag=direct", fontsize=8)
            axes[1].set_title(f"QEMU pc, Linux, accel {qemu['accel']}", fontsize=9)
            axes[1].tick_params(axis="x", labelsize=7)
        else:
            axes[1].set_axis_off()
        fig.suptitle(
            f"Emulated beside paravirtual I/O: throughput (KVM backend {backend})", fontsize=10
        )
        fig.text(0.01, 0.01, _wrap(notes), fontsize=5, color="grey")
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        fig.savefig(directory / "io_throughput.png", dpi=110)
        plt.close(fig)
        names.append("io_throughput.png")
    return names


def _wrap(text: str, width: int = 200) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _io(figs: dict[str, Any], md: list[str]) -> None:
    md += [f"## Emulated and paravirtual I/O (KVM backend {figs.get('backend', '?')})", ""]
    runner = figs.get("runner")
    if runner:
        md += [
            f"kvmkit runner, accel {runner['accel']}; exits are the run's minus a baseline "
            f"run's ({runner['baseline_exits']}), counted by the runner.",
            "",
            _table(
                ["way", "bytes", "exits", "exits/KiB", "MiB/s", "data"],
                [
                    [
                        t["label"],
                        str(t["bytes"]),
                        str(t["exits"]),
                        f"{t['exits_per_kib']:.3g}",
                        f"{t['mib_per_s']:.3g}",
                        "ok" if t["checksum_ok"] else "WRONG",
                    ]
                    for t in runner["transfers"]
                ],
            ),
            "",
        ]
    qemu = figs.get("qemu")
    if qemu:
        md += [
            f"QEMU {qemu['machine']}, Linux {qemu['kernel']}, accel {qemu['accel']}; "
            "`query-blockstats` deltas of the fastest pass:",
            "",
            _table(
                ["disk", "MiB", "MiB/s", "wr_operations", "wr_bytes", "wr_total_time_ns"],
                [
                    [
                        w["disk"],
                        str(w["mib"]),
                        f"{w['mib_per_s']:.3g}",
                        str(w["wr_operations"]),
                        str(w["wr_bytes"]),
                        str(w["wr_total_time_ns"]),
                    ]
                    for w in qemu["writes"]
                ],
            ),
            "",
        ]
    md += [f"- Note: {n}" for n in figs.get("notes", [])] + [""]
    md += [f"![{p}]({p})" for p in figs.get("plots", [])] + [""]


def _containers(figs: dict[str, Any], md: list[str]) -> None:
    md += ["## VMs and containers", ""]
    rows = [
        [
            r["kind"],
            str(r["count"]),
            r["accel"],
            f"{r['median_start_s'] * 1000:.0f} ms" if r.get("median_start_s") else "-",
            f"{r['mean_memory_bytes'] / 2**20:.1f} MiB ({r['memory_measure']})"
            if r.get("mean_memory_bytes")
            else "-",
        ]
        for r in figs.get("rounds", [])
    ]
    md += [_table(["instance", "at once", "accel", "start to first output", "memory each"], rows)]
    md += [""] + [f"- `uname -r` in {k}: {v}" for k, v in figs.get("uname", {}).items()]
    md += [f"- Skipped {k}: {v}" for k, v in figs.get("skipped", {}).items()]
    md += [f"- Note: {n}" for n in figs.get("notes", [])] + [""]
    md += [f"![{p}]({p})" for p in figs.get("plots", [])] + [""]


def _snapshots(figs: dict[str, Any], md: list[str]) -> None:
    md += ["## Snapshot, clones and live migration of a kvmkit VM", ""]
    snap = figs.get("snapshot", {})
    if snap:
        md += [
            f"- Uninterrupted run: checksum {snap.get('uninterrupted')}; snapshot "
            f"{snap.get('disk_mib')} MiB on disk.",
            *(
                f"- Clone {i}: ready in {c['ready_ms']} ms, checksum {c['checksum']}"
                for i, c in enumerate(snap.get("clones", []), 1)
            ),
        ]
    mig = figs.get("migration", {})
    if mig:
        md += [
            "- Live migration: "
            + ", ".join(
                f"{k.replace('_', ' ')} {v}"
                for k, v in mig.items()
                if k in ("total_ms", "downtime_ms", "rounds", "bytes")
            )
        ]
    md += [""] + [f"![{p}]({p})" for p in figs.get("plots", [])] + [""]


def write_report(figures: dict[str, Any], directory: Path) -> Path:
    """Write ``report.md``, the PNGs and ``figures.json`` into ``directory``; return the
    Markdown file's path."""
    directory.mkdir(parents=True, exist_ok=True)
    md = ["# kvmkit report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", ""]
    host = figures.get("host")
    if host:
        md += [
            "## Host",
            "",
            _table(
                ["", ""],
                [
                    ["backend", host["backend"]],
                    ["meaning", host["backend_meaning"]],
                    ["KVM API", str(host["api_version"])],
                ],
            ),
            "",
        ]
    if figures.get("engines"):
        _engines(figures["engines"], directory, md)
    if figures.get("exits"):
        _exits(figures["exits"], directory, md)
    qmp = list(figures.get("qmp") or [])
    linux = figures.get("linux")
    if linux and "qmp_query_status_per_s" in linux and not qmp:
        qmp = [
            {
                "client": "kvmkit",
                "mode": "sequential, live guest",
                "per_s": linux["qmp_query_status_per_s"],
            }
        ]
    if qmp:
        _qmp(qmp, directory, md)
    if linux:
        _linux(linux, directory, md)
    if figures.get("containers"):
        _containers(figures["containers"], md)
    if figures.get("io"):
        _io(figures["io"], md)
    if figures.get("snapshots"):
        _snapshots(figures["snapshots"], md)
    if figures.get("benchmarks"):
        _benchmarks(figures["benchmarks"], directory, md)
    if figures.get("failed"):
        md += (
            ["## FAILED", ""]
            + [f"- {step}: {why}" for step, why in figures["failed"].items()]
            + [""]
        )
    if figures.get("skipped"):
        md += (
            ["## Skipped", ""]
            + [f"- {step}: {why}" for step, why in figures["skipped"].items()]
            + [""]
        )
    status = figures.get("status") or {}
    if status:
        md += (
            ["## Benchmarks run", ""]
            + [
                f"- {name}: {s['status'].upper() if s['status'] == 'failed' else s['status']}"
                + (f" ({s['detail']})" if s.get("detail") else "")
                for name, s in status.items()
            ]
            + [""]
        )
    (directory / "figures.json").write_text(json.dumps(figures, indent=2, default=str))
    path = directory / "report.md"
    path.write_text("\n".join(md))
    return path
