// The cache key of a chunk list, computed in one C++ pass (no CUDA; included by binding.cpp).
//
// A plan (the chunk table and tile map on the device) depends only on, per chunk and in order: the data
// pointer, element count, dtype, contiguity and device of its four tensors, its base_index and its
// weight_decay. chunk_signature packs exactly these into bytes, so that equal bytes mean an identical plan
// even when the Python chunk objects are new every step or a freed tensor's memory was reused. It is
// ~50x cheaper than the Python checks plus plan(): one attribute read per field, no Python-level loops.
// It never throws (C++ exceptions crashed the process on the lent GPU machine, see binding.cpp): anything
// unexpected returns None, and the caller takes the checked slow path.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <string>

namespace megatron_sr {

inline void put_word(std::string& out, uint64_t v) { out.append(reinterpret_cast<const char*>(&v), sizeof v); }

// Appends the words of one tensor attribute of `chunk`; false if it is missing or not a plain strided tensor.
inline bool put_tensor(std::string& out, PyObject* chunk, PyObject* name) {
  PyObject* obj = PyObject_GetAttr(chunk, name);
  if (obj == nullptr) {
    PyErr_Clear();
    return false;
  }
  bool ok = THPVariable_Check(obj);
  if (ok) {
    const at::Tensor& t = THPVariable_Unpack(obj);
    ok = t.defined() && t.layout() == c10::kStrided && t.has_storage();
    if (ok) {
      const c10::Device d = t.device();
      put_word(out, reinterpret_cast<uintptr_t>(t.data_ptr()));
      put_word(out, static_cast<uint64_t>(t.numel()));
      put_word(out, static_cast<uint64_t>(static_cast<uint8_t>(t.scalar_type())) |
                        (static_cast<uint64_t>(t.is_contiguous()) << 8) |
                        (static_cast<uint64_t>(static_cast<uint8_t>(d.type())) << 16) |
                        (static_cast<uint64_t>(static_cast<uint8_t>(d.index() + 1)) << 24));
    }
  }
  Py_DECREF(obj);
  return ok;
}

// Appends a number attribute of `chunk`: an exact integer (as_int) or the bits of a double; false on error.
inline bool put_number(std::string& out, PyObject* chunk, PyObject* name, bool as_int) {
  PyObject* obj = PyObject_GetAttr(chunk, name);
  if (obj == nullptr) {
    PyErr_Clear();
    return false;
  }
  bool ok = true;
  if (as_int) {
    int overflow = 0;
    const long long v = PyLong_Check(obj) ? PyLong_AsLongLongAndOverflow(obj, &overflow) : 0;
    ok = PyLong_Check(obj) && overflow == 0 && !(v == -1 && PyErr_Occurred());
    put_word(out, static_cast<uint64_t>(v));
  } else {
    const double v = PyFloat_Check(obj) || PyLong_Check(obj) ? PyFloat_AsDouble(obj) : 0.0;
    ok = (PyFloat_Check(obj) || PyLong_Check(obj)) && !(v == -1.0 && PyErr_Occurred());
    uint64_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    put_word(out, bits);
  }
  if (!ok) PyErr_Clear();
  Py_DECREF(obj);
  return ok;
}

// bytes: per chunk 4 x (pointer, numel, dtype|contiguous|device) + base_index + weight_decay bits; or None.
inline pybind11::object chunk_signature(const pybind11::object& chunks) {
  static const char* const kTensors[] = {"param", "grad", "exp_avg", "exp_avg_sq"};
  PyObject* seq = PySequence_Fast(chunks.ptr(), "chunks must be a sequence");
  if (seq == nullptr) {
    PyErr_Clear();
    return pybind11::none();
  }
  PyObject* names[6] = {};
  for (int i = 0; i < 4; ++i) names[i] = PyUnicode_InternFromString(kTensors[i]);
  names[4] = PyUnicode_InternFromString("base_index");
  names[5] = PyUnicode_InternFromString("weight_decay");
  bool ok = true;
  for (PyObject* n : names) ok = ok && n != nullptr;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
  std::string out;
  out.reserve(static_cast<size_t>(count) * 14 * sizeof(uint64_t));
  PyObject** items = PySequence_Fast_ITEMS(seq);
  for (Py_ssize_t i = 0; ok && i < count; ++i) {
    for (int k = 0; ok && k < 4; ++k) ok = put_tensor(out, items[i], names[k]);
    ok = ok && put_number(out, items[i], names[4], true) && put_number(out, items[i], names[5], false);
  }
  for (PyObject* n : names) Py_XDECREF(n);
  Py_DECREF(seq);
  if (!ok) {
    PyErr_Clear();
    return pybind11::none();
  }
  return pybind11::bytes(out);
}

}  // namespace megatron_sr
