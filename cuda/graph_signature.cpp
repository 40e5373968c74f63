// The key under which fairseq_clustered/ops/graph_cache.py keeps a composition's CUDA graph, in C++.
//
// The cache builds the key of every call it sees, a graph replay or not: the current stream and
// each argument's description (a tensor's sizes, strides, dtype and device; anything else's type
// and value). In Python that took about 4 us per call on a workstation's CPU and 15-30 us on the
// GPU server's, two calls per training step, in a step that is bound by the host below 8k
// positions; here it is one pass over the arguments. graph_cache._signature is the same function
// in Python (CPU tensors, builds without this extension) and says what the key must tell apart.
#include "graph_signature.h"

#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <vector>

namespace fcl {

namespace py = pybind11;

py::tuple graph_signature(const py::str& name, const py::sequence& args, const py::sequence& filled) {
  const py::ssize_t count = py::len(args);
  std::vector<bool> is_filled(static_cast<size_t>(count), false);
  for (const py::handle position : filled) {
    const auto i = position.cast<py::ssize_t>();
    if (i >= 0 && i < count) is_filled[static_cast<size_t>(i)] = true;
  }
  // Tensors are described in `words`; every other argument goes into `others` as (type, value), as
  // the Python key does (1, 1.0 and True hash alike), with a 0 word marking its place (None: -1).
  std::vector<int64_t> words;
  words.reserve(static_cast<size_t>(count) * 10);
  py::list tensors;
  py::list others;
  int64_t nbytes = 0;
  int64_t device = -1;
  for (py::ssize_t i = 0; i < count; ++i) {
    const py::object arg = args[i];
    if (arg.is_none()) {
      words.push_back(-1);
      continue;
    }
    if (!THPVariable_Check(arg.ptr())) {
      words.push_back(0);
      others.append(py::make_tuple(py::type::of(arg), arg));
      continue;
    }
    const at::Tensor& tensor = THPVariable_Unpack(arg.ptr());
    if (!tensor.is_cuda()) return py::make_tuple(py::none(), py::list(), 0);  // runs eagerly
    tensors.append(arg);
    if (!is_filled[static_cast<size_t>(i)]) nbytes += static_cast<int64_t>(tensor.nbytes());
    if (device < 0) device = tensor.get_device();
    words.push_back(tensor.dim() + 1);
    for (const int64_t size : tensor.sizes()) words.push_back(size);
    for (const int64_t stride : tensor.strides()) words.push_back(stride);
    words.push_back(static_cast<int64_t>(tensor.scalar_type()));
    words.push_back(tensor.get_device());
  }
  if (device < 0) return py::make_tuple(py::none(), py::list(), 0);  // no tensor: runs eagerly
  const auto current = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device));
  const auto stream = reinterpret_cast<intptr_t>(current.stream());
  py::bytes described(reinterpret_cast<const char*>(words.data()), words.size() * sizeof(int64_t));
  py::tuple key = py::make_tuple(name, device, stream, described, py::tuple(others));
  return py::make_tuple(key, tensors, nbytes);
}

}  // namespace fcl
