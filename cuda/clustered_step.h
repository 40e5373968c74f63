// The clustered variants' eager steps from C++ (see clustered_step.cpp).
#pragma once

#include <torch/extension.h>

#include "graph_table.h"

#include <memory>
#include <string>

namespace fcl {

// The keys under which the graph cache registers the forwards' and backwards' graphs of both
// variants (fairseq_clustered/ops/cuda_kernels.py), from the arguments of their compositions. A
// forward's key names, with `keeps_nothing`, the composition that keeps nothing for a backward (the
// one a call that autograd does not record takes) instead of the one that packs what it needs.
std::string clustered_forward_key(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                  const at::Tensor& planes, const at::Tensor& offsets,
                                  const c10::optional<at::Tensor>& query_padding_mask,
                                  const c10::optional<at::Tensor>& key_padding_mask,
                                  const c10::optional<at::Tensor>& keep, int64_t iterations, int64_t bits,
                                  int64_t num_clusters, double scale, double dropout_p, bool keeps_nothing);
std::string clustered_backward_key(const at::Tensor& grad_out, const at::Tensor& dq, const at::Tensor& key,
                                   const at::Tensor& value, const at::Tensor& packed,
                                   const c10::optional<at::Tensor>& key_padding_mask,
                                   const c10::optional<at::Tensor>& keep, int64_t num_clusters, double scale,
                                   double dropout_p);

std::string improved_forward_key(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                 const at::Tensor& planes, const at::Tensor& offsets,
                                 const c10::optional<at::Tensor>& query_padding_mask,
                                 const c10::optional<at::Tensor>& key_padding_mask,
                                 const c10::optional<at::Tensor>& keep, int64_t iterations, int64_t bits,
                                 int64_t num_clusters, int64_t topk, double scale, double dropout_p,
                                 bool keeps_nothing);
std::string improved_backward_key(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                  const at::Tensor& value, const at::Tensor& packed,
                                  const c10::optional<at::Tensor>& key_padding_mask,
                                  const c10::optional<at::Tensor>& keep, int64_t num_clusters, double scale,
                                  double dropout_p);

// The attention output of a clustered (improved) step replayed from `table`, with a C++ backward
// node; None where the table does not serve the call (Python then runs it). A call that autograd
// does not record replays the inference graph instead, without a node.
pybind11::object clustered_step(const std::shared_ptr<GraphTable>& table, const at::Tensor& query,
                                const at::Tensor& key, const at::Tensor& value, const at::Tensor& planes,
                                const at::Tensor& offsets, const c10::optional<at::Tensor>& query_padding_mask,
                                const c10::optional<at::Tensor>& key_padding_mask,
                                const c10::optional<at::Tensor>& keep, int64_t iterations, int64_t bits,
                                int64_t num_clusters, double scale, double dropout_p);

pybind11::object improved_step(const std::shared_ptr<GraphTable>& table, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& value, const at::Tensor& planes,
                               const at::Tensor& offsets, const c10::optional<at::Tensor>& query_padding_mask,
                               const c10::optional<at::Tensor>& key_padding_mask,
                               const c10::optional<at::Tensor>& keep, int64_t iterations, int64_t bits,
                               int64_t num_clusters, int64_t topk, double scale, double dropout_p);

}  // namespace fcl
