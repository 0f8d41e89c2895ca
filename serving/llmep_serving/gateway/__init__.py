"""llmep gateway: one OpenAI base_url for every model, routed on the body's ``model``.

Never imports ray or vllm (an import-linter contract enforces it).
"""

from .server import GatewayServer, main, run_gateway, serve
from .settings import GatewaySettings

__all__ = ["GatewayServer", "GatewaySettings", "main", "run_gateway", "serve"]
