// Replaying the graph cache's graphs from C++: the hit path of an eager step without Python.
//
// Up to 4k positions an eager clustered step was bound by the CPU that issues it: around its two
// graph replays sit the autograd Function and its backward node, the cache's key, lookup and
// replay, and the allocations of the outputs, all in Python. On the GPU server's CPU a step at 4k
// took 412 us to issue that way and takes 232 from here, where its GPU work takes 290
// (benchmarks/NOTES.md, twenty-eighth session). fairseq_clustered/ops/graph_cache.py still captures, checks and
// evicts every graph; once a graph reads its callers' tensors in place (GraphInputs, checked at
// its capture), the cache also registers it here, under the key an entry point builds in C++
// from its arguments (CallKey), with what a replay needs: where the call's filled tensors go
// and their layouts, which outputs are copied out of the graph. An entry point
// (clustered_step.cpp) then allocates the filled tensors, points the graph at the call's
// tensors, launches it on the current stream and hands out the outputs, or, on any miss, leaves
// the call to Python, which runs it as before (and registers what it captures).
//
// A replay here is torch.cuda.CUDAGraph.replay less its random-number bookkeeping: these
// compositions draw no random numbers (dropout comes in as a mask), so the Philox offsets that
// replay advances are untouched by their graphs. The table serves nothing while the environment
// variables of the cache's settings differ from those it was filled under (the next registration
// empties it), nor inside a stream capture, where the Python cache runs compositions eagerly for
// the outer capture to record.
#include "graph_table.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace fcl {

std::vector<at::Tensor> fresh_copies_cuda(const std::vector<at::Tensor>& srcs);

TensorSpec TensorSpec::of(const at::Tensor& tensor) {
  return {tensor.sizes().vec(), tensor.strides().vec(), tensor.scalar_type()};
}

at::Tensor TensorSpec::empty(const at::Device& device) const {
  return at::empty_strided(sizes, strides, at::TensorOptions().dtype(dtype).device(device));
}

CallKey& CallKey::tensor(const at::Tensor& tensor) {
  if (!tensor.defined()) {
    words_.push_back(-1);
    return *this;
  }
  words_.push_back(tensor.dim());
  for (const int64_t size : tensor.sizes()) words_.push_back(size);
  for (const int64_t stride : tensor.strides()) words_.push_back(stride);
  words_.push_back(static_cast<int64_t>(tensor.scalar_type()));
  words_.push_back(tensor.is_cuda() ? tensor.get_device() : -2);
  return *this;
}

CallKey& CallKey::tensor(const c10::optional<at::Tensor>& tensor) {
  return this->tensor(tensor.has_value() ? *tensor : at::Tensor());
}

CallKey& CallKey::integer(int64_t value) {
  words_.push_back(value);
  return *this;
}

CallKey& CallKey::real(double value) {
  int64_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  words_.push_back(bits);
  return *this;
}

std::string CallKey::finish(const at::Device& device) const {
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  std::string bytes(reinterpret_cast<const char*>(words_.data()), words_.size() * sizeof(int64_t));
  const int64_t tail[2] = {device.index(), reinterpret_cast<intptr_t>(stream.stream())};
  bytes.append(reinterpret_cast<const char*>(tail), sizeof(tail));
  return bytes;
}

GraphTable::GraphTable(std::vector<std::string> environment) : names_(std::move(environment)) {
  environment_ = this->environment();
}

GraphTable::~GraphTable() {
  // The last owner may be a backward node that autograd's device thread frees without the GIL.
  if (fallbacks_.empty() || !Py_IsInitialized()) return;
  pybind11::gil_scoped_acquire gil;
  for (auto& fallback : fallbacks_) Py_DECREF(fallback.second);
}

bool GraphTable::same_environment() const {
  for (size_t i = 0; i < names_.size(); ++i) {
    const char* value = std::getenv(names_[i].c_str());
    if ((value != nullptr) != environment_[i].has_value()) return false;
    if (value != nullptr && *environment_[i] != value) return false;
  }
  return true;
}

std::vector<std::optional<std::string>> GraphTable::environment() const {
  std::vector<std::optional<std::string>> values;
  values.reserve(names_.size());
  for (const auto& name : names_) {
    const char* value = std::getenv(name.c_str());
    values.push_back(value != nullptr ? std::optional<std::string>(value) : std::nullopt);
  }
  return values;
}

void GraphTable::add(const std::string& key, Graph graph) {
  TORCH_CHECK(graph.inputs != nullptr && graph.inputs->unsupported().empty(),
              "GraphTable.add: the graph must read its inputs in place");
  for (const auto& filled : graph.filled) {
    TORCH_CHECK(filled.first < graph.tensor_count, "GraphTable.add: filled position ", filled.first, " of ",
                graph.tensor_count, " tensors");
  }
  size_t copies = 0;
  for (const int64_t position : graph.outputs) {
    const bool is_filled = std::any_of(graph.filled.begin(), graph.filled.end(), [&](const auto& filled) {
      return static_cast<int64_t>(filled.first) == position;
    });
    TORCH_CHECK(position == -1 || is_filled, "GraphTable.add: output position ", position, " is not a filled tensor");
    copies += position == -1;
  }
  TORCH_CHECK(copies == graph.copied.size(), "GraphTable.add: ", copies, " outputs to copy, ", graph.copied.size(),
              " tensors given");
  std::lock_guard<std::mutex> lock(mutex_);
  if (!same_environment()) {  // graphs registered under other settings may not serve these
    graphs_.clear();
    environment_ = environment();
  }
  graph.last_used = ++tick_;
  graphs_[key] = std::move(graph);
}

void GraphTable::remove(const std::string& key) {
  std::lock_guard<std::mutex> lock(mutex_);
  graphs_.erase(key);
}

void GraphTable::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  graphs_.clear();
}

size_t GraphTable::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return graphs_.size();
}

std::optional<GraphTable::Served> GraphTable::serve(const std::string& key, std::vector<at::Tensor> tensors,
                                                     const at::Device& device) {
  c10::cuda::CUDAGuard guard(device);
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return std::nullopt;
  std::lock_guard<std::mutex> lock(mutex_);
  if (!same_environment()) return std::nullopt;
  const auto found = graphs_.find(key);
  if (found == graphs_.end()) return std::nullopt;
  Graph& graph = found->second;
  TORCH_CHECK(tensors.size() <= graph.tensor_count, "fairseq_clustered: a replay got ", tensors.size(),
              " tensors for a graph of ", graph.tensor_count, " (a bug: please report it)");
  tensors.resize(graph.tensor_count);
  for (const auto& filled : graph.filled) {
    if (!tensors[filled.first].defined()) tensors[filled.first] = filled.second.empty(device);
  }
  std::vector<int64_t> bases(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].defined(), "fairseq_clustered: a replay lacks tensor ", i, " (a bug: please report it)");
    bases[i] = tensors[i].numel() ? reinterpret_cast<int64_t>(tensors[i].data_ptr()) : 0;
  }
  if (!graph.inputs->point_at(graph.exec, bases)) return std::nullopt;
  C10_CUDA_CHECK(cudaGraphLaunch(reinterpret_cast<cudaGraphExec_t>(graph.exec),
                                 c10::cuda::getCurrentCUDAStream(device.index()).stream()));
  ++replays_;
  graph.last_used = ++tick_;
  Served served;
  served.extras = graph.extras;
  std::vector<at::Tensor> copies;
  if (!graph.copied.empty()) copies = fresh_copies_cuda(graph.copied);
  size_t next_copy = 0;
  served.outputs.reserve(graph.outputs.size());
  for (const int64_t position : graph.outputs) {
    served.outputs.push_back(position >= 0 ? tensors[static_cast<size_t>(position)] : copies.at(next_copy++));
  }
  return served;
}

std::vector<std::string> GraphTable::used_since_asked() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::pair<uint64_t, const std::string*>> used;
  for (const auto& entry : graphs_) {
    if (entry.second.last_used > asked_at_) used.emplace_back(entry.second.last_used, &entry.first);
  }
  std::sort(used.begin(), used.end());
  std::vector<std::string> keys;
  keys.reserve(used.size());
  for (const auto& entry : used) keys.push_back(*entry.second);
  asked_at_ = tick_;
  return keys;
}

void GraphTable::set_backward_fallback(const std::string& variant, pybind11::object fallback) {
  PyObject*& held = fallbacks_[variant];
  PyObject* previous = held;
  held = fallback.release().ptr();
  Py_XDECREF(previous);
}

pybind11::object GraphTable::backward_fallback(const std::string& variant) const {
  const auto found = fallbacks_.find(variant);
  return found != fallbacks_.end() ? pybind11::reinterpret_borrow<pybind11::object>(found->second)
                                   : pybind11::none();
}

}  // namespace fcl
