"""Search released files for private facts, byte by byte.

A release may contain JSON, Markdown, PNG and safetensors files. Each file is searched for:

- private strings (data and teacher paths, fingerprints) anywhere in its bytes;
- private integers (training-set size, per-class label counts) as standalone decimal numbers
  in text, in a safetensors header and in PNG text chunks, and the training-set size as a
  little-endian int32 or int64 in binary data;
- teacher tensors: 16-byte windows of their float32 and float16 encodings anywhere in the
  bytes, and the decimal spellings of sample values in text.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = {".json", ".jsonl", ".md", ".txt", ".yaml", ".yml", ".csv", ".html", ".py", ".cfg", ".toml"}
# Decimal samples per teacher tensor: enough to catch a dump of any of them, few enough to scan fast.
DECIMAL_SAMPLES = 32


@dataclass
class PrivateFacts:
    strings: dict[str, str] = field(default_factory=dict)  # description -> text that must not appear
    integers: dict[str, int] = field(default_factory=dict)  # description -> number that must not appear
    binary_integers: dict[str, int] = field(default_factory=dict)  # also searched as int32 / int64 bytes
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # description -> teacher tensor


def released_files(run_dir: Path, private_dir: str = "private") -> list[Path]:
    """Return every file under `run_dir` except those in its private folder."""
    return sorted(p for p in run_dir.rglob("*") if p.is_file() and private_dir not in p.relative_to(run_dir).parts)


def _float_windows(tensor: torch.Tensor) -> list[bytes]:
    """Return 16-byte windows of a tensor's float32 and float16 encodings, skipping uninformative ones."""
    values = tensor.detach().cpu().flatten()
    windows = []
    for dtype, width in ((np.float32, 4), (np.float16, 8)):
        array = values.to(torch.float32).numpy().astype(dtype)
        if array.size < width:
            continue
        starts = sorted({0, array.size // 3, array.size // 2, array.size - width})
        for start in starts:
            chunk = array[start : start + width]
            # Constant windows (zeros, ones of a fresh BatchNorm) occur in any model; they prove nothing.
            if np.unique(chunk).size < width:
                continue
            windows.append(chunk.tobytes())
    return windows


def _decimal_spellings(tensor: torch.Tensor) -> list[str]:
    values = tensor.detach().cpu().flatten().to(torch.float32).numpy()
    step = max(1, values.size // DECIMAL_SAMPLES)
    spellings = []
    for value in values[::step][:DECIMAL_SAMPLES]:
        if value == 0 or float(value).is_integer():
            continue
        spellings.append(repr(float(value)))  # json.dumps of the float64 value
        spellings.append(str(np.float32(value)))  # numpy's shortest float32 spelling
    return spellings


def _texts_of(path: Path, data: bytes) -> list[str]:
    """Return the parts of a file that are text: the whole file, a safetensors header, PNG text chunks."""
    if path.suffix in TEXT_SUFFIXES:
        return [data.decode("utf-8", errors="replace")]
    if path.suffix == ".safetensors" and len(data) >= 8:
        (length,) = struct.unpack("<Q", data[:8])
        return [data[8 : 8 + length].decode("utf-8", errors="replace")]
    if data.startswith(b"\x89PNG"):
        return _png_texts(data)
    return []


def _png_texts(data: bytes) -> list[str]:
    texts, offset = [], 8
    while offset + 8 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        if kind == b"tEXt":
            texts.append(body.decode("latin-1"))
        elif kind == b"zTXt":
            keyword, _, rest = body.partition(b"\x00")
            texts.append(keyword.decode("latin-1") + " " + zlib.decompress(rest[1:]).decode("latin-1"))
        elif kind == b"iTXt":
            texts.append(body.decode("utf-8", errors="replace"))
        offset += 12 + length
    return texts


def _standalone(number: int) -> re.Pattern:
    # Not part of a longer number, a decimal fraction or an exponent.
    return re.compile(rf"(?<![\d.eE+-]){number}(?![\d.])")


def scan_release(files: list[Path], facts: PrivateFacts) -> list[str]:
    """Return one finding per private fact found, naming the file and the fact."""
    findings = []
    tensor_windows = {name: _float_windows(t) for name, t in facts.tensors.items()}
    tensor_decimals = {name: _decimal_spellings(t) for name, t in facts.tensors.items()}
    integer_patterns = {name: _standalone(value) for name, value in facts.integers.items()}
    for path in files:
        data = path.read_bytes()
        for name, text in facts.strings.items():
            if text and text.encode() in data:
                findings.append(f"{path}: {name} {text!r}")
        for name, value in facts.binary_integers.items():
            if path.suffix not in TEXT_SUFFIXES:
                for encoding in (struct.pack("<i", value), struct.pack("<q", value)):
                    if encoding in data:
                        findings.append(f"{path}: {name} {value} as a little-endian integer")
                        break
        for name, windows in tensor_windows.items():
            if any(window in data for window in windows):
                findings.append(f"{path}: bytes of {name}")
        for text in _texts_of(path, data):
            for name, pattern in integer_patterns.items():
                if pattern.search(text):
                    findings.append(f"{path}: {name} {facts.integers[name]} as a number in text")
            for name, spellings in tensor_decimals.items():
                hit = next((s for s in spellings if s in text), None)
                if hit:
                    findings.append(f"{path}: value {hit} of {name} in text")
    return findings


def teacher_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the floating-point parameters and buffers of a teacher by name."""
    named = {f"teacher parameter {n}": p for n, p in module.named_parameters()}
    named.update({f"teacher buffer {n}": b for n, b in module.named_buffers() if b.is_floating_point()})
    return named
