"""RL core: policy losses (CISPO and baselines), rewards and advantages, windowed-FIFO scheduling,
prefix-tree merging. Pure tensor code: importing it never pulls in vLLM or Triton."""
