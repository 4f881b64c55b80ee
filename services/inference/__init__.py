"""The inference service. Token-in/token-out generation on vLLM with versioned weight updates."""
