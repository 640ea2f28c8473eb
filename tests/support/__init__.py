"""Helpers shared by the test tiers and the benchmarks (imported as `tests.support.X`):
`services` (in-process service apps and settings), `tamper` (a lying provider),
`compose` (docker compose v1/v2, also a command-line tool)."""
