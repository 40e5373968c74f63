// The graph cache's in-place graphs, replayed from C++ (see graph_table.cpp).
#pragma once

#include <torch/extension.h>

#include "graph_inputs.h"

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace fcl {

// Sizes, strides and dtype of a tensor a replay allocates.
struct TensorSpec {
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype = at::kFloat;

  static TensorSpec of(const at::Tensor& tensor);
  at::Tensor empty(const at::Device& device) const;
};

// The key of a call: a composition's id, then a word list describing each tensor (its sizes,
// strides, dtype and device; -1 for None) and scalar, then the device and its current stream.
// The Python cache registers a graph under the key built from the call it captured, and the
// C++ entry points (clustered_step.cpp) build the same key from their arguments.
class CallKey {
 public:
  explicit CallKey(int64_t composition) { words_.push_back(composition); }
  CallKey& tensor(const at::Tensor& tensor);
  CallKey& tensor(const c10::optional<at::Tensor>& tensor);
  CallKey& integer(int64_t value);
  CallKey& real(double value);
  std::string finish(const at::Device& device) const;

 private:
  std::vector<int64_t> words_;
};

// The graphs of one fairseq_clustered/ops/graph_cache.py GraphCache that read their callers'
// tensors in place, keyed by CallKey, each with what a replay needs to hand out its outputs.
class GraphTable {
 public:
  struct Graph {
    int64_t exec = 0;                      // the cudaGraphExec_t (owned by the Python cache's CUDAGraph)
    std::shared_ptr<GraphInputs> inputs;   // points the graph at the call's tensors
    size_t tensor_count = 0;               // the call's tensors, filled ones included, in argument order
    std::vector<std::pair<size_t, TensorSpec>> filled;  // position among them, layout
    std::vector<int64_t> outputs;          // per output: the filled tensor's position, or -1: a copy
    std::vector<at::Tensor> copied;        // graph-owned outputs, copied into fresh tensors per replay
    std::vector<TensorSpec> extras;        // layouts the entry point remembers with the graph
    uint64_t last_used = 0;
  };

  struct Served {
    std::vector<at::Tensor> outputs;
    std::vector<TensorSpec> extras;
  };

  // `environment`: the names of the settings the Python cache reads from the environment.
  explicit GraphTable(std::vector<std::string> environment);
  ~GraphTable();

  // From the Python cache (the caller keeps the graph alive until it removes the key). A table
  // serves only while the environment is as at the latest add: one that differs clears it.
  void add(const std::string& key, Graph graph);
  void remove(const std::string& key);
  void clear();

  // The replay of `key`'s graph on `tensors` (the call's tensors in argument order, undefined at
  // the filled positions, which are allocated here; undefined trailing ones may be left out),
  // launched on the device's current stream; nullopt where the table does not serve this call:
  // no such graph, the environment changed, a capture is under way, or a tensor is not aligned
  // like the graph's static input (the Python cache then takes the call).
  std::optional<Served> serve(const std::string& key, std::vector<at::Tensor> tensors, const at::Device& device);

  int64_t replays() const { return replays_; }
  size_t size() const;
  // The keys served since the last call, least recently used first (the Python cache's LRU order).
  std::vector<std::string> used_since_asked();

  // The Python callable that takes a backward of `variant` ("clustered", "improved") the table does
  // not serve (a CudaOps method behind a weakref.WeakMethod); None where none was set.
  void set_backward_fallback(const std::string& variant, pybind11::object fallback);
  pybind11::object backward_fallback(const std::string& variant) const;

 private:
  std::vector<std::optional<std::string>> environment() const;
  bool same_environment() const;  // (under the lock)

  mutable std::mutex mutex_;
  std::unordered_map<std::string, Graph> graphs_;
  const std::vector<std::string> names_;
  std::vector<std::optional<std::string>> environment_;
  int64_t replays_ = 0;
  uint64_t tick_ = 0, asked_at_ = 0;
  std::unordered_map<std::string, PyObject*> fallbacks_;  // strong references, released under the GIL
};

}  // namespace fcl
