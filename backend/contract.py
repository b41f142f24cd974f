"""Names that several processes must agree on: HTTP routes, headers, env variables.

Defined once here and imported by the server, the clients, the supervisor and the views.
The weight-transfer routes mirror vLLM's native weight-transfer API (dev mode), so one
trainer-side client drives both engines.
"""

from __future__ import annotations

# --- public inference routes (OpenAI-compatible) ---
ROUTE_HEALTH = "/health"
ROUTE_MODELS = "/v1/models"
ROUTE_CHAT = "/v1/chat/completions"

# --- admin routes: weight transfer and cache control (token-guarded) ---
ROUTE_INIT_WEIGHT_TRANSFER = "/init_weight_transfer_engine"
ROUTE_START_WEIGHT_UPDATE = "/start_weight_update"
ROUTE_UPDATE_WEIGHTS = "/update_weights"
ROUTE_FINISH_WEIGHT_UPDATE = "/finish_weight_update"
ROUTE_WEIGHT_INFO = "/weight_info"
ROUTE_PAUSE = "/pause"
ROUTE_RESUME = "/resume"
ROUTE_RESET_PREFIX_CACHE = "/reset_prefix_cache"
ROUTE_RESET_ENCODER_CACHE = "/reset_encoder_cache"

ADMIN_ROUTES: frozenset[str] = frozenset(
    {
        ROUTE_INIT_WEIGHT_TRANSFER,
        ROUTE_START_WEIGHT_UPDATE,
        ROUTE_UPDATE_WEIGHTS,
        ROUTE_FINISH_WEIGHT_UPDATE,
        ROUTE_WEIGHT_INFO,
        ROUTE_PAUSE,
        ROUTE_RESUME,
        ROUTE_RESET_PREFIX_CACHE,
        ROUTE_RESET_ENCODER_CACHE,
    }
)

# --- auth ---
TOKEN_HEADER = "Authorization"  # "Bearer <token>"

# --- environment variables shared by supervisor, server and trainer ---
ENV_RUN_TOKEN = "VLMRL_RUN_TOKEN"
ENV_RUN_DIR = "VLMRL_RUN_DIR"
ENV_SERVER_URL = "VLMRL_SERVER_URL"
ENV_SYNC_HOST = "VLMRL_SYNC_HOST"  # the address the server reaches the trainer's weight-sync store at
ENV_UPDATE_PAUSE = "VLMRL_UPDATE_PAUSE"  # vllm engine: how running requests meet a weight update (wait / keep)
ENV_MODEL_CACHE = "VLMRL_CACHE_DIR"  # where builtin:tiny-* models are built
