// The clustered variants' eager steps from C++, where the graph cache holds their graphs.
//
// fairseq_clustered/ops/eager.py's ClusteredAttention and ImprovedClusteredAttention run a step
// as two graph replays: the forward's composition (clustering, the attention, and a packed buffer
// of what the backward needs) and the backward's. Around them sit a Python autograd Function,
// its Python backward node, and the cache's Python hit path, which on the GPU server's CPU cost
// more than the GPU's work up to 4k positions. Here the same step is a C++ autograd Function: its
// forward replays the forward's graph from the GraphTable (graph_table.cpp) and saves what the
// Python Function saves; its backward node replays the backward's graph. A forward the table does
// not serve returns None, and Python runs the step as before; a backward it does not serve (the
// graph was evicted, the settings changed) calls the Python backward (CudaOps.clustered_bwd_packed
// or improved_bwd_packed), which runs the backward's composition through the cache.
//
// The tensors of each call are handed to the table in the order the Python compositions take
// them (fairseq_clustered/ops/cuda_kernels.py: the packed forwards' and backwards' calls of the
// cache), so that the graph's inputs are pointed at the right ones; the GPU tests compare these
// steps with the eager compositions.
#include "clustered_step.h"

#include <torch/csrc/autograd/functions/basic_ops.h>

#include <utility>

namespace fcl {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum Composition : int64_t {
  kClusteredForward = 1,
  kClusteredBackward = 2,
  kImprovedForward = 3,
  kImprovedBackward = 4,
  kClusteredInference = 5,
  kImprovedInference = 6,
};

// What a step's backward needs besides its saved tensors (clustered: key, value and the packed
// buffer; improved: the queries too).
struct StepState : torch::CustomClassHolder {
  bool improved = false;
  std::shared_ptr<GraphTable> table;
  TensorSpec dq;                      // clustered: the query gradient's layout (the queries' order of dims)
  at::Tensor key_padding_mask, keep;  // undefined for None
  int64_t num_clusters = 0, topk = 0;
  double scale = 0.0, dropout_p = 0.0;
};

c10::optional<at::Tensor> optional(const at::Tensor& tensor) {
  return tensor.defined() ? c10::optional<at::Tensor>(tensor) : c10::nullopt;
}

pybind11::object python(const at::Tensor& tensor) {
  return tensor.defined() ? pybind11::cast(tensor) : pybind11::none();
}

// dq, dk, dv of the backward's graph, or of the Python backward where the table does not serve it.
// `saved`: the step's saved tensors.
std::vector<at::Tensor> step_backward(const StepState& state, const at::Tensor& grad, const variable_list& saved) {
  const at::Tensor& key = saved[saved.size() - 3];
  const at::Tensor& value = saved[saved.size() - 2];
  const at::Tensor& packed = saved.back();
  const auto key_padding_mask = optional(state.key_padding_mask), keep = optional(state.keep);
  // the clustered backward reads grad_out through its strides (a model's is a view of an (N, B, H Dv)
  // gradient) and fills a dq laid out as the queries; the improved one takes it contiguous
  at::Tensor grad_out, first;
  std::string call;
  if (state.improved) {
    grad_out = grad.contiguous();
    first = saved[0];  // the queries
    call = improved_backward_key(grad_out, first, key, value, packed, key_padding_mask, keep, state.num_clusters,
                                 state.scale, state.dropout_p);
  } else {
    grad_out = grad;
    first = state.dq.empty(key.device());
    call = clustered_backward_key(grad_out, first, key, value, packed, key_padding_mask, keep, state.num_clusters,
                                  state.scale, state.dropout_p);
  }
  std::vector<at::Tensor> tensors{grad_out, first, key, value, packed};
  if (key_padding_mask) tensors.push_back(*key_padding_mask);
  if (keep) tensors.push_back(*keep);
  auto served = state.table->serve(call, std::move(tensors), key.device());
  if (served) {
    TORCH_CHECK(served->outputs.size() == 3, "fairseq_clustered: a clustered backward's graph has ",
                served->outputs.size(), " outputs (a bug: please report it)");
    return std::move(served->outputs);
  }
  const char* variant = state.improved ? "improved" : "clustered";
  pybind11::gil_scoped_acquire gil;
  const pybind11::object weak = state.table->backward_fallback(variant);
  const pybind11::object backward = weak.is_none() ? weak : weak();
  TORCH_CHECK(!backward.is_none(), "fairseq_clustered: the ", variant, " attention's backward cannot run: the CUDA "
              "ops whose graphs ran its forward are gone");
  const pybind11::object gradients =
      state.improved ? backward(grad_out, first, key, value, packed, python(state.key_padding_mask),
                                python(state.keep), state.num_clusters, state.topk, state.scale, state.dropout_p)
                     : backward(grad_out, first, key, value, packed, python(state.key_padding_mask),
                                python(state.keep), state.num_clusters, state.scale, state.dropout_p);
  auto result = gradients.cast<std::vector<at::Tensor>>();
  TORCH_CHECK(result.size() == 3, "fairseq_clustered: the ", variant, " backward returned ", result.size(),
              " gradients (a bug: please report it)");
  return result;
}

struct ClusteredStep : torch::autograd::Function<ClusteredStep> {
  // query, key, value: the differentiable inputs; `served`: the forward graph's (out, packed).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& query, const at::Tensor& key,
                               const at::Tensor& value, GraphTable::Served served,
                               c10::intrusive_ptr<StepState> state) {
    if (state->improved) {
      ctx->save_for_backward({query, key, value, served.outputs[1]});
    } else {
      ctx->save_for_backward({key, value, served.outputs[1]});
    }
    ctx->saved_data["state"] = c10::IValue::make_capsule(std::move(state));
    return {served.outputs[0]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto state = c10::static_intrusive_pointer_cast<StepState>(ctx->saved_data["state"].toCapsule());
    variable_list gradients = step_backward(*state, grads[0], ctx->get_saved_variables());
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

// The step's output from the forward's graph under `call`, with a ClusteredStep node; None where the
// table does not serve it. `tensors`: the forward composition's tensors after its output and buffer.
pybind11::object step(const std::shared_ptr<GraphTable>& table, const std::string& call,
                      std::vector<at::Tensor> tensors, c10::intrusive_ptr<StepState> state, const at::Tensor& query,
                      const at::Tensor& key, const at::Tensor& value) {
  // out and packed (filled by the graph) first, then the call's tensors as the composition takes them
  tensors.insert(tensors.begin(), 2, at::Tensor());
  auto served = table->serve(call, std::move(tensors), query.device());
  if (!served) return pybind11::none();
  const size_t layouts = state->improved ? 0 : 1;
  TORCH_CHECK(served->outputs.size() == 2 && served->extras.size() == layouts, "fairseq_clustered: a clustered "
              "forward's graph has ", served->outputs.size(), " outputs and ", served->extras.size(),
              " layouts (a bug: please report it)");
  if (!state->improved) state->dq = served->extras[0];
  state->table = table;
  return pybind11::cast(ClusteredStep::apply(query, key, value, std::move(*served), std::move(state))[0]);
}

// Whether autograd records this call: grad mode on and an input that requires a gradient.
bool records_gradient(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) {
  return torch::autograd::GradMode::is_enabled() &&
         (query.requires_grad() || key.requires_grad() || value.requires_grad());
}

// The output of an inference composition's graph under `call` (a forward that keeps nothing for a
// backward: CudaOps.clustered_fwd_inference / improved_fwd_inference), without an autograd node;
// None where the table does not serve it. `tensors`: the composition's tensors after its output.
pybind11::object inference(const std::shared_ptr<GraphTable>& table, std::vector<at::Tensor> tensors,
                           const std::string& call, const at::Device& device) {
  tensors.insert(tensors.begin(), at::Tensor());  // out, filled by the graph
  auto served = table->serve(call, std::move(tensors), device);
  if (!served) return pybind11::none();
  TORCH_CHECK(served->outputs.size() == 1 && served->extras.empty(), "fairseq_clustered: an inference "
              "graph has ", served->outputs.size(), " outputs and ", served->extras.size(),
              " layouts (a bug: please report it)");
  return pybind11::cast(served->outputs[0]);
}

// The forward composition's tensors after its output and buffer, in its order.
std::vector<at::Tensor> forward_tensors(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                        const at::Tensor& planes, const at::Tensor& offsets,
                                        const c10::optional<at::Tensor>& query_padding_mask,
                                        const c10::optional<at::Tensor>& key_padding_mask,
                                        const c10::optional<at::Tensor>& keep) {
  std::vector<at::Tensor> tensors{query, key, value, planes, offsets};
  for (const auto* mask : {&query_padding_mask, &key_padding_mask, &keep}) {
    if (mask->has_value() && (*mask)->defined()) tensors.push_back(**mask);
  }
  return tensors;
}

c10::intrusive_ptr<StepState> step_state(bool improved, const c10::optional<at::Tensor>& key_padding_mask,
                                         const c10::optional<at::Tensor>& keep, int64_t num_clusters, int64_t topk,
                                         double scale, double dropout_p) {
  auto state = c10::make_intrusive<StepState>();
  state->improved = improved;
  state->key_padding_mask = key_padding_mask.value_or(at::Tensor());
  state->keep = keep.value_or(at::Tensor());
  state->num_clusters = num_clusters;
  state->topk = topk;
  state->scale = scale;
  state->dropout_p = dropout_p;
  return state;
}

CallKey& forward_inputs(CallKey& key, const at::Tensor& query, const at::Tensor& keys, const at::Tensor& value,
                        const at::Tensor& planes, const at::Tensor& offsets,
                        const c10::optional<at::Tensor>& query_padding_mask,
                        const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& keep,
                        int64_t iterations, int64_t bits, int64_t num_clusters) {
  return key.tensor(query).tensor(keys).tensor(value).tensor(planes).tensor(offsets)
      .tensor(query_padding_mask).tensor(key_padding_mask).tensor(keep)
      .integer(iterations).integer(bits).integer(num_clusters);
}

CallKey& backward_inputs(CallKey& key, const at::Tensor& grad_out, const at::Tensor& first, const at::Tensor& keys,
                         const at::Tensor& value, const at::Tensor& packed,
                         const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& keep,
                         int64_t num_clusters, double scale, double dropout_p) {
  return key.tensor(grad_out).tensor(first).tensor(keys).tensor(value).tensor(packed)
      .tensor(key_padding_mask).tensor(keep)
      .integer(num_clusters).real(scale).real(dropout_p);
}

}  // namespace

std::string clustered_forward_key(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                  const at::Tensor& planes, const at::Tensor& offsets,
                                  const c10::optional<at::Tensor>& query_padding_mask,
                                  const c10::optional<at::Tensor>& key_padding_mask,
                                  const c10::optional<at::Tensor>& keep, int64_t iterations, int64_t bits,
                                  int64_t num_clusters, double scale, double dropout_p, bool keeps_nothing) {
  CallKey call(keeps_nothing ? kClusteredInference : kClusteredForward);
  return forward_inputs(call, query, key, value, planes, offsets, query_padding_mask, key_padding_mask, keep,
                        iterations, bits, num_clusters)
      .real(scale).real(dropout_p).finish(query.device());
}

std::string improved_forward_key(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                 const at::Tensor& planes, const at::Tensor& offsets,
                                 const c10::optional<at::Tensor>& query_padding_mask,
                                 const c10::optional<at::Tensor>& key_padding_mask,
                                 const c10::optional<at::Tensor>& keep, int64_t iterations, int64_t bits,
                                 int64_t num_clusters, int64_t topk, double scale, double dropout_p,
                                 bool keeps_nothing) {
  CallKey call(keeps_nothing ? kImprovedInference : kImprovedForward);
  return forward_inputs(call, query, key, value, planes, offsets, query_padding_mask, key_padding_mask, keep,
                        iterations, bits, num_clusters)
      .integer(topk).real(scale).real(dropout_p).finish(query.device());
}

std::string clustered_backward_key(const at::Tensor& grad_out, const at::Tensor& dq, const at::Tensor& key,
                                   const at::Tensor& value, const at::Tensor& packed,
                                   const c10::optional<at::Tensor>& key_padding_mask,
                                   const c10::optional<at::Tensor>& keep, int64_t num_clusters, double scale,
                                   double dropout_p) {
  CallKey call(kClusteredBackward);
  return backward_inputs(call, grad_out, dq, key, value, packed, key_padding_mask, keep, num_clusters, scale,
                         dropout_p)
      .finish(key.device());
}

std::string improved_backward_key(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                  const at::Tensor& value, const at::Tensor& packed,
                                  const c10::optional<at::Tensor>& key_padding_mask,
                                  const c10::optional<at::Tensor>& keep, int64_t num_clusters, double scale,
                                  double dropout_p) {
  CallKey call(kImprovedBackward);
  return backward_inputs(call, grad_out, query, key, value, packed, key_padding_mask, keep, num_clusters, scale,
                         dropout_p)
      .finish(key.device());
}

pybind11::object clustered_step(const std::shared_ptr<GraphTable>& table, const at::Tensor& query,
                                const at::Tensor& key, const at::Tensor& value, const at::Tensor& planes,
                                const at::Tensor& offsets, const c10::optional<at::Tensor>& query_padding_mask,
                                const c10::optional<at::Tensor>& key_padding_mask,
                                const c10::optional<at::Tensor>& keep, int64_t iterations, int64_t bits,
                                int64_t num_clusters, double scale, double dropout_p) {
  if (!query.is_cuda()) return pybind11::none();
  std::vector<at::Tensor> tensors =
      forward_tensors(query, key, value, planes, offsets, query_padding_mask, key_padding_mask, keep);
  const bool keeps_nothing = !records_gradient(query, key, value);
  const std::string call = clustered_forward_key(query, key, value, planes, offsets, query_padding_mask,
                                                 key_padding_mask, keep, iterations, bits, num_clusters, scale,
                                                 dropout_p, keeps_nothing);
  if (keeps_nothing) return inference(table, std::move(tensors), call, query.device());
  return step(table, call, std::move(tensors),
              step_state(false, key_padding_mask, keep, num_clusters, 0, scale, dropout_p), query, key, value);
}

pybind11::object improved_step(const std::shared_ptr<GraphTable>& table, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& value, const at::Tensor& planes,
                               const at::Tensor& offsets, const c10::optional<at::Tensor>& query_padding_mask,
                               const c10::optional<at::Tensor>& key_padding_mask,
                               const c10::optional<at::Tensor>& keep, int64_t iterations, int64_t bits,
                               int64_t num_clusters, int64_t topk, double scale, double dropout_p) {
  if (!query.is_cuda()) return pybind11::none();
  std::vector<at::Tensor> tensors =
      forward_tensors(query, key, value, planes, offsets, query_padding_mask, key_padding_mask, keep);
  const bool keeps_nothing = !records_gradient(query, key, value);
  const std::string call = improved_forward_key(query, key, value, planes, offsets, query_padding_mask,
                                                key_padding_mask, keep, iterations, bits, num_clusters, topk, scale,
                                                dropout_p, keeps_nothing);
  if (keeps_nothing) return inference(table, std::move(tensors), call, query.device());
  return step(table, call, std::move(tensors),
              step_state(true, key_padding_mask, keep, num_clusters, topk, scale, dropout_p), query, key, value);
}

}  // namespace fcl
