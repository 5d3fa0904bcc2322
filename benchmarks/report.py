"""Every ratio the issue asks for, its target, pass/fail; the table, the JSON and the chart."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.settings import FLEET_PROCESSES, Sizes
from benchmarks.workloads import SYSTEMS, Figure


@dataclass(frozen=True)
class Check:
    """One line of the table: memtree's figure against a peer, a floor, a baseline or a
    bound, with the issue's target when it sets one."""

    workload: str
    label: str
    system: str
    case: str
    other: str | None = None  # another system's figure in the same case…
    other_case: str | None = None  # …or memtree's own figure in another case (backlog)
    target: float | None = None
    higher_is_better: bool = True  # for the ratio (or, without ``other``, the value itself)

    def evaluate(self, figures: dict[tuple[str, str, str], Figure]) -> dict[str, Any]:
        mine = figures.get((self.workload, self.case, self.system))
        theirs: Figure | None = None
        if self.other is not None:
            theirs = figures.get((self.workload, self.case, self.other))
        elif self.other_case is not None:
            theirs = figures.get((self.workload, self.other_case, self.system))
        comparing = self.other is not None or self.other_case is not None
        row: dict[str, Any] = {
            "workload": self.workload,
            "label": self.label,
            "system": self.system,
            "case": self.case,
            "other": self.other
            or (f"{self.system} {self.other_case}" if self.other_case else None),
            "value": mine.value if mine else None,
            "metric": mine.metric if mine else None,
            "other_value": theirs.value if theirs else None,
            "ratio": None,
            "target": self.target,
            "target_text": self.target_text(),
            "status": "n/a",
        }
        if mine is None or (comparing and theirs is None):
            return row
        measured = mine.value
        if comparing:
            assert theirs is not None
            measured = mine.value / theirs.value if theirs.value else float("inf")
            row["ratio"] = measured
        if self.target is None:
            row["status"] = "info"
        elif self.higher_is_better:
            row["status"] = "pass" if measured >= self.target else "FAIL"
        else:
            row["status"] = "pass" if measured <= self.target else "FAIL"
        return row

    def target_text(self) -> str:
        if self.target is None:
            return ""
        op = ">=" if self.higher_is_better else "<="
        if self.other is None and self.other_case is None:
            return f"{op} {self.target:g}"
        return f"{op} {self.target:g}x"


def checks(sizes: Sizes) -> list[Check]:
    """The issue's targets, plus the informational ratios against every peer."""
    out: list[Check] = []
    d = "drain"
    # Issue 14: memtree on MariaDB at >= 0.5x its floor.
    for db, floor_target in (("pg", 0.6), ("sqlite", 0.5), ("mariadb", 0.5)):
        mt, floor = f"memtree-{db}", f"floor-{db}"
        out.append(
            Check(d, "no-op drain, 1 process / floor", mt, "noop-1p", floor, None, floor_target)
        )
        out.append(
            Check(d, "no-op drain, 2 processes / floor", mt, "noop-2p", floor, None, floor_target)
        )
        tx_target = 0.5 if db == "mariadb" else 0.6
        out.append(
            Check(d, "one row + commit per job / floor", mt, "tx-1p", floor, None, tx_target)
        )
    out += [
        Check(
            d, "no-op drain, 1 process / pgqueuer", "memtree-pg", "noop-1p", "pgqueuer", None, 2.0
        ),
        Check(d, "no-op drain, 2 processes / pgqueuer", "memtree-pg", "noop-2p", "pgqueuer"),
        Check(
            d, "no-op drain / procrastinate", "memtree-pg", "noop-1p", "procrastinate", None, 20.0
        ),
        Check(d, "no-op drain / huey (fastest)", "memtree-sqlite", "noop-1p", "huey", None, 5.0),
        Check(d, "no-op drain / huey (defaults)", "memtree-sqlite", "noop-1p", "huey-default"),
    ]
    fl = "fleet"
    mp = "memtree-pg"
    out.append(
        Check(
            fl,
            "gated drain, Gate limit 64, 4 processes / ungated",
            mp,
            "gate64-4p",
            other_case="noop-4p",
            target=0.8,
        )
    )
    out.append(
        Check(
            fl,
            "gated drain, Gate limit 64, 4 processes of 16 slots / ungated, same slots",
            mp,
            "gate64-4p-c16",
            other_case="noop-4p-c16",
        )
    )
    for case, keyed in (("keyed1000x1-4p", "limit 1"), ("keyed1000x4-4p", "limit 4")):
        out.append(
            Check(
                fl,
                f"gate keyed over 1,000 values, {keyed}, 4 processes / ungated",
                mp,
                case,
                other_case="noop-4p",
            )
        )
    for processes in FLEET_PROCESSES:
        plural = "process" if processes == 1 else "processes"
        out.append(
            Check(
                fl,
                f"no-op drain, {processes} {plural} / floor",
                mp,
                f"noop-{processes}p",
                "floor-pg",
            )
        )
    e = "enqueue"
    for db in ("pg", "sqlite", "mariadb"):
        mt, floor = f"memtree-{db}", f"floor-{db}"
        single_target = 0.5 if db == "mariadb" else 0.6
        out.append(Check(e, "single (Session) / floor", mt, "single", floor, None, single_target))
        out.append(Check(e, "batched (enqueue_many) / floor", mt, "batched", floor, None, 0.5))
    out += [
        Check(e, "single / pgqueuer", "memtree-pg", "single", "pgqueuer"),
        Check(e, "single / procrastinate", "memtree-pg", "single", "procrastinate"),
        Check(e, "single / huey", "memtree-sqlite", "single", "huey"),
        Check(e, "batched / pgqueuer", "memtree-pg", "batched", "pgqueuer"),
        Check(e, "batched / procrastinate", "memtree-pg", "batched", "procrastinate"),
    ]
    lat = "latency"
    out += [
        Check(
            lat,
            "p50, worker in another process (ms)",
            "memtree-pg",
            "p50",
            target=3.0,
            higher_is_better=False,
        ),
        Check(
            lat,
            "p99, worker in another process (ms)",
            "memtree-pg",
            "p99",
            target=10.0,
            higher_is_better=False,
        ),
        Check(
            lat,
            "p50, worker in the same process (ms)",
            "memtree-sqlite",
            "p50",
            target=3.0,
            higher_is_better=False,
        ),
        Check(
            lat,
            "p99, worker in the same process (ms)",
            "memtree-sqlite",
            "p99",
            higher_is_better=False,
        ),
    ]
    for peer, db in (("pgqueuer", "pg"), ("procrastinate", "pg"), ("huey", "sqlite")):
        for q in ("p50", "p99"):
            out.append(
                Check(lat, f"{q} / {peer}", f"memtree-{db}", q, peer, higher_is_better=False)
            )
    b = "backlog"
    largest = max(sizes.backlog_done)
    for db in ("pg", "sqlite", "mariadb"):
        mt = f"memtree-{db}"
        for variant, name in (("worker", "worker claim"), ("all-kinds", "claim_batch, all kinds")):
            for done in sizes.backlog_done:
                out.append(
                    Check(
                        b,
                        f"{name}, {done:,} done / empty",
                        mt,
                        f"done-{done}/{variant}",
                        other_case=f"empty/{variant}",
                        target=1.2 if done == largest else None,
                        higher_is_better=False,
                    )
                )
            out.append(
                Check(
                    b,
                    f"{name}, {sizes.backlog_ready:,} ready waiting / empty",
                    mt,
                    f"ready-{sizes.backlog_ready}/{variant}",
                    other_case=f"empty/{variant}",
                    target=1.2,
                    higher_is_better=False,
                )
            )
        for scenario in ("empty", f"done-{largest}", f"ready-{sizes.backlog_ready}"):
            out.append(
                Check(
                    b,
                    f"worker claim / raw claim, {scenario}",
                    mt,
                    f"{scenario}/worker",
                    f"floor-{db}",
                    higher_is_better=False,
                )
            )
    for db in ("pg", "sqlite", "mariadb"):
        out.append(
            Check(
                "memory",
                f"RSS growth {sizes.memory_first_sample:,} -> {sizes.memory_jobs:,} jobs (%)",
                f"memtree-{db}",
                "growth",
                target=10.0,
                higher_is_better=False,
            )
        )
    return out


def _backlog_floor_keys(figures: list[Figure]) -> list[Figure]:
    """The floor has one claim variant ('raw'); index it under 'worker' for the ratio."""
    extra = []
    for f in figures:
        if f.workload == "backlog" and f.system.startswith("floor-") and f.case.endswith("/raw"):
            extra.append(
                Figure(f.workload, f.case[: -len("raw")] + "worker", f.system, f.metric, f.value)
            )
    return extra


def evaluate(figures: list[Figure], sizes: Sizes) -> list[dict[str, Any]]:
    index = {(f.workload, f.case, f.system): f for f in [*figures, *_backlog_floor_keys(figures)]}
    return [check.evaluate(index) for check in checks(sizes)]


# -- output --------------------------------------------------------------------------------


def _num(value: float | None, metric: str | None = None) -> str:
    if value is None:
        return "-"
    if metric == "jobs/s":
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _unit(metric: str | None) -> str:
    return {"jobs/s": " jobs/s", "ms": " ms", "MiB": " MiB", "%": " %"}.get(metric or "", "")


def table(rows: list[dict[str, Any]], title: str) -> Table:
    t = Table(title=title, show_lines=False, header_style="bold")
    t.add_column("workload")
    t.add_column("comparison")
    t.add_column("memtree", justify="right")
    t.add_column("against")
    t.add_column("their figure", justify="right")
    t.add_column("ratio", justify="right")
    t.add_column("target", justify="right")
    t.add_column("result")
    colors = {"pass": "green", "FAIL": "red", "info": "dim", "n/a": "yellow"}
    for row in rows:
        metric = row["metric"]
        mine = _num(row["value"], metric) + _unit(metric) if row["value"] is not None else "-"
        theirs = (
            _num(row["other_value"], metric) + _unit(metric)
            if row["other_value"] is not None
            else "-"
        )
        ratio = f"{row['ratio']:.3g}x" if row["ratio"] is not None else ""
        status = row["status"]
        t.add_row(
            row["workload"],
            f"{row['label']} [dim]({row['system']})[/]",
            mine,
            row["other"] or "",
            theirs,
            ratio,
            row["target_text"],
            f"[{colors[status]}]{status}[/]",
        )
    return t


def figures_table(figures: list[Figure]) -> Table:
    t = Table(title="Every figure", header_style="bold")
    for name in ("workload", "case", "system", "value"):
        t.add_column(name, justify="right" if name == "value" else "left")
    for f in figures:
        t.add_row(f.workload, f.case, f.system, _num(f.value, f.metric) + _unit(f.metric))
    return t


def markdown(rows: list[dict[str, Any]]) -> str:
    """The comparison table as Markdown (for docs/benchmarks.md)."""
    lines = [
        "| workload | comparison | memtree | against | their figure | ratio | target | result |",
        "|---|---|--:|---|--:|--:|--:|---|",
    ]
    for row in rows:
        metric = row["metric"]
        mine = _num(row["value"], metric) + _unit(metric) if row["value"] is not None else "-"
        theirs = (
            _num(row["other_value"], metric) + _unit(metric)
            if row["other_value"] is not None
            else "-"
        )
        ratio = f"{row['ratio']:.3g}x" if row["ratio"] is not None else ""
        status = {"pass": "pass", "FAIL": "**FAIL**", "info": "info", "n/a": "n/a"}[row["status"]]
        lines.append(
            f"| {row['workload']} | {row['label']} ({row['system']}) | {mine} | "
            f"{row['other'] or ''} | {theirs} | {ratio} | {row['target_text']} | {status} |"
        )
    return "\n".join(lines)


def figures_markdown(figures: list[Figure]) -> str:
    lines = ["| workload | case | system | figure | runs / detail |", "|---|---|---|--:|---|"]
    for f in figures:
        runs = f.detail.get("runs")
        extra = ", ".join(_num(r, f.metric) for r in runs) if runs and len(runs) > 1 else ""
        lines.append(
            f"| {f.workload} | {f.case} | {f.system} | {_num(f.value, f.metric)}{_unit(f.metric)}"
            f" | {extra} |"
        )
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def print_report(console: Console, figures: list[Figure], rows: list[dict[str, Any]]) -> None:
    console.print(figures_table(figures))
    console.print(
        table(rows, "memtree against its peers, the raw-SQL floor and the issue's targets")
    )


# -- the chart -----------------------------------------------------------------------------

_COLORS = {
    "memtree": "#2b7bba",
    "memtree-async": "#6baed6",
    "floor": "#7f7f7f",
    "pgqueuer": "#e08214",
    "procrastinate": "#8c510a",
    "huey": "#4d9221",
}


def _color(system: str) -> str:
    return _COLORS[SYSTEMS[system].family]


def chart(path: Path, figures: list[Figure], meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def pick(workload: str, case: str) -> list[Figure]:
        return [f for f in figures if f.workload == workload and f.case == case]

    fig, axes = plt.subplots(2, 3, figsize=(19, 12))
    fig.suptitle(
        f"memtree benchmarks, {meta.get('date', '')} ({meta.get('sizes', '')} run, "
        f"shared 2-core machine)",
        fontsize=13,
    )

    # 1. drain
    ax = axes[0][0]
    bars = [(f, "1 process") for f in pick("drain", "noop-1p")]
    bars += [(f, "2 processes") for f in pick("drain", "noop-2p")]
    labels = [f"{f.system}, {how}" for f, how in bars]
    drawn = ax.barh(labels, [f.value for f, _ in bars], color=[_color(f.system) for f, _ in bars])
    for patch, (_, how) in zip(drawn, bars, strict=True):
        if how != "1 process":
            patch.set_hatch("//")
    for patch, (f, _) in zip(drawn, bars, strict=True):
        ax.text(
            patch.get_width(),
            patch.get_y() + patch.get_height() / 2,
            f" {f.value:,.0f}",
            va="center",
            fontsize=6,
        )
    ax.set_xscale("log")
    ax.set_title("Drain, no-op jobs (jobs/s, log scale)")
    ax.tick_params(axis="y", labelsize=7)
    ax.invert_yaxis()

    # 2. transactional drain + enqueue
    ax = axes[0][1]
    rows = [(f"{f.system}\ntx drain", f) for f in pick("drain", "tx-1p")]
    rows += [(f"{f.system}\nenqueue single", f) for f in pick("enqueue", "single")]
    rows += [(f"{f.system}\nenqueue batched", f) for f in pick("enqueue", "batched")]
    ax.barh(
        [r[0] for r in rows], [r[1].value for r in rows], color=[_color(r[1].system) for r in rows]
    )
    ax.set_xscale("log")
    ax.set_title("Commit per job, and enqueue (jobs/s, log scale)")
    ax.tick_params(axis="y", labelsize=6)
    ax.invert_yaxis()

    # 3. latency
    ax = axes[0][2]
    p50 = pick("latency", "p50")
    p99 = {f.system: f.value for f in pick("latency", "p99")}
    xs = list(range(len(p50)))
    ax.bar(
        [x - 0.2 for x in xs],
        [f.value for f in p50],
        0.4,
        label="p50",
        color=[_color(f.system) for f in p50],
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [p99.get(f.system, 0) for f in p50],
        0.4,
        label="p99",
        color=[_color(f.system) for f in p50],
        alpha=0.5,
    )
    ax.axhline(3, color="green", linestyle="--", linewidth=1, label="target p50 3 ms")
    ax.axhline(10, color="red", linestyle=":", linewidth=1, label="target p99 10 ms")
    ax.set_xticks(xs, [f.system for f in p50], rotation=20, fontsize=8)
    ax.set_yscale("log")
    ax.set_title("Latency, commit to handler start (ms, log)")
    ax.legend(fontsize=7)

    # 4. backlog
    ax = axes[1][0]
    backlog = [f for f in figures if f.workload == "backlog"]
    scenarios: list[str] = []
    for f in backlog:
        scenario = f.case.split("/")[0]
        if scenario not in scenarios:
            scenarios.append(scenario)
    series: dict[str, dict[str, float]] = {}
    for f in backlog:
        scenario, variant = f.case.split("/")
        series.setdefault(f"{f.system} {variant}", {})[scenario] = f.value
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        system = name.split()[0]
        ax.bar(
            [x + i * width for x in range(len(scenarios))],
            [values.get(s, 0) for s in scenarios],
            width,
            label=name,
            color=_color(system),
            alpha=1.0 if "all-kinds" not in name else 0.5,
            edgecolor="black" if "sqlite" in name else None,
        )
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(scenarios))], scenarios, fontsize=8)
    ax.set_title("Backlog: median claim time (ms)")
    top = max((v for values in series.values() for v in values.values()), default=1.0)
    ax.set_ylim(0, top * 1.45)
    ax.legend(fontsize=6, ncol=2, loc="upper center")

    # 5. memory
    ax = axes[1][1]
    for f in pick("memory", "rss-last"):
        samples = f.detail.get("samples_mib", [])
        ax.plot(
            [s[0] for s in samples],
            [s[1] for s in samples],
            marker="o",
            label=f.system,
            color=_color(f.system),
            linestyle="-" if "pg" in f.system else "--",
        )
    ax.set_xlabel("jobs worked")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
    ax.set_ylim(bottom=0)
    ax.set_title("Worker resident memory (MiB)")
    ax.legend(fontsize=8)

    # 6. ratios against targets
    ax = axes[1][2]
    rows2 = [
        r
        for r in meta.get("checks", [])
        if r["target"] is not None and r["status"] in ("pass", "FAIL")
    ]
    names = [f"{r['label']} ({r['system']})" for r in rows2]
    progress = []
    for r in rows2:
        measured = r["ratio"] if r["ratio"] is not None else r["value"]
        if r["target_text"].startswith(">="):
            progress.append(measured / r["target"])
        else:
            progress.append(r["target"] / measured if measured else 10.0)
    ax.barh(names, progress, color=["#1a9850" if p >= 1 else "#d73027" for p in progress])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_title("Against the issue's targets (>1 = met)")
    ax.tick_params(axis="y", labelsize=6)
    ax.invert_yaxis()

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
