// Python bindings of the fairseq-clustered CUDA kernels. The Python side
// (fairseq_clustered/ops/cuda_kernels.py) composes them with torch ops and registers
// the result as the CUDA implementation of the fairseq_clustered::* custom ops.
#include <torch/extension.h>

#include "clustered_step.h"
#include "graph_inputs.h"
#include "graph_signature.h"
#include "graph_table.h"

#include <tuple>
#include <vector>

namespace fcl {
at::Tensor hash_codes_cuda(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& offsets);
std::tuple<at::Tensor, at::Tensor> lloyd_kmeans_cuda(const at::Tensor& codes, const c10::optional<at::Tensor>& mask,
                                                     int64_t num_clusters, int64_t iterations, int64_t bits,
                                                     int64_t queries_per_block, bool tensor_cores,
                                                     int64_t cluster_blocks);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lloyd_kmeans_sorted_cuda(
    const at::Tensor& codes, const c10::optional<at::Tensor>& mask, int64_t num_clusters, int64_t iterations,
    int64_t bits, int64_t cluster_blocks);
int64_t lloyd_cluster_capacity(int64_t length, int64_t num_clusters, int64_t cluster_blocks);
at::Tensor codebook_assign_cuda(const at::Tensor& codes, const at::Tensor& codebook);
at::Tensor chunk_cluster_sums_cuda(const at::Tensor& x, const at::Tensor& clusters, int64_t window,
                                   int64_t num_clusters);
void older_past_means_cuda(const at::Tensor& sums, const at::Tensor& counts, int64_t first, const at::Tensor& out);
void older_past_means_backward_cuda(const at::Tensor& grad, const at::Tensor& counts, int64_t first,
                                    const at::Tensor& grad_sums);
void chunk_cluster_gather_add_cuda(const at::Tensor& grad_sums, const at::Tensor& clusters, int64_t window,
                                   const at::Tensor& grad_x);
std::tuple<at::Tensor, at::Tensor> merge_parts_cuda(const std::vector<at::Tensor>& outs,
                                                    const std::vector<at::Tensor>& lses, int64_t length,
                                                    int64_t dim);
std::tuple<at::Tensor, at::Tensor> cluster_order_cuda(const at::Tensor& assignments, int64_t num_clusters);
at::Tensor segment_sum_cuda(const at::Tensor& x, const at::Tensor& order, const at::Tensor& seg_start, bool mean,
                            int64_t per_warp, const c10::optional<at::Tensor>& zero);
at::Tensor broadcast_cuda(const at::Tensor& src, const at::Tensor& assignments, at::ScalarType dtype);
void broadcast_into_cuda(const at::Tensor& src, const at::Tensor& assignments, const at::Tensor& out,
                         bool assignments_ready);
at::Tensor improved_exact_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const c10::optional<at::Tensor>& grad_out, const at::Tensor& assignments,
                                   const at::Tensor& order, const at::Tensor& top_index,
                                   const c10::optional<at::Tensor>& key_mask, const c10::optional<at::Tensor>& drop_top,
                                   const at::Tensor& mass, const at::Tensor& rest, double scale);
at::Tensor improved_exact_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& assignments, const at::Tensor& order,
                                   const at::Tensor& top_index, const c10::optional<at::Tensor>& key_mask,
                                   const c10::optional<at::Tensor>& drop_top, const at::Tensor& mass,
                                   const at::Tensor& dq_bar, double scale, at::Tensor dk32, at::Tensor dv32);
void copy_tensors_cuda(const std::vector<at::Tensor>& dsts, const std::vector<at::Tensor>& srcs);
std::vector<at::Tensor> fresh_copies_cuda(const std::vector<at::Tensor>& srcs);
}  // namespace fcl

namespace {

// One of clustered_step.h's key functions as a Python function returning bytes: pybind11 would
// turn its std::string into text (decoding it as UTF-8), and the keys are raw bytes.
template <typename... Args>
auto bytes_of(std::string (*key)(Args...)) {
  return [key](Args... args) { return pybind11::bytes(key(args...)); };
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fairseq-clustered CUDA kernels (see fairseq_clustered/ops/cuda_kernels.py)";
  m.def("hash_codes", &fcl::hash_codes_cuda, "packed hyperplane hash codes (B, H, N) int64");
  m.def("lloyd_kmeans", &fcl::lloyd_kmeans_cuda, "Lloyd k-means in Hamming space -> (assignments, centroids)",
        pybind11::arg("codes"), pybind11::arg("mask"), pybind11::arg("num_clusters"), pybind11::arg("iterations"),
        pybind11::arg("bits"), pybind11::arg("queries_per_block") = 0, pybind11::arg("tensor_cores") = true,
        pybind11::arg("cluster_blocks") = 0);
  m.def("lloyd_kmeans_sorted", &fcl::lloyd_kmeans_sorted_cuda,
        "lloyd_kmeans by the one-launch kernel (cluster_blocks 1..8), and the stable sort of its assignments by "
        "cluster from the same launch -> (assignments, centroids, order, seg_start) (order, seg_start as cluster_order's)",
        pybind11::arg("codes"), pybind11::arg("mask"), pybind11::arg("num_clusters"), pybind11::arg("iterations"),
        pybind11::arg("bits"), pybind11::arg("cluster_blocks"));
  m.def("lloyd_cluster_capacity", &fcl::lloyd_cluster_capacity,
        "clusters of Lloyd's one-launch kernel resident at once on the current GPU (0: it does not run there)",
        pybind11::arg("length"), pybind11::arg("num_clusters"), pybind11::arg("cluster_blocks"));
  m.def("codebook_assign", &fcl::codebook_assign_cuda, "nearest codebook entry of every code (B, H, N) int64");
  m.def("chunk_cluster_sums", &fcl::chunk_cluster_sums_cuda,
        "per chunk and cluster fp32 sums of rows, deterministic (B, H, T, C, E)");
  m.def("older_past_means", &fcl::older_past_means_cuda,
        "summary means of chunks 0..t-2 written into a (B*H, T - first, C, >= E) block, in place");
  m.def("older_past_means_backward", &fcl::older_past_means_backward_cuda,
        "adjoint of older_past_means into grad_sums (B, H, T, C, E): fp32 or grad's dtype");
  m.def("chunk_cluster_gather_add", &fcl::chunk_cluster_gather_add_cuda,
        "grad_x (B, H, N, E) += per-(chunk, cluster) gradients of each key's cluster, in place");
  m.def("merge_parts", &fcl::merge_parts_cuda,
        "merge up to 3 attention parts by log-sum-exp -> (out (G, N, D), lse (G, T, W))");
  m.def("cluster_order", &fcl::cluster_order_cuda,
        "the queries' stable sort by cluster -> (order (B*H, N), seg_start (B*H, C+1)) int64");
  m.def("segment_sum", &fcl::segment_sum_cuda,
        "per-cluster sum / mean of rows, fp32 (B*H, C, E); per_warp: 1 a warp per cluster, 0 a block, -1 by the "
        "shape; zero: an int32 tensor the same launch fills with zeros (saves a caller's fill), or None",
        pybind11::arg("x"), pybind11::arg("order"), pybind11::arg("seg_start"), pybind11::arg("mean"),
        pybind11::arg("per_warp") = -1, pybind11::arg("zero") = pybind11::none());
  m.def("broadcast", &fcl::broadcast_cuda, "per-cluster rows to their members (B, H, N, E)");
  m.def("broadcast_into", &fcl::broadcast_into_cuda,
        "per-cluster rows to their members, written into out (B, H, N, E) of any strides (last dim contiguous); "
        "assignments_ready: the assignments were written before the kernel launched just before this one began "
        "(then read while it runs)",
        pybind11::arg("src"), pybind11::arg("assignments"), pybind11::arg("out"),
        pybind11::arg("assignments_ready") = false);
  m.def("improved_exact_fwd", &fcl::improved_exact_fwd_cuda, "exact top-key part of improved clustered attention");
  m.def("improved_exact_bwd", &fcl::improved_exact_bwd_cuda, "backward of the exact top-key part");
  m.def("copy_tensors", &fcl::copy_tensors_cuda,
        "dsts[i].copy_(srcs[i]) for every i, the dense same-layout pairs of any dtypes in one launch");
  m.def("fresh_copies", &fcl::fresh_copies_cuda, "empty_like copies of the tensors, filled in one launch");
  m.def("graph_signature", &fcl::graph_signature, pybind11::arg("name"), pybind11::arg("args"),
        pybind11::arg("filled"), "(key, tensors, bytes read) of a call: graph_cache._signature in C++");
  pybind11::class_<fcl::GraphInputs, std::shared_ptr<fcl::GraphInputs>>(m, "GraphInputs",
                                     "the kernel parameters of a captured graph that hold its static inputs' addresses")
      .def(pybind11::init<int64_t, std::vector<int64_t>, std::vector<int64_t>>(), pybind11::arg("graph"),
           pybind11::arg("starts"), pybind11::arg("ends"))
      .def_property_readonly("unsupported", &fcl::GraphInputs::unsupported,
                             "why the inputs cannot be pointed elsewhere ('' if they can)")
      .def_property_readonly("kernel_nodes", &fcl::GraphInputs::kernel_nodes, "kernel nodes rewritten")
      .def("point_at", &fcl::GraphInputs::point_at, pybind11::arg("exec"), pybind11::arg("bases"),
           "read input i at bases[i] from the next replay of exec on (False: a base is misaligned, nothing changed)");
  pybind11::class_<fcl::GraphTable, std::shared_ptr<fcl::GraphTable>>(
      m, "GraphTable", "a graph cache's graphs that read their inputs in place, replayed from C++")
      .def(pybind11::init<std::vector<std::string>>(), pybind11::arg("environment"))
      .def(
          "add",
          [](fcl::GraphTable& table, const pybind11::bytes& key, int64_t exec,
             std::shared_ptr<fcl::GraphInputs> inputs, const std::vector<at::Tensor>& tensors,
             const std::vector<int64_t>& filled, std::vector<int64_t> outputs, std::vector<at::Tensor> copied,
             const std::vector<at::Tensor>& extras) {
            fcl::GraphTable::Graph graph;
            graph.exec = exec;
            graph.inputs = std::move(inputs);
            graph.tensor_count = tensors.size();
            for (const int64_t position : filled) {
              TORCH_CHECK(position >= 0 && position < static_cast<int64_t>(tensors.size()),
                          "GraphTable.add: filled position ", position);
              graph.filled.emplace_back(position, fcl::TensorSpec::of(tensors[position]));
            }
            graph.outputs = std::move(outputs);
            graph.copied = std::move(copied);
            for (const auto& extra : extras) graph.extras.push_back(fcl::TensorSpec::of(extra));
            table.add(key, std::move(graph));
          },
          pybind11::arg("key"), pybind11::arg("exec"), pybind11::arg("inputs"), pybind11::arg("tensors"),
          pybind11::arg("filled"), pybind11::arg("outputs"), pybind11::arg("copied"), pybind11::arg("extras"),
          "register a graph: the call's tensors (filled ones included), the filled positions among them, per "
          "output its filled position or -1 (then the next of copied: graph-owned), layouts to remember")
      .def("remove", [](fcl::GraphTable& table, const pybind11::bytes& key) { table.remove(key); })
      .def("clear", &fcl::GraphTable::clear)
      .def("__len__", &fcl::GraphTable::size)
      .def_property_readonly("replays", &fcl::GraphTable::replays, "graphs replayed from C++")
      .def(
          "used_since_asked",
          [](fcl::GraphTable& table) {
            pybind11::list keys;
            for (const auto& key : table.used_since_asked()) keys.append(pybind11::bytes(key));
            return keys;
          },
          "keys replayed (or added) since the last call, least recently used first")
      .def("set_backward_fallback", &fcl::GraphTable::set_backward_fallback, pybind11::arg("variant"),
           pybind11::arg("fallback"),
           "for variant 'clustered' or 'improved': a callable returning the Python backward for a miss, or None");
  m.def("clustered_forward_key", bytes_of(&fcl::clustered_forward_key),
        "the GraphTable key of a clustered forward's composition (clustered_step's key; with keeps_nothing, of the "
        "composition that keeps nothing, the key of a call autograd does not record)");
  m.def("clustered_backward_key", bytes_of(&fcl::clustered_backward_key),
        "the GraphTable key of a clustered backward's composition (clustered_step's backward's key)");
  m.def("improved_forward_key", bytes_of(&fcl::improved_forward_key),
        "the GraphTable key of an improved forward's composition (improved_step's key; with keeps_nothing, as "
        "clustered_forward_key's)");
  m.def("improved_backward_key", bytes_of(&fcl::improved_backward_key),
        "the GraphTable key of an improved backward's composition (improved_step's backward's key)");
  m.def("improved_step", &fcl::improved_step, pybind11::arg("table"), pybind11::arg("query"), pybind11::arg("key"),
        pybind11::arg("value"), pybind11::arg("planes"), pybind11::arg("offsets"),
        pybind11::arg("query_padding_mask"), pybind11::arg("key_padding_mask"), pybind11::arg("keep"),
        pybind11::arg("iterations"), pybind11::arg("bits"), pybind11::arg("num_clusters"), pybind11::arg("topk"),
        pybind11::arg("scale"), pybind11::arg("dropout_p"),
        "an improved step's output replayed from the table, with a C++ backward node (without one, from the "
        "inference graph, where autograd does not record the call); None where not served");
  m.def("clustered_step", &fcl::clustered_step, pybind11::arg("table"), pybind11::arg("query"),
        pybind11::arg("key"), pybind11::arg("value"), pybind11::arg("planes"), pybind11::arg("offsets"),
        pybind11::arg("query_padding_mask"), pybind11::arg("key_padding_mask"), pybind11::arg("keep"),
        pybind11::arg("iterations"), pybind11::arg("bits"), pybind11::arg("num_clusters"), pybind11::arg("scale"),
        pybind11::arg("dropout_p"),
        "a clustered step's output replayed from the table, with a C++ backward node (without one, from the "
        "inference graph, where autograd does not record the call); None where not served");
}
