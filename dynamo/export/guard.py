"""Old home of the packed checkpoint's guard; it lives in `dynamo.packed.format` with the rest of the format.

Kept because checkpoints exported before the move ship a dynamo_packed.py that calls
`dynamo.export.guard.base_config`.
"""

from ..packed.format import (AUTO_MAP, GUARD_VERSION, HOW_TO_LOAD, KEY, MODEL_TYPE, MODULE, base_config,
                             guard_checkpoint, is_guarded, read_config_dict, unguarded_dict)

__all__ = ["AUTO_MAP", "GUARD_VERSION", "HOW_TO_LOAD", "KEY", "MODEL_TYPE", "MODULE", "base_config",
           "guard_checkpoint", "is_guarded", "read_config_dict", "unguarded_dict"]
