"""Self-evolution of the agent scaffold: decision statistics, guard, budget ledger, audit log, proposers,
the controller, training-run diagnosis, and the operator console (served by services/evolution)."""
