"""Checkpoints: the one owner of the on-disk checkpoint format.

- ``layout``: where checkpoints live (tracker, ``iter_*`` folders, ``common.pt``, RNG files); finding the latest.
- ``atomic``: atomic text writes, the tracker write, publishing a staged folder, recovery after a crash.
- ``file_io``: writing one file, and reading one back with ``torch.load(weights_only=True)``.
- ``formats``: the registry of formats by the ``format`` field of ``common.pt`` (and by ``--ckpt-format``):
  ``sharded_format`` is format 2 (the default: every rank writes its shard through torch.distributed.checkpoint;
  ``boxes`` maps shards to full tensors, ``dcp_reader`` reads DCP's index safely), ``full_tensor_format`` format 1.
- ``async_save``: ``--async-save``, the shards written by a background thread.
- ``save`` / ``load``: a training checkpoint, every rank taking part.
- ``weights_only``: weights with no optimizer state (import-hf, upcycle).
- ``stored_config``: read a checkpoint's stored config; copy a checkpoint with it changed (reshard).
- ``checks``, ``rng``, ``optimizer_state``: finite / architecture checks, RNG states, Adam state by parameter.
- ``teacher_config``: the --kd / --mos teacher's model config, read from its checkpoint.
"""
