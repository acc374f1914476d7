"""The policy chain: its frame (`frame.py`: the call context, the one error boundary, the stage order), the pipeline
that assembles it for the policy in force and calls the upstream last (`pipeline.py`), the state that outlives a policy
reload (`state.py`), and the stages with the helpers each needs beside it (`stages/`)."""
