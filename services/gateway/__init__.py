"""The gateway service. The agents' OpenAI-compatible endpoint and the episode admin API."""
