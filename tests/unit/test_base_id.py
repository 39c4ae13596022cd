"""How saved adapters name their base (common.base_id) and how fedpipe-export finds it again."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from common.base_id import local_name, portable_id, read_metadata, write_metadata
from coordinator.export import Source, given_base


def model_dir(tmp_path: Path, name: str, config: dict[str, object]) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_embedded_models_are_named_by_their_public_ids() -> None:
    assert portable_id("embedded") == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_id("embedded-llm") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert local_name("sentence-transformers/all-MiniLM-L6-v2") == "embedded"
    assert local_name("someone/else") is None


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"_name_or_path": "meta-llama/Llama-3.2-1B"}, "meta-llama/Llama-3.2-1B"),
        ({"_name_or_path": "/home/me/models/llama"}, "llama-local"),  # a path is not an id: the directory's name
        ({}, "llama-local"),
    ],
)
def test_a_model_directory_is_named_by_its_hub_id_else_its_directory_name(
    tmp_path: Path, config: dict[str, object], expected: str
) -> None:
    directory = model_dir(tmp_path, "llama-local", config)
    assert portable_id(str(directory)) == expected
    assert str(tmp_path) not in portable_id(str(directory))


def test_metadata_round_trips_and_a_missing_file_reads_empty(tmp_path: Path) -> None:
    # Execute
    written = write_metadata(tmp_path, "embedded")

    # Assert
    assert (
        read_metadata(tmp_path)
        == written
        == {"base_id": "sentence-transformers/all-MiniLM-L6-v2", "base_path": "embedded"}
    )
    assert read_metadata(tmp_path / "nowhere") == {}


def source(directory: Path, config: Mapping[str, object]) -> Source:
    return Source(
        adapter_dir=directory,
        weights=directory / "adapter_model.safetensors",
        config=config,
        task_type="SEQ_CLS",
        run_dir=None,
        round=None,
        labels=None,
        tensors={},
    )


def test_export_finds_the_base_by_metadata_then_by_id_then_as_given(tmp_path: Path) -> None:
    # Prepare: one adapter with FedPipe's metadata, one shipped without it (peft's config only)
    with_metadata = tmp_path / "a"
    with_metadata.mkdir()
    write_metadata(with_metadata, "/models/mine")
    bare = tmp_path / "b"
    bare.mkdir()
    config = {"base_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2"}

    # Execute / Assert
    assert given_base(source(with_metadata, config), None)[0] == "/models/mine"
    assert given_base(source(with_metadata, config), "/other")[0] == "/other"
    assert given_base(source(bare, config), None)[0] == "embedded"  # an embedded model's id resolves locally
    assert given_base(source(bare, {"base_model_name_or_path": "org/model"}), None)[0] == "org/model"
    assert given_base(source(bare, {}), None)[0] is None
