"""The trainer service. Training runs: SFT, CISPO RL with prefix-tree merging, checkpoints."""
