import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """WikiText-2 / C4 from shared/data (never copied into the repo): $SECATEUR_DATA or ../shared/data."""
    candidates = [os.environ.get("SECATEUR_DATA"), REPO.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "wikitext-2-raw").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = shared_data_dir()
    if found is None:
        pytest.skip("shared data directory not found (set SECATEUR_DATA or place shared/ beside the repo)")
    return found


SAMPLE_TEXT = (
    "The garden was pruned in early spring, when the sap had not yet risen. Each branch that crossed another "
    "was cut back to a healthy bud, and the dead wood was burned at the edge of the field. By summer the trees "
    "carried fewer but larger fruit, and the light reached the lower leaves. Gardeners have known for centuries "
    "that removing part of a plant can make the rest of it stronger. The same idea, applied to neural networks, "
    "removes weights that contribute little to the output, so that the model needs less memory and less time. "
)


def file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's safetensors files, by name."""
    from safetensors import safe_open

    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118 (not iterable)
    return tensors


@pytest.fixture
def calib_text_file(tmp_path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(SAMPLE_TEXT * 40)
    return path


def tiny_model_and_text(root: Path) -> Path:
    """A saved tiny Llama (root/model) and a calibration text file (root/calib.txt): the inputs
    of a CLI run on tiny data; returns root."""
    from tiny_models import save_tiny

    save_tiny("llama", root / "model")
    (root / "calib.txt").write_text(SAMPLE_TEXT * 40)
    return root
