"""Old home of the packed format's loader; the format lives in `dynamo.packed.format`.

Kept because checkpoints exported before the move ship a dynamo_packed.py that imports
`load_packed` from here (and README users may too). Importing it registers the "dynamo" method.
"""

from .format import DynamoPackedConfig, DynamoPackedQuantizer, FORMAT_VERSION, METHOD, load_packed

__all__ = ["DynamoPackedConfig", "DynamoPackedQuantizer", "FORMAT_VERSION", "METHOD", "load_packed"]
