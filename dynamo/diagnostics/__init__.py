"""Diagnostics of DQS: measured comparisons of switching policies on the embedded models.

- `dqs`: the bench (one BQ model, every domain's windows split into profile / held-out calib / test / fit, the
  FP16 reference log-probs) and the paired comparisons scripts/dqs_fidelity.py and scripts/dqs_compare.py print;
- `routed`: the routed experts' output error the model really has, to check a switch's estimated reduction;
- `compare_report`: the tables and the figure of scripts/dqs_compare.py, from its JSON record.
"""

from .routed import RoutedError, routed_error

__all__ = ["RoutedError", "routed_error"]
