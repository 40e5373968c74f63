// Pointing a captured CUDA graph's kernels at new input tensors (see graph_inputs.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fcl {

// The kernel parameters of one captured graph that hold addresses inside its static inputs.
class GraphInputs {
 public:
  // `graph`: the cudaGraph_t; input i's static buffer holds the addresses [starts[i], ends[i]]
  // (start 0: an empty input, never read). Reads the graph's nodes once.
  GraphInputs(int64_t graph, std::vector<int64_t> starts, std::vector<int64_t> ends);
  ~GraphInputs();

  // Why the inputs cannot be pointed elsewhere ("" if they can).
  const std::string& unsupported() const { return unsupported_; }
  // Kernel nodes whose parameters are rewritten.
  int64_t kernel_nodes() const;
  // Rewrites the executable graph `exec` (a cudaGraphExec_t of `graph`) to read input i at
  // bases[i] with the static buffers' strides. False, with nothing changed, where a base is not
  // aligned like its static buffer (the caller then copies into the static buffers, after
  // pointing the graph back at them).
  bool point_at(int64_t exec, const std::vector<int64_t>& bases);

 private:
  struct Patch;
  struct Node;
  std::vector<int64_t> starts_, ends_, current_;
  std::vector<Node> nodes_;
  std::string unsupported_;
};

}  // namespace fcl
