"""`llmep usage`: requests, tokens and rate-limited requests per key and model, read from the
gateways' Prometheus counters: totals since each gateway started, or what a window added."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from llmep_serving.scrape import GATEWAY_SELECTOR, Gateway, ScrapeError, metrics_url, pod_gateways, url_gateway

REQUESTS = "llmep_gateway_key_requests"
TOKENS = "llmep_gateway_key_tokens"
RATE_LIMITED = "llmep_gateway_key_rate_limited"
# Each family's label besides key and model.
SPLIT_LABEL = {REQUESTS: "code", TOKENS: "type", RATE_LIMITED: "limit"}
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


class Series(NamedTuple):
    family: str
    key: str
    model: str
    split: str  # the value of the family's SPLIT_LABEL


Counts = dict[Series, float]


class Window(NamedTuple):
    text: str
    seconds: int


def window(text: str) -> Window:
    """argparse type of --window."""
    match = re.fullmatch(r"([0-9]+)([smh])", text)
    if not match or int(match[1]) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: give a whole number of seconds, minutes or hours, e.g. 30s, 5m or 1h"
        )
    return Window(text, int(match[1]) * UNIT_SECONDS[match[2]])


def parse_counts(text: str) -> Counts:
    counts: Counts = {}
    for family in text_string_to_metric_families(text):
        split = SPLIT_LABEL.get(family.name)
        if split is None:
            continue
        for sample in family.samples:
            if sample.name == f"{family.name}_total":  # not its _created
                labels = sample.labels
                series = Series(family.name, labels.get("key", ""), labels.get("model", ""), labels.get(split, ""))
                counts[series] = counts.get(series, 0.0) + sample.value
    return counts


@dataclass(frozen=True)
class Change:
    counts: Counts
    restarted: bool


def change(before: Counts, after: Counts) -> Change:
    """What one gateway counted between two scrapes. A counter that went down (or vanished) means
    the gateway restarted in between, and then all it counts now was counted since its restart."""
    if any(after.get(series, 0.0) < value for series, value in before.items()):
        return Change(counts=dict(after), restarted=True)
    return Change(counts={series: value - before.get(series, 0.0) for series, value in after.items()}, restarted=False)


@dataclass(frozen=True)
class Usage:
    key: str
    model: str
    requests: int
    requests_by_code: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    rate_limited: int
    rate_limited_by_limit: dict[str, int]


def usage_rows(counts: Counts) -> list[Usage]:
    """One row per key and model that counted anything, sorted."""
    by_pair: dict[tuple[str, str], dict[str, dict[str, int]]] = {}
    for series, value in counts.items():
        if value:
            families = by_pair.setdefault((series.key, series.model), {name: {} for name in SPLIT_LABEL})
            split = families[series.family]
            split[series.split] = split.get(series.split, 0) + round(value)
    return [
        Usage(
            key=key,
            model=model,
            requests=sum(f[REQUESTS].values()),
            requests_by_code=dict(sorted(f[REQUESTS].items())),
            prompt_tokens=f[TOKENS].get("prompt", 0),
            completion_tokens=f[TOKENS].get("completion", 0),
            rate_limited=sum(f[RATE_LIMITED].values()),
            rate_limited_by_limit=dict(sorted(f[RATE_LIMITED].items())),
        )
        for (key, model), f in sorted(by_pair.items())
    ]


@dataclass(frozen=True)
class Report:
    title: str
    gateways: list[str]
    window: str | None
    rows: list[Usage]
    notes: list[str]
    empty: str  # what to say when there are no rows


def scrape(gateways: list[Gateway]) -> dict[str, Counts]:
    counts = {}
    for gateway in gateways:
        text = gateway.read()
        try:
            counts[gateway.name] = parse_counts(text)
        except ValueError as error:
            raise ScrapeError(f"{gateway.name} did not answer Prometheus metrics ({error}): is it /metrics?") from None
    return counts


def _sum(parts: list[Counts]) -> Counts:
    total: Counts = {}
    for part in parts:
        for series, value in part.items():
            total[series] = total.get(series, 0.0) + value
    return total


def totals_report(counts: dict[str, Counts]) -> Report:
    names = list(counts)
    return Report(
        title=f"Totals per key and model since each gateway started ({_gateways(names)})",
        gateways=names,
        window=None,
        rows=usage_rows(_sum(list(counts.values()))),
        notes=[],
        empty=_no_key_metrics(names),
    )


def _no_key_metrics(names: list[str]) -> str:
    return (
        f"No per-key metrics yet at {', '.join(names)}: a gateway counts a key once it has answered"
        " a request made with it (and only gateways that export llmep_gateway_key_* metrics do)."
    )


def window_report(before: dict[str, Counts], after: dict[str, Counts], span: Window) -> Report:
    parts, notes = [], []
    for name, now in after.items():
        if name not in before:
            notes.append(f"{name} was not Ready at the first scrape: all it has counted is included")
            parts.append(now)
            continue
        delta = change(before[name], now)
        if delta.restarted:
            notes.append(f"{name} restarted during the window (a counter went down): counted from its restart")
        parts.append(delta.counts)
    notes += [
        f"{name} was gone at the second scrape: what it counted is left out" for name in before if name not in after
    ]
    names = list(after)
    return Report(
        title=f"Usage per key and model over the last {span.text} ({_gateways(names)})",
        gateways=names,
        window=span.text,
        rows=usage_rows(_sum(parts)),
        notes=notes,
        empty=f"No requests with a key in the last {span.text} at {', '.join(names)}."
        if any(before.values()) or any(after.values())
        else _no_key_metrics(names),
    )


def _gateways(names: list[str]) -> str:
    return f"{len(names)} gateway{'s' if len(names) != 1 else ''}"


def _split(total: int, by: dict[str, int]) -> str:
    return f"{total:,} ({', '.join(f'{k} {v:,}' for k, v in by.items())})" if total else "0"


def print_table(report: Report, console: Console) -> None:
    # Names and URLs are printed as they are, never read as rich markup ([::1] would vanish).
    if not report.rows:
        console.print(report.empty, markup=False, highlight=False)
    else:
        console.print(_table(report))
    for note in report.notes:
        console.print(f"note: {note}", markup=False, highlight=False)


def _table(report: Report) -> Table:
    table = Table(title=escape(report.title))
    for column in ("key", "model", "requests", "prompt tokens", "completion tokens", "rate-limited"):
        table.add_column(column, justify="left" if column in ("key", "model") else "right")
    for row in report.rows:
        table.add_row(
            escape(row.key),
            escape(row.model) or "(none)",  # the gateway answered before it knew the model (e.g. a bad body)
            f"{row.requests:,}",
            f"{row.prompt_tokens:,}",
            f"{row.completion_tokens:,}",
            _split(row.rate_limited, row.rate_limited_by_limit),
        )
    return table


def print_json(report: Report) -> None:
    document = {
        "window": report.window,
        "gateways": report.gateways,
        "usage": [asdict(row) for row in report.rows],
        "notes": report.notes,
    }
    print(json.dumps(document, indent=2))
    if not report.rows:
        print(report.empty, file=sys.stderr)


def wait(span: Window, gateways: int) -> None:
    """Sleep through the window with a countdown on stderr (drawn only on a terminal)."""
    stderr = Console(stderr=True)
    stderr.print(f"scraped {gateways} gateway(s); scraping again in {span.text}")
    columns = (TextColumn("waiting for the window to pass"), BarColumn(), TextColumn("{task.fields[left]} left"))
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task("", total=span.seconds, left="")
        end = time.monotonic() + span.seconds
        while (left := end - time.monotonic()) > 0:
            minutes, seconds = divmod(math.ceil(left), 60)
            progress.update(task, completed=span.seconds - left, left=f"{minutes}:{seconds:02d}")
            time.sleep(min(left, 0.25))


def run(args: argparse.Namespace) -> int:
    def gateways() -> list[Gateway]:
        return [url_gateway(url) for url in args.url] if args.url else pod_gateways(args.namespace, args.selector)

    try:
        first = scrape(gateways())
        if args.window:
            wait(args.window, len(first))
            report = window_report(first, scrape(gateways()), args.window)
        else:
            report = totals_report(first)
    except ScrapeError as error:
        print(f"llmep usage: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.output == "json":
        print_json(report)
    else:
        print_table(report, Console())
    return 0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    usage = commands.add_parser(
        "usage", help="requests, tokens and rate-limited requests per key and model, from the gateways' metrics"
    )
    usage.add_argument(
        "--url",
        action="append",
        type=metrics_url,
        help="a gateway's metrics URL; repeat it for each replica (summed). Default: every Ready gateway pod in -n",
    )
    usage.add_argument("--namespace", "-n", default="llmep-system", help="the gateway's namespace (without --url)")
    usage.add_argument("--selector", "-l", default=GATEWAY_SELECTOR, help="labels of the gateway pods (without --url)")
    usage.add_argument(
        "--window", type=window, help="scrape, wait this long (30s, 5m, 1h), scrape again and show the difference"
    )
    usage.add_argument("--output", "-o", choices=("table", "json"), default="table")
    usage.set_defaults(func=run)
