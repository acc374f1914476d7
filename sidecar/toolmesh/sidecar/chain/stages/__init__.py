"""Policy stages of the sidecar chain, one concern per file (the order is written once, in `chain/frame.py`), with
the helpers a stage needs beside it: `jwt_verify.py` and `jwks.py` (authenticate), `audit.py` (authenticate and
authorize), `tokenizer.py` and `results_store.py` (budget)."""
