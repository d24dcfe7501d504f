"""Where calibration documents come from. A document is a string or a list of chat messages."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import yaml

from inferkit.errors import InferkitError

Document = str | list  # plain text, or [{"role": ..., "content": ...}, ...]
HELDOUT_EVERY = 10  # one record in ten is held out: index % 10 == 9


def registry() -> dict:
    text = resources.files("inferkit.calibration_data").joinpath("registry.yaml").read_text()
    return yaml.safe_load(text)


def _record_to_document(record: dict, text_field: str, where: str) -> Document:
    if "messages" in record and isinstance(record["messages"], list):
        return record["messages"]
    if text_field in record and isinstance(record[text_field], str):
        return record[text_field]
    raise InferkitError(f"{where}: record has neither '{text_field}' nor 'messages'; pass --text-field")


def _pydoc_documents() -> list[Document]:
    import pydoc_data.topics as topics

    return [topics.topics[key] for key in sorted(topics.topics)]


def _seed_documents(name: str) -> list[Document]:
    path = resources.files("inferkit.calibration_data").joinpath(name)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [_record_to_document(r, "text", name) for r in rows]


def builtin_documents(name: str) -> list[Document]:
    entry = registry()[name]
    docs: list[Document] = []
    for part in entry["parts"]:
        docs.extend(_pydoc_documents() if part == "pydoc" else _seed_documents(part))
    return docs


def file_documents(path: Path, text_field: str) -> list[Document]:
    """A .txt file is one document; .jsonl and .parquet give one document per record."""
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        raise InferkitError(f"calibration file {path} must be .txt, .jsonl or .parquet")
    dataset = _datasets_load("parquet" if path.suffix == ".parquet" else "json", data_files=str(path), split="train")
    return [_record_to_document(r, text_field, str(path)) for r in dataset]


def hub_documents(name: str, split: str, text_field: str) -> list[Document]:
    """A dataset from the Hugging Face hub, ``NAME`` or ``NAME:CONFIG``."""
    dataset_name, _, config = name.partition(":")
    dataset = _datasets_load(dataset_name, config or None, split=split)
    return [_record_to_document(r, text_field, name) for r in dataset]


def _datasets_load(*args, **kwargs):
    try:
        import datasets
    except ImportError as exc:
        raise InferkitError("this calibration source needs the datasets package: pip install datasets") from exc
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # datasets raises many types for offline/missing data
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InferkitError(
            f"cannot load dataset {args[0]!r} ({first}); the hub may be unreachable: "
            "use a built-in set (builtin) or a local .txt/.jsonl/.parquet file"
        ) from exc


def split_documents(docs: list[Document], split: str) -> list[Document]:
    """Train keeps every record but the held-out ones; a single document is never split."""
    if len(docs) < HELDOUT_EVERY or split == "all":
        return docs
    held = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    train = [d for i, d in enumerate(docs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    return held if split == "heldout" else train
