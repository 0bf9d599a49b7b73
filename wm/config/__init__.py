"""Configuration: the full schema with defaults, loading, overrides, validation.

Every run is described by one `ml_collections.ConfigDict` whose fields are all
declared in `base_config()`. Config files in `configs/` start from it and
change fields; they never add new ones, so a misspelt field is an error rather
than a silently ignored setting. `validate` checks values before anything is
compiled and names the offending field and the fix.

    schema.py      base_config(): every field, its default and one comment each; the choice tuples
    loading.py     load("configs/NAME.py[:ARG]") and override({"model.d": "256"})
    validation.py  check_schema and validate: errors that name the field and the fix
    sizes.py       parse_bytes("8GiB") and format_bytes for budgets and reports

Callers use the names below (`config_lib.validate`, `from wm.config import
base_config`): which file holds a function is this package's business.
"""

from wm.config.loading import load, override
from wm.config.schema import (BUDGET_LEVERS, DTYPES, KL_SCHEDULES, MESH_AXES, MODELS, NONFINITE_ACTIONS, OPTIMIZERS,
                              PRUNE_METHODS, QAT_MODES, QUANT_WEIGHTS, SCHEDULES, STATE_DTYPES, TASKS,
                              ConfigError, base_config)
from wm.config.sizes import format_bytes, parse_bytes
from wm.config.validation import check_schema, remat_tags, validate

__all__ = [
    "BUDGET_LEVERS", "DTYPES", "KL_SCHEDULES", "MESH_AXES", "MODELS", "NONFINITE_ACTIONS", "OPTIMIZERS", "PRUNE_METHODS",
    "QAT_MODES", "QUANT_WEIGHTS", "SCHEDULES", "STATE_DTYPES", "TASKS", "ConfigError", "base_config",
    "check_schema", "format_bytes", "load", "override", "parse_bytes", "remat_tags", "validate",
]
