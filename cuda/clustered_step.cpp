// The clustered variant's eager step from C++, where the graph cache holds its graphs.
//
// fairseq_clustered/ops/eager.py's ClusteredAttention runs a step as two graph replays: the
// forward's composition (clustering, centroid attention, broadcast, and a packed buffer of what
// the backward needs) and the backward's. Around them sit a Python autograd Function, its Python
// backward node, and the cache's Python hit path, which on the GPU server's CPU cost more than
// the GPU's work up to 4k positions. Here the same step is a C++ autograd Function: its forward
// replays the forward's graph from the GraphTable (graph_table.cpp) and saves what
// ClusteredAttention saves; its backward node replays the backward's graph. A forward the table
// does not serve returns None, and Python runs the step as before; a backward it does not serve
// (the graph was evicted, the settings changed) calls the Python backward
// (CudaOps.clustered_bwd_packed), which runs the backward's composition through the cache.
//
// The tensors of each call are handed to the table in the order the Python compositions take
// them (fairseq_clustered/ops/cuda_kernels.py: clustered_fwd_packed's and clustered_bwd_packed's
// calls of the cache), so that the graph's inputs are pointed at the right ones; the GPU tests
// compare these steps with the eager compositions.
#include "clustered_step.h"

#include <torch/csrc/autograd/functions/basic_ops.h>

#include <utility>

namespace fcl {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum Composition : int64_t { kClusteredForward = 1, kClusteredBackward = 2 };

// What the backward needs besides the saved key, value and packed buffer.
struct ClusteredBackwardState : torch::CustomClassHolder {
  std::shared_ptr<GraphTable> table;
  TensorSpec dq;                        // the query gradient's layout (the queries' order of dims)
  at::Tensor key_padding_mask, keep;    // undefined for None
  int64_t num_clusters = 0;
  double scale = 0.0, dropout_p = 0.0;
};

c10::optional<at::Tensor> optional(const at::Tensor& tensor) {
  return tensor.defined() ? c10::optional<at::Tensor>(tensor) : c10::nullopt;
}

pybind11::object python(const at::Tensor& tensor) {
  return tensor.defined() ? pybind11::cast(tensor) : pybind11::none();
}

// dq, dk, dv of the backward's graph, or of the Python backward where the table does not serve it.
std::vector<at::Tensor> clustered_backward(const ClusteredBackwardState& state, const at::Tensor& grad_out,
                                           const at::Tensor& key, const at::Tensor& value,
                                           const at::Tensor& packed) {
  at::Tensor dq = state.dq.empty(key.device());
  const std::string call = clustered_backward_key(grad_out, dq, key, value, packed, optional(state.key_padding_mask),
                                                  optional(state.keep), state.num_clusters, state.scale,
                                                  state.dropout_p);
  std::vector<at::Tensor> tensors{grad_out, dq, key, value, packed};
  if (state.key_padding_mask.defined()) tensors.push_back(state.key_padding_mask);
  if (state.keep.defined()) tensors.push_back(state.keep);
  auto served = state.table->serve(call, std::move(tensors), key.device());
  if (served) {
    TORCH_CHECK(served->outputs.size() == 3, "fairseq_clustered: the clustered backward's graph has ",
                served->outputs.size(), " outputs (a bug: please report it)");
    return std::move(served->outputs);
  }
  pybind11::gil_scoped_acquire gil;
  const pybind11::object weak = state.table->clustered_backward_fallback();
  const pybind11::object backward = weak.is_none() ? weak : weak();
  TORCH_CHECK(!backward.is_none(), "fairseq_clustered: the clustered attention's backward cannot run: the CUDA ops "
              "whose graphs ran its forward are gone");
  const auto gradients =
      backward(grad_out, dq, key, value, packed, python(state.key_padding_mask), python(state.keep),
               state.num_clusters, state.scale, state.dropout_p)
          .cast<std::vector<at::Tensor>>();
  TORCH_CHECK(gradients.size() == 3, "fairseq_clustered: the clustered backward returned ", gradients.size(),
              " gradients (a bug: please report it)");
  return gradients;
}

struct ClusteredStep : torch::autograd::Function<ClusteredStep> {
  // query, key, value: the differentiable inputs; `served`: the forward graph's (out, packed).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, GraphTable::Served served,
                               c10::intrusive_ptr<ClusteredBackwardState> state) {
    (void)query;
    ctx->save_for_backward({key, value, served.outputs[1]});
    ctx->saved_data["state"] = c10::IValue::make_capsule(std::move(state));
    return {served.outputs[0]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto state = c10::static_intrusive_pointer_cast<ClusteredBackwardState>(
        ctx->saved_data["state"].toCapsule());
    const variable_list saved = ctx->get_saved_variables();
    // grad_out as it comes (a model's is a view of an (N, B, H Dv) gradient): the kernels read it
    // through its strides
    variable_list gradients = clustered_backward(*state, grads[0], saved[0], saved[1], saved[2]);
    if (torch::autograd::GradMode::is_enabled() && grads[0].requires_grad()) {
      // as Python's once_differentiable: gradients that raise where they are differentiated again
      for (auto& gradient : gradients) gradient = gradient.detach().requires_grad_(true);
      gradients = torch::autograd::DelayedError(
                      "trying to differentiate twice a function that was marked with @once_differentiable", 3)
                      .apply(std::move(gradients));
    }
    return {gradients[0], gradients[1], gradients[2], at::Tensor(), at::Tensor()};
  }
};

}  // namespace

std::string clustered_forward_key(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                  const at::Tensor& planes, const at::Tensor& offsets,
                                  const c10::optional<at::Tensor>& query_padding_mask,
                                  const c10::optional<at::Tensor>& key_padding_mask,
                                  const c10::optional<at::Tensor>& keep, int64_t iterations, int64_t bits,
                                  int64_t num_clusters, double scale, double dropout_p) {
  return CallKey(kClusteredForward)
      .tensor(query).tensor(key).tensor(value).tensor(planes).tensor(offsets)
      .tensor(query_padding_mask).tensor(key_padding_mask).tensor(keep)
      .integer(iterations).integer(bits).integer(num_clusters).real(scale).real(dropout_p)
      .finish(query.device());
}

std::string clustered_backward_key(const at::Tensor& grad_out, const at::Tensor& dq, const at::Tensor& key,
                                   const at::Tensor& value, const at::Tensor& packed,
                                   const c10::optional<at::Tensor>& key_padding_mask,
                                   const c10::optional<at::Tensor>& keep, int64_t num_clusters, double scale,
                                   double dropout_p) {
  return CallKey(kClusteredBackward)
      .tensor(grad_out).tensor(dq).tensor(key).tensor(value).tensor(packed)
      .tensor(key_padding_mask).tensor(keep)
      .integer(num_clusters).real(scale).real(dropout_p)
      .finish(key.device());
}

pybind11::object clustered_step(const std::shared_ptr<GraphTable>& table, const at::Tensor& query,
                                const at::Tensor& key, const at::Tensor& value, const at::Tensor& planes,
                                const at::Tensor& offsets, const c10::optional<at::Tensor>& query_padding_mask,
                                const c10::optional<at::Tensor>& key_padding_mask,
                                const c10::optional<at::Tensor>& keep, int64_t iterations, int64_t bits,
                                int64_t num_clusters, double scale, double dropout_p) {
  if (!query.is_cuda()) return pybind11::none();
  const std::string call = clustered_forward_key(query, key, value, planes, offsets, query_padding_mask,
                                                 key_padding_mask, keep, iterations, bits, num_clusters, scale,
                                                 dropout_p);
  // out and packed (filled by the graph) first, then the call's tensors as the composition takes them
  std::vector<at::Tensor> tensors{at::Tensor(), at::Tensor(), query, key, value, planes, offsets};
  for (const auto* mask : {&query_padding_mask, &key_padding_mask, &keep}) {
    if (mask->has_value() && (*mask)->defined()) tensors.push_back(**mask);
  }
  auto served = table->serve(call, std::move(tensors), query.device());
  if (!served) return pybind11::none();
  TORCH_CHECK(served->outputs.size() == 2 && served->extras.size() == 1,
              "fairseq_clustered: the clustered forward's graph has ", served->outputs.size(), " outputs and ",
              served->extras.size(), " layouts (a bug: please report it)");
  auto state = c10::make_intrusive<ClusteredBackwardState>();
  state->table = table;
  state->dq = served->extras[0];
  state->key_padding_mask = key_padding_mask.value_or(at::Tensor());
  state->keep = keep.value_or(at::Tensor());
  state->num_clusters = num_clusters;
  state->scale = scale;
  state->dropout_p = dropout_p;
  return pybind11::cast(ClusteredStep::apply(query, key, value, std::move(*served), std::move(state))[0]);
}

}  // namespace fcl
