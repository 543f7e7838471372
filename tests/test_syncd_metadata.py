"""Header reading for the import daemon: GGUF and safetensors, on real files, strict about damage."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import pytest

from conftest import gguf_bytes, safetensors_bytes
from modelcache.errors import ImportRejected
from modelcache.formats import read_capabilities
from modelcache.formats.gguf import gguf_capabilities, read_gguf_header
from modelcache.formats.safetensors import read_safetensors_header

# Written by llama.cpp's own gguf package (gguf 0.19.0, GGUFWriter): architecture llama,
# context length 4096, size label 1K, file type 7 (Q8_0), a chat template, a 3-token vocabulary,
# an int array, and two tensors: token_embd.weight F32 [4, 4] and blk.0.attn_q.weight Q8_0 [32, 2].
REFERENCE_GGUF = base64.b64decode(
    "R0dVRgMAAAACAAAAAAAAAAoAAAAAAAAAFAAAAAAAAABnZW5lcmFsLmFyY2hpdGVjdHVyZQgAAAAFAAAAAAAAAGxsYW1hDAAAAAAA"
    "AABnZW5lcmFsLm5hbWUIAAAACgAAAAAAAABUaW55IExsYW1hEgAAAAAAAABnZW5lcmFsLnNpemVfbGFiZWwIAAAAAgAAAAAAAAAx"
    "SxQAAAAAAAAAbGxhbWEuY29udGV4dF9sZW5ndGgEAAAAABAAABYAAAAAAAAAbGxhbWEuZW1iZWRkaW5nX2xlbmd0aAQAAAAEAAAA"
    "EQAAAAAAAABsbGFtYS5ibG9ja19jb3VudAQAAAABAAAAEQAAAAAAAABnZW5lcmFsLmZpbGVfdHlwZQQAAAAHAAAAFwAAAAAAAAB0"
    "b2tlbml6ZXIuY2hhdF90ZW1wbGF0ZQgAAAAyAAAAAAAAAHslIGZvciBtIGluIG1lc3NhZ2VzICV9e3sgbS5jb250ZW50IH19eyUg"
    "ZW5kZm9yICV9FQAAAAAAAAB0b2tlbml6ZXIuZ2dtbC50b2tlbnMJAAAACAAAAAMAAAAAAAAAAwAAAAAAAAA8cz4EAAAAAAAAADwv"
    "cz4CAAAAAAAAAGhpCwAAAAAAAAB0aW55Lm5lc3RlZAkAAAAFAAAAAwAAAAAAAAABAAAAAgAAAAMAAAARAAAAAAAAAHRva2VuX2Vt"
    "YmQud2VpZ2h0AgAAAAQAAAAAAAAABAAAAAAAAAAAAAAAAAAAAAAAAAATAAAAAAAAAGJsay4wLmF0dG5fcS53ZWlnaHQCAAAAIAAA"
    "AAAAAAACAAAAAAAAAAgAAABAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAIA/AAAAQAAAQEAAAIBAAACgQAAAwEAAAOBAAAAA"
    "QQAAEEEAACBBAAAwQQAAQEEAAFBBAABgQQAAcEEAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_reads_a_gguf_written_by_llama_cpps_own_writer(tmp_path):
    header = read_gguf_header(write(tmp_path / "ref.gguf", REFERENCE_GGUF))
    assert header.version == 3
    assert header.metadata["general.architecture"] == "llama"
    assert header.metadata["tokenizer.ggml.tokens"] == ["<s>", "</s>", "hi"]
    assert header.metadata["tiny.nested"] == [1, 2, 3]
    assert [(t.name, t.shape, t.ggml_type) for t in header.tensors] == [
        ("token_embd.weight", (4, 4), 0), ("blk.0.attn_q.weight", (32, 2), 8)]
    # where the reference reader (gguf.GGUFReader) puts the tensor data: 640 and 704
    assert header.data_offset == 640 and [t.offset for t in header.tensors] == [0, 64]
    assert gguf_capabilities(header) == {
        "format": "gguf v3", "architecture": "llama", "context_length": 4096, "embedding_length": 4,
        "block_count": 1, "parameter_count": 80, "tensor_count": 2, "size_label": "1K",
        "quantization": "Q8_0", "chat_template": True,
    }


def test_long_arrays_are_skipped_but_counted(tmp_path):
    header = read_gguf_header(write(tmp_path / "m.gguf", gguf_bytes()))
    assert "tokenizer.ggml.tokens" not in header.metadata
    assert header.array_lengths["tokenizer.ggml.tokens"] == 40
    caps = read_capabilities(tmp_path / "m.gguf", "gguf")
    assert caps["quantization"] == "Q4_K_M" and caps["context_length"] == 8192 and caps["parameter_count"] == 64


@pytest.mark.parametrize("cut", [3, 20, 100, 300, 600, 700])
def test_a_truncated_gguf_is_rejected_with_the_offset(tmp_path, cut):
    path = write(tmp_path / "cut.gguf", REFERENCE_GGUF[:cut])
    with pytest.raises(ImportRejected, match=r"cut\.gguf: truncated GGUF (header|file)"):
        read_gguf_header(path)


@pytest.mark.parametrize("patch,message", [
    ((0, b"GGUX"), "expected the magic 'GGUF'"),
    ((4, struct.pack("<I", 1)), "version 1 is not supported"),
    # the first key's length claims far more than the file holds
    ((24, struct.pack("<Q", 1 << 60)), "truncated GGUF header: key #0 needs"),
    # general.architecture's value type 8 (string) becomes 77
    ((52, struct.pack("<I", 77)), "value type 77"),
])
def test_a_malformed_gguf_is_rejected_with_a_reason(tmp_path, patch, message):
    offset, raw = patch
    data = bytearray(REFERENCE_GGUF)
    data[offset:offset + len(raw)] = raw
    with pytest.raises(ImportRejected, match=message):
        read_gguf_header(write(tmp_path / "bad.gguf", bytes(data)))


def test_safetensors_header_gives_dtypes_and_counts(tmp_path):
    path = write(tmp_path / "m.safetensors", safetensors_bytes(
        {"a": ("F16", [4, 8]), "b": ("F32", [8]), "c": ("BF16", [2, 2])}, {"format": "pt"}))
    header = read_safetensors_header(path)
    assert header.metadata == {"format": "pt"} and header.parameter_count == 44
    assert read_capabilities(path, "safetensors") == {
        "format": "safetensors", "dtypes": ["BF16", "F16", "F32"], "tensor_count": 3, "parameter_count": 44}


@pytest.mark.parametrize("damage,message", [
    (lambda d: d[:-10], "truncated safetensors file: tensor 'b' ends"),
    (lambda d: d[:40], "truncated safetensors header"),
    (lambda d: struct.pack("<Q", 7) + b"{nojson" + d[15:], "not valid JSON"),
    (lambda d: d.replace(b'"F32"', b'"F16"'), r"tensor 'b': 32 bytes for F16 \[8\] \(expected 16\)"),
])
def test_a_damaged_safetensors_is_rejected(tmp_path, damage, message):
    data = safetensors_bytes({"a": ("F16", [4, 8]), "b": ("F32", [8])})
    with pytest.raises(ImportRejected, match=message):
        read_safetensors_header(write(tmp_path / "bad.safetensors", damage(data)))


def test_a_snapshot_folder_reads_config_shards_and_index(tmp_path):
    folder = tmp_path / "snap"
    write(folder / "model-00001-of-00002.safetensors", safetensors_bytes({"a": ("F16", [16, 16])}))
    write(folder / "model-00002-of-00002.safetensors", safetensors_bytes({"b": ("BF16", [16])}))
    write(folder / "model.safetensors.index.json", json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}).encode())
    write(folder / "config.json", json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "max_position_embeddings": 32768}).encode())
    write(folder / "tokenizer_config.json", json.dumps({"chat_template": "{{ x }}"}).encode())
    caps = read_capabilities(folder, "safetensors")
    assert caps == {"format": "safetensors", "dtypes": ["BF16", "F16"], "tensor_count": 2, "parameter_count": 272,
                    "architecture": "Qwen2ForCausalLM", "model_type": "qwen2", "context_length": 32768,
                    "chat_template": True}
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ImportRejected, match="incomplete snapshot: the index names model-00002-of-00002"):
        read_capabilities(folder, "safetensors")
