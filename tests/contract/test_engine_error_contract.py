"""The engine's error answers, made by Ray's and vLLM's own code, cleaned by the gateway to the
engine's message in OpenAI's vocabulary: the unit tier's copies of those shapes
(tests/unit/gateway) must stay what the backends send."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ray.serve.llm", reason="the contract tier needs ray[serve] from `make setup`")

from ray.llm._internal.serve.core.configs.openai_api_models import OpenAIHTTPException  # noqa: E402
from ray.llm._internal.serve.utils.server_utils import get_response_for_error  # noqa: E402

from llmep_serving.gateway.backend_errors import clean_error_body  # noqa: E402

ENGINE_SAYS = "This model's maximum context length is 256 tokens. However, you requested 300 tokens."


@pytest.mark.parametrize("internal", [None, "vllm.engine: prompt too long"])
def test_rays_wrapped_engine_error_becomes_the_engines_message(internal):
    error = OpenAIHTTPException(400, ENGINE_SAYS, type="BadRequestError", internal_message=internal)
    body = get_response_for_error(error, request_id="tiny-4f2a").model_dump_json().encode()
    assert b"Internal exception" in body and b"tiny-4f2a" in body  # what clients got before

    cleaned = json.loads(clean_error_body(body, 400))

    assert cleaned == {
        "error": {"message": ENGINE_SAYS, "type": "invalid_request_error", "param": None, "code": None}
    }


def test_vllms_own_error_answer_gets_openais_vocabulary():
    """What the direct path sends: vLLM's app builds the body, not Ray's ingress."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.exceptions import VLLMValidationError

    error = VLLMValidationError(ENGINE_SAYS, parameter="max_tokens", value=1000)
    body = create_error_response(error).model_dump_json().encode()
    assert json.loads(body)["error"]["type"] == "BadRequestError"  # what clients got before

    cleaned = json.loads(clean_error_body(body, 400))

    assert cleaned["error"]["type"] == "invalid_request_error"
    assert (cleaned["error"]["param"], cleaned["error"]["code"]) == ("max_tokens", None)
    assert cleaned["error"]["message"].startswith(ENGINE_SAYS)
