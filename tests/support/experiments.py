"""The flags of a tiny `qumos experiment` (seconds, not minutes): two fragments of depth
1, one victim epoch, one attacker step and restart."""

TINY = [
    "--fragments",
    "2",
    "--max-depth",
    "1",
    "--victim-epochs",
    "1",
    "--attack-epochs",
    "1",
    "--attack-restarts",
    "1",
    "--rollout",
    "2",
]
