"""Reading a ``torch.distributed.checkpoint`` folder without unpickling arbitrary objects.

DCP stores tensors with ``torch.save`` and reads them back with ``torch.load(weights_only=True)``, but
its index (``.metadata``) is a plain pickle, which ``FileSystemReader`` loads with ``pickle.load``: a
crafted index could run code when a checkpoint is merely inspected. :class:`SafeReader` reads the
index with an unpickler that admits only the classes DCP's metadata is made of (its metadata
dataclasses, ``torch.Size``, dtypes, layouts, paths); anything else is refused as a one-line
``UserError`` naming the file, as for every other checkpoint file.
"""
from __future__ import annotations

import os
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

from megatron.errors import UserError

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
                                              "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "Path"},
    "pathlib._local": {"PosixPath", "WindowsPath", "PurePosixPath", "Path"},  # Python >= 3.13
    "collections": {"OrderedDict"},
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


class SafeReader(FileSystemReader):
    """DCP's file-system reader whose index is read by the restricted unpickler; ``flag`` names the option in
    errors."""

    def __init__(self, path: str, flag: str = "--load"):
        super().__init__(path)
        self.flag, self.folder = flag, path

    def read_metadata(self, *args, **kwargs):
        path = os.path.join(self.folder, ".metadata")
        try:
            with open(path, "rb") as f:
                metadata = _IndexUnpickler(f).load()
        except FileNotFoundError:
            raise UserError(f"{self.flag}: the shard index {path} is missing; the checkpoint is incomplete: load an "
                            f"earlier one") from None
        except pickle.UnpicklingError as e:
            raise UserError(f"{self.flag}: {path} was refused as unsafe or unreadable ({e}); use a checkpoint from a "
                            f"trusted source") from None
        except Exception as e:  # noqa: BLE001 - a truncated or garbled index
            raise UserError(f"{self.flag}: cannot read the shard index {path} ({type(e).__name__}); the checkpoint "
                            f"is damaged: load an earlier one") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata



