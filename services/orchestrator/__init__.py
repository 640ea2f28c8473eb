"""QuMoS orchestrator service (no torch)."""
