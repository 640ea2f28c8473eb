"""Defences of the public API (issue 16); pure library code, the orchestrator's routes call it.

    keys      client API keys: salted hashes in an atomically written store
    quota     images per window and in total, per key, persisted
    policy    output policy per model: probabilities, top_k, label, rounding
    monitor   PRADA extraction monitor per key (Shapiro-Wilk on minimum distances)
    batching  cross-client dynamic batching (a window and a row cap; rows shuffled)

Input hiding (a company-held transform before fragment 1) lives in the model itself:
`ModelSpec.input_transform`, `qumos.chain.encode_inputs`. docs/defenses.md has the
measurements.
"""
