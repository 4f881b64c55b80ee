"""The inference engine of the inference service: vLLM's AsyncLLM with versioned weight updates.

- `engine.InferenceEngine`: start/warm-up, streamed token-in/token-out generation stamped with the policy
  version, `update_weights` (pause, reload, prefix-cache reset, resume), abort, status.
- `requests`: checks on a request before it reaches vLLM (ids in the vocabulary, context, sampling).
- `checkpoint`: a checkpoint directory read from its headers, and the same-architecture check.
- `stats`: running/waiting requests, KV-cache use and prefix-cache hits from vLLM's stat hook.
- `testing`: checkpoints of our model and PyTorch reference decoding, for tests and benchmarks.

vLLM itself is imported only when an engine starts; the fixes it needs for our models on CPU are in
`forgerl.vllm_plugin`.
"""
