// Pointing a captured CUDA graph at new input tensors, so that a replay reads the caller's
// tensors where they are instead of copies of them (fairseq_clustered/ops/graph_cache.py).
//
// A composition captured in a graph reads its inputs from the static buffers it was captured
// with. Copying every call's tensors into those buffers costs a pass over them (q, k, v and the
// incoming gradient: 6 of the 10 large tensors a step's copies moved). Instead, the kernel nodes whose
// parameters hold an address inside a static buffer are found once, by reading every 8-byte word
// of every parameter (the parameters' sizes come from the driver), and before each replay those
// words are rewritten in the executable graph with the same offsets into the caller's tensors
// (cuGraphExecKernelNodeSetParams; launches already queued keep the old values).
//
// Addresses a kernel does not receive as a parameter word (a table in device memory, a TMA
// descriptor that encodes its address) cannot be found this way, and memcpy / memset nodes on
// an input are not rewritten at all: the Python side checks each graph once against the eager
// result of the same call with the static buffers poisoned, and keeps copying where they differ.
//
// The search can also be fooled the other way: a word that is not an address but falls inside a
// static buffer. The likely one is a small integer beside 4 bytes of struct padding, which hold
// whatever the host's stack held when the launch was built, often the upper half of another device
// address: the word is then that address's 4 GiB region plus the integer. Rewriting it would turn
// the integer into garbage and the kernel would fault, before any check could compare results. Our
// own kernels' parameters have no padding (FCL_NO_PADDING in common.cuh); for the others (torch's,
// whose structs we do not control), a word that lands less than kAmbiguousOffset past a 4 GiB
// boundary is taken as possibly such an integer, and the graph keeps copying its inputs. The
// caching allocator's fresh segments often start right on such a boundary, so the Python side places
// the static buffers clear of those windows where the allocator lets it (graph_cache._placed_buffer),
// so a genuine address of one rarely lands there.
#include "graph_inputs.h"

#include <torch/extension.h>

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

namespace fcl {

#if CUDA_VERSION >= 12040
namespace {

// The driver calls this needs, from the runtime's entry-point table (no link against libcuda).
struct Driver {
  decltype(&cuGraphGetNodes) get_nodes = nullptr;
  decltype(&cuGraphNodeGetType) node_type = nullptr;
  decltype(&cuGraphKernelNodeGetParams) kernel_node_params = nullptr;
  decltype(&cuGraphExecKernelNodeSetParams) set_kernel_node_params = nullptr;
  decltype(&cuGraphMemcpyNodeGetParams) memcpy_node_params = nullptr;
  decltype(&cuGraphMemsetNodeGetParams) memset_node_params = nullptr;
  decltype(&cuFuncGetParamInfo) function_param_info = nullptr;
  decltype(&cuKernelGetParamInfo) kernel_param_info = nullptr;
  std::string missing;  // the calls the driver does not provide

  template <typename F>
  void resolve(const char* name, F& function) {
    void* address = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t error = cudaGetDriverEntryPointByVersion(name, &address, 12040, cudaEnableDefault, &found);
#else
    const cudaError_t error = cudaGetDriverEntryPoint(name, &address, cudaEnableDefault, &found);
#endif
    if (error != cudaSuccess || found != cudaDriverEntryPointSuccess || address == nullptr) {
      (void)cudaGetLastError();
      missing += (missing.empty() ? "" : ", ") + std::string(name);
      return;
    }
    function = reinterpret_cast<F>(address);
  }

  Driver() {
    resolve("cuGraphGetNodes", get_nodes);
    resolve("cuGraphNodeGetType", node_type);
    resolve("cuGraphKernelNodeGetParams", kernel_node_params);
    resolve("cuGraphExecKernelNodeSetParams", set_kernel_node_params);
    resolve("cuGraphMemcpyNodeGetParams", memcpy_node_params);
    resolve("cuGraphMemsetNodeGetParams", memset_node_params);
    resolve("cuFuncGetParamInfo", function_param_info);
    resolve("cuKernelGetParamInfo", kernel_param_info);
  }
};

const Driver& driver() {
  static const Driver instance;
  return instance;
}

// Words whose low 32 bits are below this may be an integer beside stale padding (see the top).
constexpr uint64_t kAmbiguousOffset = uint64_t{1} << 20;

// Offset and size of a kernel's parameter `index`; false past the last one.
bool param_info(const CUDA_KERNEL_NODE_PARAMS& params, size_t index, size_t* offset, size_t* size) {
  const Driver& d = driver();
  const CUresult result = params.func != nullptr ? d.function_param_info(params.func, index, offset, size)
                                                 : d.kernel_param_info(params.kern, index, offset, size);
  return result == CUDA_SUCCESS;
}

}  // namespace

// One rewritten parameter word: param `param`, byte `offset` within it, holds input `input`'s
// address plus `delta`.
struct GraphInputs::Patch {
  size_t param, offset;
  int input;
  int64_t delta;
};

// A kernel node with at least one input address among its parameters: its parameters as captured
// (the node's own copy, rewritten in place before each update) and the words to rewrite.
struct GraphInputs::Node {
  CUgraphNode node;
  CUDA_KERNEL_NODE_PARAMS params;
  std::vector<std::vector<unsigned char>> values;  // each parameter's bytes
  std::vector<void*> pointers;                     // params.kernelParams: values[i].data()
  std::vector<Patch> patches;
};
#else
struct GraphInputs::Patch {};
struct GraphInputs::Node {};
#endif

GraphInputs::GraphInputs(int64_t graph, std::vector<int64_t> starts, std::vector<int64_t> ends)
    : starts_(std::move(starts)), ends_(std::move(ends)), current_(starts_) {
  TORCH_CHECK(starts_.size() == ends_.size(), "GraphInputs: ", starts_.size(), " starts for ", ends_.size(),
              " ends");
#if CUDA_VERSION >= 12040
  const Driver& d = driver();
  if (!d.missing.empty()) {
    unsupported_ = "the CUDA driver lacks " + d.missing;
    return;
  }
  // Which input holds this address (the end of each input included: some kernels take one-past-the-end
  // pointers; the Python side leaves room after every static buffer so no two ranges touch), or -1.
  auto input_of = [&](uint64_t address) -> int {
    for (size_t i = 0; i < starts_.size(); ++i) {
      if (starts_[i] != 0 && address >= static_cast<uint64_t>(starts_[i]) &&
          address <= static_cast<uint64_t>(ends_[i])) {
        return static_cast<int>(i);
      }
    }
    return -1;
  };
  size_t count = 0;
  CUgraph handle = reinterpret_cast<CUgraph>(graph);
  TORCH_CHECK(d.get_nodes(handle, nullptr, &count) == CUDA_SUCCESS, "GraphInputs: cuGraphGetNodes failed");
  std::vector<CUgraphNode> nodes(count);
  TORCH_CHECK(d.get_nodes(handle, nodes.data(), &count) == CUDA_SUCCESS, "GraphInputs: cuGraphGetNodes failed");
  for (CUgraphNode node : nodes) {
    CUgraphNodeType type;
    TORCH_CHECK(d.node_type(node, &type) == CUDA_SUCCESS, "GraphInputs: cuGraphNodeGetType failed");
    if (type == CU_GRAPH_NODE_TYPE_EMPTY || type == CU_GRAPH_NODE_TYPE_EVENT_RECORD ||
        type == CU_GRAPH_NODE_TYPE_WAIT_EVENT) {
      continue;
    }
    if (type == CU_GRAPH_NODE_TYPE_MEMCPY) {
      CUDA_MEMCPY3D copy;
      TORCH_CHECK(d.memcpy_node_params(node, &copy) == CUDA_SUCCESS, "GraphInputs: cuGraphMemcpyNodeGetParams failed");
      const bool reads = copy.srcMemoryType != CU_MEMORYTYPE_HOST && copy.srcMemoryType != CU_MEMORYTYPE_ARRAY &&
                         input_of(copy.srcDevice) >= 0;
      const bool writes = copy.dstMemoryType != CU_MEMORYTYPE_HOST && copy.dstMemoryType != CU_MEMORYTYPE_ARRAY &&
                          input_of(copy.dstDevice) >= 0;
      if (reads || writes) {
        unsupported_ = "a memcpy node reads or writes an input";
        return;
      }
      continue;
    }
    if (type == CU_GRAPH_NODE_TYPE_MEMSET) {
      CUDA_MEMSET_NODE_PARAMS set;
      TORCH_CHECK(d.memset_node_params(node, &set) == CUDA_SUCCESS, "GraphInputs: cuGraphMemsetNodeGetParams failed");
      if (input_of(set.dst) >= 0) {
        unsupported_ = "a memset node writes an input";
        return;
      }
      continue;
    }
    if (type != CU_GRAPH_NODE_TYPE_KERNEL) {
      unsupported_ = "the graph has a node of type " + std::to_string(static_cast<int>(type)) +
                     " (only kernels, copies, memsets, events and empty nodes are read)";
      return;
    }
    Node entry;
    entry.node = node;
    TORCH_CHECK(d.kernel_node_params(node, &entry.params) == CUDA_SUCCESS,
                "GraphInputs: cuGraphKernelNodeGetParams failed");
    if (entry.params.kernelParams == nullptr) {
      unsupported_ = "a kernel node passes its parameters as one buffer (extra), not one by one";
      return;
    }
    size_t offset = 0, size = 0;
    for (size_t param = 0; param_info(entry.params, param, &offset, &size); ++param) {
      const auto* bytes = static_cast<const unsigned char*>(entry.params.kernelParams[param]);
      entry.values.emplace_back(bytes, bytes + size);
      for (size_t word = 0; word + sizeof(uint64_t) <= size; word += sizeof(uint64_t)) {
        uint64_t value;
        std::memcpy(&value, bytes + word, sizeof(value));
        const int input = input_of(value);
        if (input < 0) continue;
        if ((value & 0xffffffffu) < kAmbiguousOffset) {
          unsupported_ = "a kernel parameter word (parameter " + std::to_string(param) + ", byte " +
                         std::to_string(word) + ") points less than 1 MiB past a 4 GiB boundary into input " +
                         std::to_string(input) + ": it may be an integer beside stale padding, not an address";
          return;
        }
        entry.patches.push_back({param, word, input, static_cast<int64_t>(value) - starts_[input]});
      }
    }
    if (entry.patches.empty()) continue;
    for (auto& value : entry.values) entry.pointers.push_back(value.data());
    entry.params.kernelParams = entry.pointers.data();
    entry.params.extra = nullptr;
    nodes_.push_back(std::move(entry));
  }
#else
  (void)graph;
  unsupported_ = "built with CUDA older than 12.4 (no cuFuncGetParamInfo)";
#endif
}

GraphInputs::~GraphInputs() = default;

int64_t GraphInputs::kernel_nodes() const { return static_cast<int64_t>(nodes_.size()); }

bool GraphInputs::point_at(int64_t exec, const std::vector<int64_t>& bases) {
  TORCH_CHECK(unsupported_.empty(), "GraphInputs.point_at: ", unsupported_);
  TORCH_CHECK(bases.size() == starts_.size(), "GraphInputs.point_at: ", bases.size(), " bases for ",
              starts_.size(), " inputs");
  for (size_t i = 0; i < bases.size(); ++i) {
    // Kernels chose their vector widths (and Triton its specialisations) for the static buffers'
    // alignment (512 bytes); a base congruent to it modulo 256 keeps every such choice valid.
    if (starts_[i] != 0 && (bases[i] - starts_[i]) % 256 != 0) return false;
  }
  if (bases == current_) return true;
#if CUDA_VERSION >= 12040
  const Driver& d = driver();
  for (Node& entry : nodes_) {
    // (a node whose inputs all stay where they are keeps its parameters: each update is a driver call)
    const bool moved = std::any_of(entry.patches.begin(), entry.patches.end(),
                                   [&](const Patch& patch) { return bases[patch.input] != current_[patch.input]; });
    if (!moved) continue;
    for (const Patch& patch : entry.patches) {
      const int64_t address = bases[patch.input] + patch.delta;
      std::memcpy(entry.values[patch.param].data() + patch.offset, &address, sizeof(address));
    }
    const CUresult result =
        d.set_kernel_node_params(reinterpret_cast<CUgraphExec>(exec), entry.node, &entry.params);
    TORCH_CHECK(result == CUDA_SUCCESS, "GraphInputs.point_at: cuGraphExecKernelNodeSetParams failed (", result,
                ")");
  }
#else
  (void)exec;
#endif
  current_ = bases;
  return true;
}

}  // namespace fcl
