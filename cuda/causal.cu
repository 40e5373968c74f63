// Per-chunk key-cluster sums of the causal variant (fairseq_clustered/ops/causal_cuda.py).
//
// The summaries the causal attention reads are prefix sums over chunks of these per-chunk
// sums. They must be bit-for-bit reproducible: the leak test changes the future and
// compares every earlier output exactly, so a sum whose rounding depended on the order
// in which atomics land would fail it for no leak at all. Hence no atomics: one thread
// owns one (row, chunk, feature) and adds the chunk's members in position order.
#include "common.cuh"

#include <algorithm>
#include <tuple>
#include <vector>

namespace fcl {
namespace {

constexpr int SUM_THREADS = 128;
constexpr int PREFIX_BATCH = 8;  // chunks per batch of independent loads in the prefix walks

template <typename scalar_t>
__global__ void chunk_cluster_sums_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ clusters,
                                          int64_t rows, int length, int dim, int window, int num_chunks,
                                          int num_clusters, float* __restrict__ sums /* (rows, T, C, E) */) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * num_chunks * dim) return;
  // Consecutive threads take consecutive features: coalesced loads and stores, and the
  // cluster id of a position is one broadcast load per warp.
  const int e = static_cast<int>(idx % dim);
  const int64_t row_chunk = idx / dim;
  const int t = static_cast<int>(row_chunk % num_chunks);
  const int64_t row = row_chunk / num_chunks;
  const int start = t * window;
  const int stop = min(start + window, length);
  const int64_t* ids = clusters + row * length;
  const scalar_t* xs = x + row * length * dim + e;
  float* out = sums + row_chunk * num_clusters * dim + e;
  for (int n = start; n < stop; ++n) {
    const int64_t c = ids[n];
    if (c >= 0 && c < num_clusters) out[c * dim] += to_float(xs[static_cast<int64_t>(n) * dim]);
  }
}

// Summary means of the older past, written into the fused attention's key / value block:
// for chunk t >= first and cluster c, out[t - first][c][e] = (sum of the per-chunk sums of
// chunks 0 .. t - 2) / count (0 for an empty cluster), and 0 in the padding columns
// e >= dim (so the block needs no zero fill). One thread per (row, cluster, column) walks
// the chunks in order, so the prefix sums cost one read of the sums.
template <typename sum_t, typename out_t>
__global__ void older_past_means_kernel(const sum_t* __restrict__ sums /* (rows, T, C, E) */,
                                        const float* __restrict__ counts /* (rows, T, C), older past */,
                                        int64_t rows, int num_chunks, int num_clusters, int dim, int first,
                                        out_t* __restrict__ out /* (rows, T - first, C, out_stride) */,
                                        int out_stride) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * num_clusters * out_stride) return;
  const int e = static_cast<int>(idx % out_stride);
  const int c = static_cast<int>((idx / out_stride) % num_clusters);
  const int64_t row = idx / (static_cast<int64_t>(out_stride) * num_clusters);
  const int64_t chunk_stride = static_cast<int64_t>(num_clusters) * dim;
  out_t* o = out + (row * (num_chunks - first) * num_clusters + c) * out_stride + e;
  const int64_t out_chunk_stride = static_cast<int64_t>(num_clusters) * out_stride;
  if (e >= dim) {
    for (int t = first; t < num_chunks; ++t) o[(t - first) * out_chunk_stride] = from_float<out_t>(0.f);
    return;
  }
  const sum_t* s = sums + row * num_chunks * chunk_stride + static_cast<int64_t>(c) * dim + e;
  const float* n = counts + row * num_chunks * num_clusters + c;
  float running = 0.f;
  for (int t0 = 0; t0 < num_chunks; t0 += PREFIX_BATCH) {
    // All loads of a batch are issued before the first is used (the walk is otherwise one
    // dependent load after another); adding the 0s of absent chunks leaves the sum's bits.
    float part[PREFIX_BATCH], count[PREFIX_BATCH];
#pragma unroll
    for (int j = 0; j < PREFIX_BATCH; ++j) {
      const int t = t0 + j;
      part[j] = (t >= 2 && t < num_chunks) ? to_float(s[(t - 2) * chunk_stride]) : 0.f;
      count[j] = (t >= first && t < num_chunks) ? n[static_cast<int64_t>(t) * num_clusters] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < PREFIX_BATCH; ++j) {
      const int t = t0 + j;
      running += part[j];
      if (t >= first && t < num_chunks) {
        o[(t - first) * out_chunk_stride] = from_float<out_t>(count[j] > 0.f ? running / count[j] : 0.f);
      }
    }
  }
}

// Adjoint of older_past_means_kernel: grad_sums[t][c][e] = sum over chunks u >= max(t + 2,
// first) of grad[u - first][c][e] / count[u][c], walking the chunks backwards.
// (Strided grad: flash attention returns the key / value gradients in its own layout.)
template <typename grad_t, typename out_t>
__global__ void older_past_means_backward_kernel(const grad_t* __restrict__ grad /* (rows, T - first, C, >= E) */,
                                                 int64_t g_row, int64_t g_chunk, int64_t g_cluster,
                                                 const float* __restrict__ counts, int64_t rows, int num_chunks,
                                                 int num_clusters, int dim, int first,
                                                 out_t* __restrict__ grad_sums /* (rows, T, C, E) */) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * num_clusters * dim) return;
  const int e = static_cast<int>(idx % dim);
  const int c = static_cast<int>((idx / dim) % num_clusters);
  const int64_t row = idx / (static_cast<int64_t>(dim) * num_clusters);
  const int64_t chunk_stride = static_cast<int64_t>(num_clusters) * dim;
  const grad_t* g = grad + row * g_row + c * g_cluster + e;
  const float* n = counts + row * num_chunks * num_clusters + c;
  out_t* out = grad_sums + row * num_chunks * chunk_stride + static_cast<int64_t>(c) * dim + e;
  float running = 0.f;  // sum over chunks u >= t + 2
  for (int top = num_chunks - 1; top >= 0; top -= PREFIX_BATCH) {
    float part[PREFIX_BATCH];  // the term of chunk u = t + 1, which joins the sum for chunk t - 1
#pragma unroll
    for (int j = 0; j < PREFIX_BATCH; ++j) {
      const int u = top - j + 1;
      part[j] = 0.f;
      if (top - j >= 0 && u < num_chunks && u >= first) {
        const float count = n[static_cast<int64_t>(u) * num_clusters];
        const float value = to_float(g[(u - first) * g_chunk]);
        part[j] = count > 0.f ? value / count : 0.f;
      }
    }
#pragma unroll
    for (int j = 0; j < PREFIX_BATCH; ++j) {
      const int t = top - j;
      if (t < 0) break;
      out[t * chunk_stride] = from_float<out_t>(running);
      running += part[j];
    }
  }
}

// The summaries' key (value) gradients back to the member keys, in place:
// grad_x[row][n][e] += grad_sums[row][n / window][cluster of n][e] (keys of no cluster: nothing).
__global__ void chunk_cluster_gather_add_kernel(const float* __restrict__ grad_sums /* (rows, T, C, E) */,
                                                const int64_t* __restrict__ clusters /* (rows, N) */,
                                                int64_t rows, int length, int dim, int window, int num_chunks,
                                                int num_clusters, float* __restrict__ grad_x /* (rows, N, E) */) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * length * dim) return;
  const int e = static_cast<int>(idx % dim);
  const int64_t row_pos = idx / dim;
  const int n = static_cast<int>(row_pos % length);
  const int64_t row = row_pos / length;
  const int64_t c = clusters[row_pos];
  if (c < 0 || c >= num_clusters) return;
  grad_x[idx] += grad_sums[((row * num_chunks + n / window) * num_clusters + c) * dim + e];
}

// Merge of the three attention parts (own chunk, previous chunk, summaries) of every query
// row by their log-sum-exps: lse = log sum_p exp(lse_p), out = sum_p exp(lse_p - lse) out_p.
// Part p covers chunks >= p; its out is (G, T - p, W, >= D) with any strides but the last.
template <typename scalar_t>
struct MergePart {
  const scalar_t* out;
  int64_t s_group, s_chunk, s_row;
  const float* lse;  // (G, T - p, W) contiguous
};
FCL_NO_PADDING(MergePart<float>);

template <typename scalar_t>
__global__ void merge_parts_kernel(MergePart<scalar_t> p0, MergePart<scalar_t> p1, MergePart<scalar_t> p2,
                                   int num_parts, int64_t groups, int num_chunks, int window, int dim, int length,
                                   scalar_t* __restrict__ out /* (G, length, D) */,
                                   float* __restrict__ total /* (G, T, W) */) {
  const int warps = blockDim.x / 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= groups * num_chunks * window) return;
  const int w = static_cast<int>(row % window);
  const int t = static_cast<int>((row / window) % num_chunks);
  const int64_t g = row / (static_cast<int64_t>(window) * num_chunks);
  const MergePart<scalar_t> parts[3] = {p0, p1, p2};
  float lse[3];
  float top = -INFINITY;
#pragma unroll
  for (int p = 0; p < 3; ++p) {
    lse[p] = -INFINITY;
    if (p < num_parts && t >= p) lse[p] = parts[p].lse[(g * (num_chunks - p) + (t - p)) * window + w];
    top = fmaxf(top, lse[p]);
  }
  float sum = 0.f;
#pragma unroll
  for (int p = 0; p < 3; ++p) sum += (lse[p] == -INFINITY) ? 0.f : __expf(lse[p] - top);
  const float merged = top + __logf(sum);
  if (lane == 0) total[row] = merged;
  const int pos = t * window + w;
  if (pos >= length) return;  // padding rows beyond N
  float weight[3];
#pragma unroll
  for (int p = 0; p < 3; ++p) weight[p] = (lse[p] == -INFINITY) ? 0.f : __expf(lse[p] - merged);
  scalar_t* o = out + (g * length + pos) * static_cast<int64_t>(dim);
  for (int e = lane; e < dim; e += 32) {
    float acc = 0.f;
#pragma unroll
    for (int p = 0; p < 3; ++p) {
      if (weight[p] != 0.f) {
        const MergePart<scalar_t>& q = parts[p];
        acc += weight[p] * to_float(q.out[g * q.s_group + (t - p) * q.s_chunk + w * q.s_row + e]);
      }
    }
    o[e] = from_float<scalar_t>(acc);
  }
}

}  // namespace

void older_past_means_cuda(const at::Tensor& sums, const at::Tensor& counts, int64_t first, const at::Tensor& out) {
  FCL_CHECK_CUDA(sums, "older_past_means: sums");
  TORCH_CHECK(sums.dim() == 5 && sums.is_contiguous() &&
                  (sums.scalar_type() == at::kFloat || sums.scalar_type() == out.scalar_type()),
              "older_past_means: sums must be contiguous (B, H, T, C, E), float32 or out's dtype, got ", sums.sizes(),
              " ", sums.scalar_type());
  const int64_t B = sums.size(0), H = sums.size(1), T = sums.size(2), C = sums.size(3), E = sums.size(4);
  TORCH_CHECK(counts.sizes() == sums.sizes().slice(0, 4) && counts.scalar_type() == at::kFloat &&
                  counts.is_contiguous(),
              "older_past_means: counts must be contiguous (B, H, T, C) float32, got ", counts.sizes());
  TORCH_CHECK(first >= 0 && first <= T, "older_past_means: first chunk ", first, " outside 0..", T);
  TORCH_CHECK(out.dim() == 4 && out.size(0) == B * H && out.size(1) == T - first && out.size(2) == C &&
                  out.size(3) >= E && out.is_contiguous(),
              "older_past_means: out must be contiguous (B*H, T - first, C, >= E), got ", out.sizes());
  const c10::cuda::CUDAGuard guard(sums.device());
  const int64_t threads = B * H * C * out.size(3);
  if (threads == 0 || T == first) return;
  const unsigned blocks = static_cast<unsigned>((threads + SUM_THREADS - 1) / SUM_THREADS);
  auto stream = c10::cuda::getCurrentCUDAStream();
  FCL_DISPATCH_FLOAT(out.scalar_type(), "older_past_means", [&] {
    auto launch = [&](auto* sums_ptr) {
      older_past_means_kernel<<<blocks, SUM_THREADS, 0, stream>>>(
          sums_ptr, counts.data_ptr<float>(), B * H, static_cast<int>(T), static_cast<int>(C), static_cast<int>(E),
          static_cast<int>(first), out.data_ptr<scalar_t>(), static_cast<int>(out.size(3)));
    };
    if (sums.scalar_type() == at::kFloat) {
      launch(sums.data_ptr<float>());
    } else {
      launch(sums.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void older_past_means_backward_cuda(const at::Tensor& grad, const at::Tensor& counts, int64_t first,
                                    const at::Tensor& grad_sums) {
  FCL_CHECK_CUDA(grad, "older_past_means_backward: grad");
  TORCH_CHECK(counts.dim() == 4 && counts.scalar_type() == at::kFloat && counts.is_contiguous(),
              "older_past_means_backward: counts must be contiguous (B, H, T, C) float32, got ", counts.sizes());
  const int64_t B = counts.size(0), H = counts.size(1), T = counts.size(2), C = counts.size(3);
  TORCH_CHECK(grad_sums.dim() == 5 && grad_sums.size(0) == B && grad_sums.size(1) == H && grad_sums.size(2) == T &&
                  grad_sums.size(3) == C && grad_sums.is_contiguous() &&
                  (grad_sums.scalar_type() == at::kFloat || grad_sums.scalar_type() == grad.scalar_type()),
              "older_past_means_backward: grad_sums must be contiguous (B, H, T, C, E), float32 or grad's dtype, got ",
              grad_sums.sizes(), " ", grad_sums.scalar_type());
  const int64_t dim = grad_sums.size(4);
  TORCH_CHECK(first >= 0 && first <= T, "older_past_means_backward: first chunk ", first, " outside 0..", T);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == B * H && grad.size(1) == T - first && grad.size(2) == C &&
                  grad.size(3) >= dim && grad.stride(3) == 1,
              "older_past_means_backward: grad must be (B*H, T - first, C, >= E) with a contiguous last dim, got ",
              grad.sizes(), " strides ", grad.strides());
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t threads = B * H * C * dim;
  if (threads == 0 || T == 0) return;
  const unsigned blocks = static_cast<unsigned>((threads + SUM_THREADS - 1) / SUM_THREADS);
  auto stream = c10::cuda::getCurrentCUDAStream();
  FCL_DISPATCH_FLOAT(grad.scalar_type(), "older_past_means_backward", [&] {
    auto launch = [&](auto* out_ptr) {
      older_past_means_backward_kernel<<<blocks, SUM_THREADS, 0, stream>>>(
          grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1), grad.stride(2), counts.data_ptr<float>(), B * H,
          static_cast<int>(T), static_cast<int>(C), static_cast<int>(dim), static_cast<int>(first), out_ptr);
    };
    if (grad_sums.scalar_type() == at::kFloat) {
      launch(grad_sums.data_ptr<float>());
    } else {
      launch(grad_sums.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void chunk_cluster_gather_add_cuda(const at::Tensor& grad_sums, const at::Tensor& clusters, int64_t window,
                                   const at::Tensor& grad_x) {
  FCL_CHECK_CUDA(grad_sums, "chunk_cluster_gather_add: grad_sums");
  TORCH_CHECK(grad_sums.dim() == 5 && grad_sums.scalar_type() == at::kFloat && grad_sums.is_contiguous(),
              "chunk_cluster_gather_add: grad_sums must be contiguous (B, H, T, C, E) float32, got ", grad_sums.sizes());
  TORCH_CHECK(clusters.dim() == 3 && clusters.scalar_type() == at::kLong && clusters.is_contiguous() &&
                  clusters.size(0) == grad_sums.size(0) && clusters.size(1) == grad_sums.size(1),
              "chunk_cluster_gather_add: clusters must be contiguous (B, H, N) int64, got ", clusters.sizes());
  const int64_t B = grad_sums.size(0), H = grad_sums.size(1), T = grad_sums.size(2), C = grad_sums.size(3),
                E = grad_sums.size(4), N = clusters.size(2);
  TORCH_CHECK(window >= 1 && (N + window - 1) / window == T, "chunk_cluster_gather_add: ", T, " chunks of window ",
              window, " do not cover ", N, " positions");
  TORCH_CHECK(grad_x.dim() == 4 && grad_x.size(0) == B && grad_x.size(1) == H && grad_x.size(2) == N &&
                  grad_x.size(3) == E && grad_x.scalar_type() == at::kFloat && grad_x.is_contiguous(),
              "chunk_cluster_gather_add: grad_x must be contiguous (B, H, N, E) float32, got ", grad_x.sizes());
  const c10::cuda::CUDAGuard guard(grad_sums.device());
  const int64_t threads = B * H * N * E;
  if (threads == 0) return;
  chunk_cluster_gather_add_kernel<<<static_cast<unsigned>((threads + SUM_THREADS - 1) / SUM_THREADS), SUM_THREADS,
                                    0, c10::cuda::getCurrentCUDAStream()>>>(
      grad_sums.data_ptr<float>(), clusters.data_ptr<int64_t>(), B * H, static_cast<int>(N), static_cast<int>(E),
      static_cast<int>(window), static_cast<int>(T), static_cast<int>(C), grad_x.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> merge_parts_cuda(const std::vector<at::Tensor>& outs,
                                                    const std::vector<at::Tensor>& lses, int64_t length,
                                                    int64_t dim) {
  TORCH_CHECK(!outs.empty() && outs.size() <= 3 && outs.size() == lses.size(),
              "merge_parts: 1 to 3 parts with one lse each, got ", outs.size(), " and ", lses.size());
  const at::Tensor& first = outs[0];
  FCL_CHECK_CUDA(first, "merge_parts: outs[0]");
  TORCH_CHECK(first.dim() == 4 && first.size(3) >= dim, "merge_parts: outs[0] must be (G, T, W, >= D), got ",
              first.sizes());
  const int64_t G = first.size(0), T = first.size(1), W = first.size(2);
  TORCH_CHECK(length <= T * W && length > (T - 1) * W, "merge_parts: length ", length, " does not fit ", T,
              " chunks of ", W);
  for (size_t p = 0; p < outs.size(); ++p) {
    const at::Tensor& o = outs[p];
    const at::Tensor& l = lses[p];
    const int64_t chunks = T - static_cast<int64_t>(p);
    TORCH_CHECK(o.dim() == 4 && o.size(0) == G && o.size(1) == chunks && o.size(2) == W && o.size(3) >= dim &&
                    o.stride(3) == 1 && o.scalar_type() == first.scalar_type() && o.device() == first.device(),
                "merge_parts: outs[", p, "] must be (G, T - ", p, ", W, >= D) like outs[0] with a contiguous last dim, got ",
                o.sizes());
    TORCH_CHECK(l.dim() == 3 && l.size(0) == G && l.size(1) == chunks && l.size(2) == W && l.is_contiguous() &&
                    l.scalar_type() == at::kFloat,
                "merge_parts: lses[", p, "] must be contiguous (G, T - ", p, ", W) float32, got ", l.sizes());
  }
  const c10::cuda::CUDAGuard guard(first.device());
  at::Tensor out = at::empty({G, length, dim}, first.options());
  at::Tensor total = at::empty({G, T, W}, first.options().dtype(at::kFloat));
  const int64_t rows = G * T * W;
  if (rows == 0) return {out, total};
  constexpr int threads = 256;
  const unsigned blocks = static_cast<unsigned>((rows + threads / 32 - 1) / (threads / 32));
  auto stream = c10::cuda::getCurrentCUDAStream();
  FCL_DISPATCH_FLOAT(first.scalar_type(), "merge_parts", [&] {
    MergePart<scalar_t> parts[3];
    for (size_t p = 0; p < 3; ++p) {
      const size_t q = std::min(p, outs.size() - 1);  // unused slots repeat a valid part
      parts[p] = MergePart<scalar_t>{outs[q].data_ptr<scalar_t>(), outs[q].stride(0), outs[q].stride(1),
                                     outs[q].stride(2), lses[q].data_ptr<float>()};
    }
    merge_parts_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        parts[0], parts[1], parts[2], static_cast<int>(outs.size()), G, static_cast<int>(T), static_cast<int>(W),
        static_cast<int>(dim), static_cast<int>(length), out.data_ptr<scalar_t>(), total.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, total};
}

at::Tensor chunk_cluster_sums_cuda(const at::Tensor& x_in, const at::Tensor& clusters_in, int64_t window,
                                   int64_t num_clusters) {
  FCL_CHECK_CUDA(x_in, "chunk_cluster_sums: x");
  FCL_CHECK_CUDA(clusters_in, "chunk_cluster_sums: clusters");
  TORCH_CHECK(x_in.dim() == 4, "chunk_cluster_sums: x must be (B, H, N, E), got ", x_in.sizes());
  TORCH_CHECK(clusters_in.dim() == 3 && clusters_in.scalar_type() == at::kLong &&
                  clusters_in.size(0) == x_in.size(0) && clusters_in.size(1) == x_in.size(1) &&
                  clusters_in.size(2) == x_in.size(2),
              "chunk_cluster_sums: clusters must be (B, H, N) = ", x_in.sizes().slice(0, 3), " int64, got ",
              clusters_in.sizes(), " ", clusters_in.scalar_type());
  TORCH_CHECK(window >= 1, "chunk_cluster_sums: window must be >= 1, got ", window);
  TORCH_CHECK(num_clusters >= 1, "chunk_cluster_sums: num_clusters must be >= 1, got ", num_clusters);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor clusters = clusters_in.contiguous();
  const int64_t B = x.size(0), H = x.size(1), N = x.size(2), E = x.size(3);
  const int64_t T = (N + window - 1) / window;
  at::Tensor sums = at::zeros({B, H, T, num_clusters, E}, x.options().dtype(at::kFloat));
  const int64_t threads = B * H * T * E;
  if (threads == 0) return sums;
  const int64_t blocks = (threads + SUM_THREADS - 1) / SUM_THREADS;
  TORCH_CHECK(blocks <= 2147483647LL, "chunk_cluster_sums: input too large (", threads, " threads)");
  auto stream = c10::cuda::getCurrentCUDAStream();
  FCL_DISPATCH_FLOAT(x.scalar_type(), "chunk_cluster_sums", [&] {
    chunk_cluster_sums_kernel<scalar_t><<<static_cast<unsigned>(blocks), SUM_THREADS, 0, stream>>>(
        x.data_ptr<scalar_t>(), clusters.data_ptr<int64_t>(), B * H, static_cast<int>(N), static_cast<int>(E),
        static_cast<int>(window), static_cast<int>(T), static_cast<int>(num_clusters), sums.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return sums;
}

}  // namespace fcl
