"""The trainer: a run from SFT warm start to CISPO RL, closing the loop with rollout, data pool and inference.

- `loop.TrainingRun`: the run (SFT, RL steps, checkpoints, publication, acks, evaluation, resume)
- `sft`: gold trajectories -> chat template -> loss on assistant tokens
- `step`: trajectories -> rows and advantages -> prefix-merged forward -> policy loss -> AdamW -> expert bias
- `sources`: episodes from rollout + data pool (or in-process), weights to inference
- `sampling`, `local_env`: KV-cached sampling and in-process tool-use episodes (evaluation, tests)
- `tracking`: the run's metrics, config and checkpoints also in TensorBoard and MLflow
- `report`: PNG plots and the summary; `parity`: greedy answers in ours / transformers / vLLM
- `worker`: the run under torchrun (DDP); `presets`: model sizes for CPU runs
"""
