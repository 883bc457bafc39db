#!/usr/bin/env python3
"""Build a demo corpus from text that ships with every CPython install: the language reference
topics in ``pydoc_data`` and the docstrings of the standard library. Writes a jsonl (one document
per line, key ``text``). No download needed.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import warnings

SKIP = ("test", "idlelib", "tkinter", "turtle", "lib2to3", "ensurepip", "venv", "antigravity", "this", "__")


def stdlib_docstrings(max_modules: int = 400):
    names = sorted(sys.stdlib_module_names) if hasattr(sys, "stdlib_module_names") else []
    seen = 0
    for name in names:
        if name.startswith(SKIP) or seen >= max_modules:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:
            continue
        seen += 1
        doc = inspect.getdoc(mod)
        if doc and len(doc) > 200:
            yield doc
        for attr_name, obj in sorted(vars(mod).items()):
            if attr_name.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200:
                    yield f"{name}.{attr_name}\n\n{doc}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    import pydoc_data.topics as topics

    n = nbytes = 0
    with open(args.output, "w", encoding="utf-8") as f:
        for key in sorted(topics.topics):
            text = topics.topics[key].strip()
            if len(text) > 100:
                f.write(json.dumps({"text": text}) + "\n")
                n += 1
                nbytes += len(text)
        for doc in stdlib_docstrings():
            f.write(json.dumps({"text": doc}) + "\n")
            n += 1
            nbytes += len(doc)
    print(f"wrote {n} documents ({nbytes / 1e6:.2f} MB of text) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
