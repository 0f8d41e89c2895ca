"""The operator's policy over what an endpoint's creator may choose: the serving image, engine
arguments and environment. Whoever may create an LLMEndpoint must not gain more than serving a
model: no code of their choosing in the GPU pods, no change to Ray, no token sent elsewhere."""

from __future__ import annotations

from fnmatch import fnmatchcase

from llmep_operator.api import LLMEndpoint
from llmep_operator.errors import InvalidSpec
from llmep_operator.settings import OperatorSettings


def check_policy(endpoint: LLMEndpoint, settings: OperatorSettings) -> None:
    """Raise InvalidSpec naming the field and the setting that would allow it."""
    policy = settings.policy
    image = endpoint.spec.image
    if image is not None:
        allowed = policy.allowed_images or sorted(settings.configured_images)
        if not any(fnmatchcase(image, pattern) for pattern in allowed):
            raise InvalidSpec(
                f"spec.image {image!r} is not allowed by this operator's policy (allowed: "
                f"{', '.join(allowed)}); drop spec.image to use the profile's image, or ask an admin "
                "to add it to the operator setting policy.allowed_images"
            )
    for arg in sorted(endpoint.spec.engine.extra_args):
        if arg in policy.refused_engine_args:
            raise InvalidSpec(
                f"spec.engine.extraArgs.{arg} is refused by this operator's policy; an admin can allow it "
                "by removing it from the operator setting policy.refused_engine_args"
            )
    for name in sorted(endpoint.spec.engine.env):
        pattern = next((p for p in policy.refused_env if fnmatchcase(name, p)), None)
        if pattern is not None:
            raise InvalidSpec(
                f"spec.engine.env.{name} is refused by this operator's policy (matches {pattern!r}); an "
                "admin can allow it by removing that pattern from the operator setting policy.refused_env"
            )
