"""The rollout service. Episodes on runnable tasks in sandboxes, with rewards."""
