"""The evolution service. Self-evolution of the agent scaffold and the operator console."""
