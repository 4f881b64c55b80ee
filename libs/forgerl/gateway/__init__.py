"""The gateway: agents' OpenAI-compatible endpoint over the inference replicas, recording token-exact
trajectories for the trainer.

- `chat`: messages, tools and the chat template (rendering new messages only);
- `parsing`: generated ids split into reasoning, content and tool calls (incrementally, for streaming);
- `history`: which recorded point a request continues, its prompt ids, and history mismatches;
- `routing`: replicas, sticky episodes, fail-over that continues a generation on another replica;
- `service`: episodes and turns (open, chat turns, close to a Trajectory);
- `app`: the ASGI app (`/v1/chat/completions`, `/v1/models`) and the in-loop uvicorn server.
"""

from forgerl.gateway.chat import ChatFormat, Message, Tools
from forgerl.gateway.errors import GatewayError
from forgerl.gateway.service import EpisodeInfo, GatewayCore, GatewaySettings

__all__ = ["ChatFormat", "EpisodeInfo", "GatewayCore", "GatewayError", "GatewaySettings", "Message", "Tools"]
