"""The security engine: search the distributed design that is accurate and leaks little.

- `env`: the design space and the gymnasium environment (one-step episodes).
- `evaluator`: train a design's victim, attack every single-provider breach, score it;
  a JSONL cache keyed by the design's canonical description.
- `parallel`: evaluate candidates in-process, in a local process pool, or on Ray.
- `search`: PPO (stable-baselines3) and random search under a wall-clock/evaluation budget.
- `experiment`: the baselines and the paper's table and Pareto plot.
"""
