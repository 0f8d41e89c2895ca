"""`llmep status` and `llmep keys`: what a platform engineer checks and changes day to day."""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import secrets
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from llmep_operator.api import GROUP, PLURAL, VERSION, ConditionType
from llmep_operator.api.conditions import condition
from llmep_serving.gateway.auth import KEY_LABEL, PRIORITIES

KEY_PREFIX = "sk-llmep-"
console = Console()

# A key's limits: (Secret data field the gateway reads, flag of `keys create`, what it counts, example).
LIMITS = (
    ("rpm", "--rpm", "requests per minute", "60"),
    ("tpm", "--tpm", "tokens per minute", "20000"),
    ("tokens_per_day", "--max-tokens-per-day", "tokens per day", "1000000"),
)


def _limit_type(flag: str, unit: str, example: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number of at least 1: give the {unit}, e.g. {flag} {example},"
                f" or leave {flag} out for no limit"
            )
        return int(text)

    return parse


def _clients() -> tuple[Any, Any]:
    """CoreV1Api and CustomObjectsApi, used as Any: the client's models declare every field
    Optional (metadata too) and custom objects as `object`, though the API server fills them."""
    from kubernetes import client

    from llmep_operator.kube import load_config

    api = client.ApiClient(load_config())
    return client.CoreV1Api(api), client.CustomObjectsApi(api)


def status(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException

    _, custom = _clients()
    try:
        if args.all_namespaces:
            items = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
        else:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, args.namespace, PLURAL)["items"]
    except ApiException as error:
        print(f"llmep status: cannot list LLMEndpoints: {error.status} {error.reason}", file=sys.stderr)
        return 1
    if not items:
        where = "any namespace" if args.all_namespaces else f"namespace {args.namespace}"
        console.print(f"No LLMEndpoints in {where}. Try: kubectl apply -f examples/qwen2.5-7b-aliases.yaml")
        return 0
    table = Table(title="LLMEndpoints", show_lines=True)
    for column in ("endpoint", "models", "ready", "replicas", "url", "what is happening"):
        table.add_column(column, overflow="fold")
    not_ready = 0
    for obj in sorted(items, key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"])):
        meta, st = obj["metadata"], obj.get("status") or {}
        ready = condition(st, ConditionType.READY)
        stale = st.get("observedGeneration") != meta.get("generation")
        replicas = st.get("replicas") or {}
        state = f"{ready.get('status', 'Unknown')} ({ready.get('reason', 'not reconciled yet')})"
        detail = ready.get("message", "")
        degraded = condition(st, ConditionType.DEGRADED)
        if degraded.get("status") == "True" and degraded.get("message") and degraded["message"] != detail:
            detail += f"\nDegraded: {degraded['message']}"
        if stale:
            detail += "\n(the operator has not processed the latest change yet)"
        not_ready += ready.get("status") != "True"
        table.add_row(
            f"{meta['namespace']}/{meta['name']}",
            ", ".join(st.get("models") or []),
            state,
            f"{replicas.get('ready', 0)}/{replicas.get('desired', 0)}",
            st.get("url", ""),
            detail,
        )
    console.print(table)
    return 0 if not_ready == 0 or not args.exit_code else 3


def keys_create(args: argparse.Namespace) -> int:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core, _ = _clients()
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    # Only the SHA-256 is stored: whoever can read the Secret still cannot use the key.
    data = {"sha256": hashlib.sha256(key.encode()).hexdigest()}
    if args.models:
        data["models"] = args.models
    limits = {field: getattr(args, field) for field, *_ in LIMITS if getattr(args, field) is not None}
    data.update({field: str(value) for field, value in limits.items()})
    if args.priority:
        data["priority"] = args.priority
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(
            name=args.name, labels={KEY_LABEL: "true", "app.kubernetes.io/managed-by": "llmep"}
        ),
        string_data=data,
        type="Opaque",
    )
    try:
        core.create_namespaced_secret(args.namespace, body)
    except ApiException as error:
        hint = " (a key with that name exists: revoke it first or pick another name)" if error.status == 409 else ""
        print(f"llmep keys create: {error.status} {error.reason}{hint}", file=sys.stderr)
        return 1
    scope = f"models {args.models}" if args.models else "every model"
    print(f"created key {args.name!r} in namespace {args.namespace} for {scope}.", file=sys.stderr)
    terms = [f"{limits[field]} {unit}" for field, _, unit, _ in LIMITS if field in limits]
    terms += [f"priority {args.priority}"] if args.priority else []
    if terms:
        print(f"limits: {', '.join(terms)}.", file=sys.stderr)
    print("It is shown once and stored only as a SHA-256 hash:", file=sys.stderr)
    print(key)
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    from kubernetes.client.exceptions import ApiException

    core, _ = _clients()
    try:
        secret = core.read_namespaced_secret(args.name, args.namespace)
        if KEY_LABEL not in (secret.metadata.labels or {}):
            print(
                f"llmep keys revoke: Secret {args.name} is not an llmep API key (no {KEY_LABEL} label)", file=sys.stderr
            )
            return 1
        core.delete_namespaced_secret(args.name, args.namespace)
    except ApiException as error:
        print(f"llmep keys revoke: {error.status} {error.reason}", file=sys.stderr)
        return 1
    print(f"revoked key {args.name!r}; the gateway refuses it within seconds.", file=sys.stderr)
    return 0


def _field(secret: Any, name: str) -> str | None:
    value = (secret.data or {}).get(name)
    return base64.b64decode(value).decode() if value else None


def keys_list(args: argparse.Namespace) -> int:
    core, _ = _clients()
    secrets_ = core.list_namespaced_secret(args.namespace, label_selector=KEY_LABEL).items
    table = Table(title=f"API keys in {args.namespace}", caption="-: not set (no limit; priority normal)")
    for column in ("name", "models", "requests/min", "tokens/min", "tokens/day", "priority", "created"):
        table.add_column(column)
    for item in secrets_:
        table.add_row(
            item.metadata.name,
            _field(item, "models") or "(all)",
            *(_field(item, field) or "-" for field, *_ in LIMITS),
            _field(item, "priority") or "-",
            str(item.metadata.creation_timestamp),
        )
    console.print(table)
    return 0


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    st = commands.add_parser("status", help="LLMEndpoints: readiness, replicas, url, and what is happening")
    st.add_argument("--namespace", "-n", default="default")
    st.add_argument("--all-namespaces", "-A", action="store_true")
    st.add_argument("--exit-code", action="store_true", help="exit 3 when an endpoint is not Ready")
    st.set_defaults(func=status)

    keys = commands.add_parser("keys", help="create, list and revoke gateway API keys (Secrets)")
    sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="create a key; prints it once")
    create.add_argument("name", help="Secret name for the key")
    create.add_argument("--namespace", "-n", default="llmep-system", help="the gateway's namespace")
    create.add_argument("--models", help="comma-separated allowlist (default: every model)")
    for field, flag, unit, example in LIMITS:
        create.add_argument(
            flag,
            dest=field,
            metavar="N",
            type=_limit_type(flag, unit, example),
            help=f"at most N {unit} (default: no limit)",
        )
    create.add_argument(
        "--priority",
        choices=list(PRIORITIES),
        help="the priority of the key's requests (default: normal)",
    )
    create.set_defaults(func=keys_create)
    revoke = sub.add_parser("revoke", help="delete a key's Secret")
    revoke.add_argument("name")
    revoke.add_argument("--namespace", "-n", default="llmep-system")
    revoke.set_defaults(func=keys_revoke)
    lst = sub.add_parser("list", help="list keys (names and scopes, never values)")
    lst.add_argument("--namespace", "-n", default="llmep-system")
    lst.set_defaults(func=keys_list)
