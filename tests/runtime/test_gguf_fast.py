"""FastGGUFReader against the gguf package's GGUFReader: the same metadata values (every field's
contents(), including string, scalar, bool and empty arrays) and the same tensors, on a written
file and on the embedded SmolLM2 GGUF (whose tokenizer arrays are what the fast path is for)."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from fleetserve.runtime.loader.gguf_fast import FastGGUFReader  # noqa: E402


def _same(path):
    a, b = gguf.GGUFReader(str(path), "r"), FastGGUFReader(str(path), "r")
    assert list(a.fields) == list(b.fields)
    for key, fa in a.fields.items():
        fb = b.fields[key]
        assert fa.contents() == fb.contents(), key
        assert fa.types == fb.types, key
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.tensor_type == tb.tensor_type and list(ta.shape) == list(tb.shape)
        assert ta.data_offset == tb.data_offset and np.array_equal(ta.data, tb.data)
    return a, b


def test_written_file(tmp_path):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("t.strings", ["a", "", "héllo wörld", "Ġthe", "x" * 300])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.empty", [])
    w.add_string("t.s", "plain")
    w.add_uint32("t.u", 7)
    w.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    a, _ = _same(path)
    assert a.fields["t.strings"].contents()[2] == "héllo wörld"


def test_embedded_model(smollm2_path):
    _, b = _same(smollm2_path)
    assert len(b.fields["tokenizer.ggml.tokens"].contents()) == 49152
