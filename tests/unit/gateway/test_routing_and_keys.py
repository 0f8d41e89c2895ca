"""Pure pieces of the gateway: the routing table, key parsing, LLMEndpoint translation."""

from __future__ import annotations

import base64
import hashlib

import pytest

from llmep_serving.gateway.app import complete_events_end
from llmep_serving.gateway.auth import KeyStore, key_from_secret, parse_keys
from llmep_serving.gateway.errors import GatewayError
from llmep_serving.gateway.k8s import (
    backends_from_endpoints,
    endpoint_to_backend,
    keys_from_secrets,
)
from llmep_serving.gateway.metrics import usage_from
from llmep_serving.gateway.request_body import RequestFields, parse_request
from llmep_serving.gateway.routing import Backend, build_table, parse_routes

pytestmark = pytest.mark.unit


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def endpoint(
    name,
    ns="team-a",
    *,
    created="2026-01-01T00:00:00Z",
    ready="True",
    replicas=1,
    models=None,
    url="auto",
):
    status = {
        "url": f"http://{name}-serve.{ns}.svc:8000/v1" if url == "auto" else url,
        "models": [name] if models is None else models,
        "conditions": [{"type": "Ready", "status": ready, "reason": "Serving"}],
        "replicas": {"desired": 1, "ready": replicas},
    }
    return {
        "apiVersion": "llmep.io/v1alpha1",
        "kind": "LLMEndpoint",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
        "spec": {"model": {"source": "hf://x/y"}},
        "status": status,
    }


# -- LLMEndpoint → routes ----------------------------------------------------------------


def test_ready_endpoint_routes_its_name_and_aliases_to_its_serve_service():
    backend = endpoint_to_backend(endpoint("qwen-7b", models=["qwen-7b", "chat-default"]))

    assert backend == Backend(
        models=("qwen-7b", "chat-default"),
        url="http://qwen-7b-serve.team-a.svc:8000/v1",
        ready=True,
        namespace="team-a",
        name="qwen-7b",
        created=1767225600.0,
    )


@pytest.mark.parametrize(
    ("autoscaling", "ready", "gateways", "capacity"),
    [
        ({}, 1, 1, 32),  # maxOngoingRequests defaults to 4 × targetQueueDepth (8)
        ({"targetQueueDepth": 3}, 2, 1, 24),
        ({"targetQueueDepth": 3, "maxOngoingRequests": 5}, 2, 2, 5),
        ({"maxOngoingRequests": 5}, 3, 4, 4),  # 15 over 4 gateways: each admits 4, rounded up
        ({"maxOngoingRequests": 1}, 1, 3, 1),  # never 0, which would mean no queue at all
        ({}, 0, 1, None),  # no ready replica: held, not queued
        ({"maxOngoingRequests": "lots"}, 1, 1, None),  # a body the API server would refuse
    ],
)
def test_an_endpoints_capacity_is_its_ready_replicas_times_max_ongoing_split_over_the_gateways(
    autoscaling, ready, gateways, capacity
):
    obj = endpoint("qwen-7b", replicas=ready)
    obj["spec"]["autoscaling"] = autoscaling

    assert endpoint_to_backend(obj, share_of=gateways).max_inflight == capacity
    assert endpoint_to_backend(obj).max_inflight is None  # endpoint_capacity off: the setting applies


@pytest.mark.parametrize("forged", ["http://collector.evil.example/v1", "http://other-serve.team-b.svc:8000/v1"])
def test_a_forged_status_url_cannot_redirect_the_traffic(forged):
    """Whoever may write the status subresource must not pick where prompts go."""
    obj = endpoint("qwen-7b")
    obj["status"]["url"] = forged

    assert endpoint_to_backend(obj).url == "http://qwen-7b-serve.team-a.svc:8000/v1"


def test_the_url_follows_the_configured_template():
    obj = endpoint("qwen-7b")

    backend = endpoint_to_backend(obj, "https://{name}-serve.{namespace}.svc.cluster.local:9000/v1")

    assert backend.url == "https://qwen-7b-serve.team-a.svc.cluster.local:9000/v1"


@pytest.mark.parametrize(
    ("template", "problem"),
    [("http://{name}.{namespace}.{port}/v1", "only {name} and {namespace}"), ("qwen:8000/v1", "http://")],
)
def test_a_bad_url_template_is_refused_naming_the_setting(template, problem):
    from pydantic import ValidationError

    from llmep_serving.gateway.settings import GatewaySettings

    with pytest.raises(ValidationError, match="backend_url_template") as refused:
        GatewaySettings(backend_url_template=template)
    assert problem in str(refused.value)


@pytest.mark.parametrize(("ready", "replicas"), [("False", 1), ("Unknown", 1), ("True", 0)])
def test_endpoint_without_a_ready_replica_is_known_but_not_ready(ready, replicas):
    backend = endpoint_to_backend(endpoint("m", ready=ready, replicas=replicas))

    assert backend is not None and backend.ready is False
    assert build_table([backend]).lookup("m").ready is False


def test_an_endpoints_lora_adapters_route_with_it():
    obj = endpoint("tiny")
    obj["spec"]["lora"] = {"source": "s3://b/adapters", "adapters": [{"name": "sql"}, {"name": "chat"}]}

    backend = endpoint_to_backend(obj)

    assert backend.adapters == ("sql", "chat")
    assert build_table([backend]).lookup("tiny:chat").base == "http://tiny-serve.team-a.svc:8000/v1"


def test_endpoint_without_status_yet_is_held_under_its_spec_names():
    obj = endpoint("m")
    obj["status"] = {}
    obj["spec"]["model"].update(servedName="served", aliases=["alias"])

    backend = endpoint_to_backend(obj)

    assert backend.models == ("served", "alias")
    assert backend.url is None and backend.ready is False


def test_a_plain_name_claimed_from_two_namespaces_is_nobodys_and_both_stay_reachable():
    """Hijack by age: an older endpoint in team-b named like team-a's no longer takes its traffic."""
    squatter = endpoint("m", "team-b", created="2026-01-01T00:00:00Z")
    owner = endpoint("m", "team-a", created="2026-02-01T00:00:00Z")

    table = build_table(backends_from_endpoints([owner, squatter]))

    assert table.lookup("m") is None
    assert table.lookup("team-a/m").owned_by == "team-a"
    assert table.lookup("team-b/m").owned_by == "team-b"
    assert sorted(name for name, _ in table.listed) == ["team-a/m", "team-b/m"]


def test_only_allowed_namespaces_claim_plain_names_whatever_their_age():
    squatter = endpoint("m", "team-b", created="2026-01-01T00:00:00Z")
    owner = endpoint("m", "team-a", created="2026-02-01T00:00:00Z")

    table = build_table(backends_from_endpoints([owner, squatter]), plain_name_namespaces=["team-a"])

    assert table.lookup("m").owned_by == "team-a"
    assert table.lookup("team-b/m").owned_by == "team-b"
    assert sorted(name for name, _ in table.listed) == ["m", "team-b/m"]


def test_within_one_namespace_the_oldest_keeps_a_name():
    older = endpoint("m", "team-a", created="2026-01-01T00:00:00Z")
    older["metadata"]["name"] = "m-old"
    newer = endpoint("m", "team-a", created="2026-02-01T00:00:00Z")

    table = build_table(backends_from_endpoints([newer, older]))

    assert table.lookup("m").key == "team-a/m-old"


def test_a_qualified_name_never_reaches_another_namespace():
    """team-b cannot answer to team-a/m: names with '/' are refused at admission, and a qualified
    name is built only from an endpoint's own namespace."""
    table = build_table(backends_from_endpoints([endpoint("m", "team-b")]))

    assert table.lookup("team-a/m") is None


@pytest.mark.parametrize(
    ("scopes", "reaches"),
    [
        ("m", {"m", "team-a/m"}),  # a plain scope: only the endpoint that owns the plain name
        ("team-a/m", {"m", "team-a/m"}),
        ("team-b/*", {"team-b/m", "team-b/other"}),
        ("team-a/*,team-b/other", {"m", "team-a/m", "team-b/other"}),
    ],
)
def test_key_scopes_name_plain_qualified_and_whole_namespaces(scopes, reaches):
    owner = endpoint("m", "team-a", created="2026-01-01T00:00:00Z")
    other_m = endpoint("m", "team-b", created="2026-02-01T00:00:00Z")
    other = endpoint("other", "team-b")
    table = build_table(backends_from_endpoints([owner, other_m, other]), plain_name_namespaces=["team-a"])
    key = key_from_secret("k", {"key": b64("sk-x"), "models": b64(scopes)})

    reached = {name for name in ("m", "team-a/m", "team-b/m", "team-b/other") if key.allows(table.lookup(name))}

    assert reached == reaches


# -- routes file -------------------------------------------------------------------------


def test_routes_file_entries_become_routes_in_file_order():
    table = build_table(
        parse_routes(
            [
                {"models": ["a", "alias"], "url": "http://h:1/v1/", "ready": True},
                {"models": ["a"], "url": "http://h:2/v1"},
            ]
        )
    )

    assert table.lookup("alias").base == "http://h:1/v1"
    assert table.lookup("a").base == "http://h:1/v1"
    assert [name for name, _ in table.listed] == ["a", "alias"]


@pytest.mark.parametrize(
    "data",
    [
        {"models": ["a"]},
        [{"models": []}],
        [{"models": ["a"], "url": 3}],
        [{"models": ["a"], "ready": "yes"}],
        ["a"],
        [{"models": ["a"], "adapters": "sql"}],
        [{"models": ["a"], "adapters": ["a:sql"]}],
        [{"models": ["a"], "adapters": ["team-a/sql"]}],
        [{"models": ["a", "b"], "adapters": ["b"]}],
    ],
)
def test_invalid_routes_file_is_rejected(data):
    with pytest.raises(ValueError):
        parse_routes(data)


# -- keys --------------------------------------------------------------------------------


def test_secret_with_plain_key_is_hashed_and_scoped():
    key = key_from_secret("team-a", {"key": b64("sk-1\n"), "models": b64("a, b")})

    assert key.digest == hashlib.sha256(b"sk-1").digest()
    assert key.models == frozenset({"a", "b"})
    assert "sk-1" not in repr(key) and key.digest.hex() not in repr(key)


def test_secret_with_digest_and_invalid_secrets_are_skipped():
    digest = hashlib.sha256(b"sk-2").hexdigest()
    keys = keys_from_secrets(
        [
            {"metadata": {"name": "ok"}, "data": {"sha256": b64(digest)}},
            {"metadata": {"name": "empty"}, "data": {}},
            {"metadata": {"name": "both"}, "data": {"key": b64("x"), "sha256": b64(digest)}},
            {"metadata": {"name": "short"}, "data": {"sha256": b64("abcd")}},
            {"metadata": {"name": "notb64"}, "data": {"key": "%%%"}},
        ]
    )

    assert [k.name for k in keys] == ["ok"]
    assert KeyStore(keys).authenticate("Bearer sk-2").name == "ok"


@pytest.mark.parametrize(
    "header", [None, "", "sk-1", "Bearer", "Bearer ", "Basic sk-1", "Bearer sk-2", "Bearer \udcff"]
)
def test_only_a_known_bearer_token_authenticates(header):
    store = KeyStore(parse_keys([{"name": "k", "key": "sk-1"}]))

    assert store.authenticate(header) is None
    assert store.authenticate("Bearer sk-1").name == "k"
    assert store.authenticate("bearer sk-1").name == "k"


# -- hot-path helpers --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "invalid_json"),
        (b"[]", "invalid_json"),
        (b"[" * 100000, "invalid_json"),
        (b'{"model": "' + b"\xff" + b'"}', "invalid_json"),
        (b'{"x": ' + b"9" * 5000 + b"}", "invalid_json"),
        (b"{}", "missing_model"),
        (b'{"model": ""}', "missing_model"),
        (b'{"model": ["a"]}', "invalid_type"),
        (b'{"model": "a", "stream": 1}', "invalid_type"),
    ],
)
def test_bad_bodies_are_rejected_with_a_code(body, code):
    with pytest.raises(GatewayError) as err:
        parse_request(body)

    assert err.value.status == 400 and err.value.code == code


def test_model_stream_max_tokens_and_include_usage_are_read():
    assert parse_request(b'{"model": "m", "stream": true}') == RequestFields(model="m", stream=True)
    assert parse_request(b'{"model": "m", "stream": null}') == RequestFields(model="m", stream=False)
    both = b'{"model": "m", "max_tokens": 9, "max_completion_tokens": 5}'
    assert parse_request(both).max_tokens == 5  # max_completion_tokens first, as vLLM reads them
    assert parse_request(b'{"model": "m", "max_tokens": "9"}').max_tokens is None  # the backend's 400
    usage = b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}'
    assert parse_request(usage).include_usage


def test_usage_is_read_from_the_last_usage_object():
    body = (
        b'{"usage": null}\n\n{"choices": [], '
        b'"usage": {"prompt_tokens": 12, "total_tokens": 20, "completion_tokens": 8}}'
    )

    assert usage_from(body) == (12, 8)
    assert usage_from(b'{"usage": null}') is None
    assert usage_from(b'{"choices": []}') is None


def test_event_boundary_is_found_for_lf_and_crlf():
    assert complete_events_end(b"data: 1\n\ndata: 2") == 9
    assert complete_events_end(b"data: 1\r\n\r\n") == 11
    assert complete_events_end(b"data: 1") == 0


# -- settings ----------------------------------------------------------------------------


def test_settings_come_from_env_and_flags(monkeypatch):
    from llmep_serving.gateway import GatewaySettings

    monkeypatch.setenv("LLMEP_GATEWAY_WATCH_NAMESPACES", "team-a, team-b")
    monkeypatch.setenv("LLMEP_GATEWAY_ANONYMOUS", "true")
    from_env = GatewaySettings()
    from_flags = GatewaySettings(
        _cli_parse_args=["--port", "9000", "--watch-namespaces", "*", "--no-anonymous"],
        _cli_kebab_case=True,
        _cli_implicit_flags=True,
    )

    assert from_env.watch_namespaces == ["team-a", "team-b"] and from_env.anonymous is True
    assert from_flags.port == 9000 and from_flags.watch_namespaces == ["*"]
    assert from_flags.anonymous is False
    assert GatewaySettings(_env_file=None).max_body_bytes > 0


def test_anonymous_is_off_by_default(monkeypatch):
    from llmep_serving.gateway import GatewaySettings

    monkeypatch.delenv("LLMEP_GATEWAY_ANONYMOUS", raising=False)

    assert GatewaySettings().anonymous is False
