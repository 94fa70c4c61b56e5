"""The projections of a SwiGLU expert and the two stages a packed layer runs them in.

One definition for the kernels and for the harness (`dynamo.adapters` imports PROJECTIONS from here).
"""

STAGES = {"gate_up": ("gate", "up"), "down": ("down",)}  # gate and up read the same routed tokens
PROJECTIONS = tuple(p for names in STAGES.values() for p in names)  # ("gate", "up", "down")
