#!/usr/bin/env python3
"""Merge indexed datasets (``.bin`` + ``.idx`` pairs) into one, in the order given (Megatron's tool name).

    python tools/merge_datasets.py --input DIR --output-prefix OUT            # every pair in DIR, sorted by name
    python tools/merge_datasets.py --input-prefixes P1 P2 ... --output-prefix OUT

Shards written by ``tools/preprocess_data.py --max-shard-size`` merge back into exactly the bytes a
single unsharded run writes. Tokens are streamed (bounded memory); the output appears only when complete.
"""
from __future__ import annotations

import argparse
import glob
import os

from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.data.output_checks import check_output_prefix, remove_temp_files, write_failed
from megatron.errors import UserError, run_cli


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="a directory: every PREFIX.bin/.idx pair in it, sorted by name")
    src.add_argument("--input-prefixes", nargs="+", help="dataset prefixes, merged in this order")
    p.add_argument("--output-prefix", required=True)
    return p.parse_args(argv)


def input_prefixes(args) -> list:
    if args.input_prefixes:
        return list(args.input_prefixes)
    if not os.path.isdir(args.input):
        raise UserError(f"--input {args.input}: no such directory")
    prefixes = sorted(p[:-4] for p in glob.glob(os.path.join(args.input, "*.idx")))
    if not prefixes:
        raise UserError(f"--input {args.input}: no .idx files there")
    return prefixes


def main(argv=None) -> int:
    args = get_args(argv)
    prefixes = input_prefixes(args)
    out = os.path.abspath(args.output_prefix)
    if out in {os.path.abspath(p) for p in prefixes}:
        raise UserError(f"--output-prefix {args.output_prefix} is one of the inputs; choose a new prefix")
    if not os.path.isdir(os.path.dirname(out)):
        raise UserError(f"--output-prefix {args.output_prefix}: directory {os.path.dirname(out)} does not exist")
    check_output_prefix(args.output_prefix, "NAME.bin/.idx")
    first = IndexedDataset(prefixes[0])  # validates and gives the dtype
    try:
        builder = IndexedDatasetBuilder(args.output_prefix, first.dtype)
    except OSError as e:
        raise write_failed(args.output_prefix, e) from None
    try:
        for p in prefixes:
            builder.add_index(p)
        builder.finalize()
    except BaseException as e:
        try:
            builder.abort()
        except OSError:  # closing a file on a full disk: its data is dropped anyway
            pass
        remove_temp_files([args.output_prefix])
        if isinstance(e, OSError):
            raise write_failed(args.output_prefix, e) from None
        raise
    merged = IndexedDataset(args.output_prefix)
    print(f"merged {len(prefixes)} datasets -> {args.output_prefix}.bin/.idx: {merged.num_documents} documents, "
          f"{int(merged.sizes.sum())} tokens")
    return 0


if __name__ == "__main__":
    run_cli(main)
