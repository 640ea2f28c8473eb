"""QuMoS provider service."""
