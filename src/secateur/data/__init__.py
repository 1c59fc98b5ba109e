"""Text for calibration and evaluation: sources with provenance, calibration windows."""

from secateur.data.sources import (
    DATA_DIR_ENV,
    FILE_TYPES,
    NAMED_DATASETS,
    Documents,
    check_dataset_name,
    check_readable,
    load_documents,
    resolve_data_dir,
)
from secateur.data.windows import CalibrationData, calibration_windows, special_tokens_added

__all__ = [
    "DATA_DIR_ENV",
    "FILE_TYPES",
    "NAMED_DATASETS",
    "CalibrationData",
    "Documents",
    "calibration_windows",
    "check_dataset_name",
    "check_readable",
    "load_documents",
    "resolve_data_dir",
    "special_tokens_added",
]
