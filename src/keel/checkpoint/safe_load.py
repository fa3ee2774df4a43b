"""Loading checkpoints without running code from them (invariant 7): a restricted unpickler for DCP's metadata."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from keel.errors import CheckpointError

METADATA_FILE = ".metadata"

# Exactly what DCP's FileSystemWriter pickles into .metadata: its own dataclasses, torch.Size, dtypes and layouts
# (by name), and the checkpoint's path. Anything else (os.system, builtins.eval, ...) could run code when unpickled.
_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals in _ALLOWED (and torch dtypes); everything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"Unsupported global: {module}.{name} is not allowed")


def _reason(error: Exception) -> str:
    """The line of a weights_only failure that names what was refused (its first line only advises unsafe loading)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else type(error).__name__)


def read_metadata(path: Path) -> Metadata:
    """DCP's metadata of the checkpoint at `path`, unpickled with only DCP's own classes allowed."""
    file = Path(path) / METADATA_FILE
    try:
        with open(file, "rb") as f:
            metadata = _RestrictedUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete") from None
    except Exception as e:  # a crafted or corrupt pickle can fail in many ways; none of them may run code
        raise CheckpointError(f"{file}: refused to load ({e}); it is not DCP metadata and may be malicious") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file}: refused to load; it holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader, reading .metadata through the restricted unpickler instead of pickle.load."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's metadata; the per-rank variant DCP's FileSystemWriter never writes is refused."""
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.path}: per-rank metadata files are not supported")
        metadata = read_metadata(Path(self.path))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but non-tensor items load with weights_only=True rather than full unpickling."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Load a bytes item as plain data (tensors, numbers, strings, containers) or fail."""
        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as e:  # torch raises UnpicklingError naming the global it refused
            raise CheckpointError(f"refused to load item {read_item.dest_index.fqn}: {_reason(e)}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def safe_reader(path: Path) -> SafeFileSystemReader:
    """A reader for the checkpoint at `path`, after checking its metadata unpickles safely (CheckpointError if not)."""
    read_metadata(path)
    return SafeFileSystemReader(str(path))


def load_tensors(file: Path) -> Any:
    """torch.load with weights_only=True (tensors and plain containers only); anything else is a CheckpointError."""
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses every global outside torch's allow-list
        raise CheckpointError(f"{file}: refused to load ({_reason(e)}); it may be malicious") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{file}: unreadable ({str(e).splitlines()[0]})") from None
