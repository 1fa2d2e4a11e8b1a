"""The report of a benchmark run: the terminal table, results.md,
results.json and a plot of time against size per op."""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from .harness import CaseResult, Measurement


def _format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _cell(result: CaseResult, measurement: Measurement | None) -> str:
    if measurement is None:
        return ""
    if measurement.status != "ok":
        return measurement.status
    speedup = result.genfast_speedup(measurement)
    if speedup is None or measurement is result.fastest_genfast():
        return _format_time(measurement.median_s)
    return f"{_format_time(measurement.median_s)} ({speedup:.2f}×)"


OpTable = tuple[list[str], list[list[str]]]  # a header and rows of text


def op_tables(results: list[CaseResult], rates: dict[str, Any]) -> dict[str, OpTable]:
    """Per op, a header and rows of text, shared by the terminal table and results.md.

    A provider gets a column only if it could run on this machine; the notes list the others."""
    by_op: dict[str, list[CaseResult]] = defaultdict(list)
    for result in results:
        by_op[result.case.op].append(result)
    tables = {}
    for op, op_results in by_op.items():
        columns = list(
            dict.fromkeys(m.provider for r in op_results for m in r.measurements if m.status != "unavailable")
        )
        header = ["case", "direction", *columns, "fastest genfast", "genfast / roofline"]
        rows = []
        for result in op_results:
            by_name = {m.provider: m for m in result.measurements}
            best = result.fastest_genfast()
            fraction = result.roofline_fraction(best, rates) if best else None
            rows.append(
                [
                    result.case.name,
                    result.case.direction,
                    *(_cell(result, by_name.get(name)) for name in columns),
                    best.provider if best else "none ran",
                    f"{fraction:.0%}" if fraction is not None else "",
                ]
            )
        tables[op] = (header, rows)
    return tables


def notes(results: list[CaseResult]) -> list[str]:
    """Why each provider that did not run did not, once per distinct reason."""
    return list(
        dict.fromkeys(
            f"{m.provider}: {m.status}: {m.reason}" for r in results for m in r.measurements if m.status != "ok"
        )
    )


def _summary_line(machine: dict[str, Any], rates: dict[str, Any]) -> str:
    return (
        f"{machine['device']} · {machine['cpu']} · {machine['torch_threads']} threads · torch {machine['torch']} · "
        f"memory {rates['memory_bytes_per_s'] / 1e9:.1f} GB/s · "
        f"matmul {rates['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s ({rates['matmul']})"
    )


SPEEDUP_LEGEND = (
    "(n×): the fastest genfast backend is n times faster than this provider, measured in the same run; "
    "genfast / roofline: its share of the time that the measured memory bandwidth or matmul rate allows."
)


def print_report(console: Console, tables: dict[str, OpTable], result_notes: list[str], summary: str) -> None:
    console.print(summary)
    for op, (header, rows) in tables.items():
        # Provider names such as "genfast[cpu]" would read as rich markup.
        table = Table(*map(escape, header), title=op, caption=SPEEDUP_LEGEND)
        for row in rows:
            table.add_row(*map(escape, row))
        console.print(table)
    for note in result_notes:
        console.print(note, style="dim", markup=False)


def markdown(tables: dict[str, OpTable], result_notes: list[str], summary: str) -> str:
    lines = [summary, ""]
    for op, (header, rows) in tables.items():
        lines += [f"### {op}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    lines += [SPEEDUP_LEGEND, ""]
    lines += [f"- {note}" for note in result_notes]
    return "\n".join(lines) + "\n"


VARIANT_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))  # (line, marker): a lone point shows its marker


def plot(op: str, results: list[CaseResult], path: Path) -> None:
    """Median time against size, log-log: a panel per direction, a line per provider and variant.

    A provider keeps its colour across panels and variants; a variant keeps its line and marker style."""
    directions = list(dict.fromkeys(r.case.direction for r in results))
    providers = list(dict.fromkeys(m.provider for r in results for m in r.measurements if m.status == "ok"))
    variants = list(dict.fromkeys(r.case.variant for r in results))
    figure = Figure(figsize=(6 * len(directions), 4.5))
    for panel, direction in enumerate(directions, start=1):
        axes = figure.add_subplot(1, len(directions), panel)
        lines: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
        for result in results:
            if result.case.direction == direction:
                for m in result.measurements:
                    if m.status == "ok":
                        lines[m.provider, result.case.variant].append((result.case.size, m.median_s))
        for (provider, variant), points in lines.items():
            sizes, times = zip(*sorted(points))
            line, marker = VARIANT_STYLES[variants.index(variant) % len(VARIANT_STYLES)]
            axes.plot(
                sizes,
                times,
                linestyle=line,
                marker=marker,
                color=f"C{providers.index(provider) % 10}",
                label=f"{provider} ({variant})" if len(variants) > 1 else provider,
            )
        axes.set(
            xscale="log",
            yscale="log",
            title=f"{op} {direction}",
            xlabel="size (elements of the main input)",
            ylabel="median time (s)",
        )
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def spread(times_s: list[float]) -> dict[str, Any] | None:
    """How the timed runs spread around the median: results.json keeps this, not every run."""
    if not times_s:
        return None
    quartiles = statistics.quantiles(times_s, n=4) if len(times_s) > 1 else [times_s[0]] * 3
    return {"runs": len(times_s), "min_s": min(times_s), "p25_s": quartiles[0], "p75_s": quartiles[2], "max_s": max(times_s)}


def to_json(results: list[CaseResult], machine: dict, rates: dict, settings: dict) -> dict[str, Any]:
    return {
        "machine": machine,
        "rates": rates,
        "settings": settings,
        "cases": [
            {
                "name": r.case.name,
                "op": r.case.op,
                "direction": r.case.direction,
                "variant": r.case.variant,
                "size": r.case.size,
                "bytes": r.case.bytes,
                "flops": r.case.flops,
                "input_sets": r.input_sets,
                "fastest_genfast": getattr(r.fastest_genfast(), "provider", None),
                "providers": {
                    m.provider: {
                        "status": m.status,
                        "reason": m.reason,
                        "median_s": m.median_s,
                        "genfast_speedup": r.genfast_speedup(m),
                        "roofline_fraction": r.roofline_fraction(m, rates),
                        "spread": spread(m.times_s),
                    }
                    for m in r.measurements
                },
            }
            for r in results
        ],
    }


def write_report(
    out: Path, results: list[CaseResult], machine: dict, rates: dict, settings: dict, console: Console
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tables = op_tables(results, rates)
    result_notes = notes(results)
    summary = _summary_line(machine, rates)
    print_report(console, tables, result_notes, summary)
    (out / "results.json").write_text(json.dumps(to_json(results, machine, rates, settings), indent=1) + "\n")
    (out / "results.md").write_text(markdown(tables, result_notes, summary))
    for op in tables:
        plot(op, [r for r in results if r.case.op == op], out / (re.sub(r"[^\w.-]", "_", op) + ".png"))
    console.print(f"wrote {out}/results.json, results.md and {len(tables)} plot(s)")
