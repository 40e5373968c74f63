// Per-chunk key-cluster sums of the causal variant (fairseq_clustered/ops/causal_cuda.py).
//
// The summaries the causal attention reads are prefix sums over chunks of these per-chunk
// sums. They must be bit-for-bit reproducible: the leak test changes the future and
// compares every earlier output exactly, so a sum whose rounding depended on the order
// in which atomics land would fail it for no leak at all. Hence no atomics: one thread
// owns one (row, chunk, feature) and adds the chunk's members in position order.
#include "common.cuh"

namespace fcl {
namespace {

constexpr int SUM_THREADS = 128;

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
// chunks 0 .. t - 2) / count (0 for an empty cluster). One thread per (row, cluster,
// feature) walks the chunks in order, so the prefix sums cost one read of the sums.
template <typename out_t>
__global__ void older_past_means_kernel(const float* __restrict__ sums /* (rows, T, C, E) */,
                                        const float* __restrict__ counts /* (rows, T, C), older past */,
                                        int64_t rows, int num_chunks, int num_clusters, int dim, int first,
                                        out_t* __restrict__ out /* (rows, T - first, C, out_stride) */,
                                        int out_stride) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * num_clusters * dim) return;
  const int e = static_cast<int>(idx % dim);
  const int c = static_cast<int>((idx / dim) % num_clusters);
  const int64_t row = idx / (static_cast<int64_t>(dim) * num_clusters);
  const int64_t chunk_stride = static_cast<int64_t>(num_clusters) * dim;
  const float* s = sums + row * num_chunks * chunk_stride + static_cast<int64_t>(c) * dim + e;
  const float* n = counts + row * num_chunks * num_clusters + c;
  out_t* o = out + (row * (num_chunks - first) * num_clusters + c) * out_stride + e;
  float running = 0.f;
  for (int t = 0; t < num_chunks; ++t) {
    if (t >= 2) running += s[(t - 2) * chunk_stride];
    if (t >= first) {
      const float count = n[static_cast<int64_t>(t) * num_clusters];
      o[static_cast<int64_t>(t - first) * num_clusters * out_stride] = from_float<out_t>(count > 0.f ? running / count : 0.f);
    }
  }
}

// Adjoint of older_past_means_kernel: grad_sums[t][c][e] = sum over chunks u >= max(t + 2,
// first) of grad[u - first][c][e] / count[u][c], walking the chunks backwards.
template <typename grad_t>
__global__ void older_past_means_backward_kernel(const grad_t* __restrict__ grad /* (rows, T - first, C, stride) */,
                                                 int grad_stride, const float* __restrict__ counts,
                                                 int64_t rows, int num_chunks, int num_clusters, int dim, int first,
                                                 float* __restrict__ grad_sums /* (rows, T, C, E) */) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * num_clusters * dim) return;
  const int e = static_cast<int>(idx % dim);
  const int c = static_cast<int>((idx / dim) % num_clusters);
  const int64_t row = idx / (static_cast<int64_t>(dim) * num_clusters);
  const int64_t chunk_stride = static_cast<int64_t>(num_clusters) * dim;
  const grad_t* g = grad + (row * (num_chunks - first) * num_clusters + c) * grad_stride + e;
  const float* n = counts + row * num_chunks * num_clusters + c;
  float* out = grad_sums + row * num_chunks * chunk_stride + static_cast<int64_t>(c) * dim + e;
  float running = 0.f;  // sum over chunks u >= t + 2
  for (int t = num_chunks - 1; t >= 0; --t) {
    out[t * chunk_stride] = running;
    const int u = t + 1;  // joins the sum for chunk t - 1
    if (u < num_chunks && u >= first) {
      const float count = n[static_cast<int64_t>(u) * num_clusters];
      if (count > 0.f) running += to_float(g[static_cast<int64_t>(u - first) * num_clusters * grad_stride]) / count;
    }
  }
}

}  // namespace

void older_past_means_cuda(const at::Tensor& sums, const at::Tensor& counts, int64_t first, const at::Tensor& out) {
  FCL_CHECK_CUDA(sums, "older_past_means: sums");
  TORCH_CHECK(sums.dim() == 5 && sums.scalar_type() == at::kFloat && sums.is_contiguous(),
              "older_past_means: sums must be contiguous (B, H, T, C, E) float32, got ", sums.sizes());
  const int64_t B = sums.size(0), H = sums.size(1), T = sums.size(2), C = sums.size(3), E = sums.size(4);
  TORCH_CHECK(counts.sizes() == sums.sizes().slice(0, 4) && counts.scalar_type() == at::kFloat &&
                  counts.is_contiguous(),
              "older_past_means: counts must be contiguous (B, H, T, C) float32, got ", counts.sizes());
  TORCH_CHECK(first >= 0 && first <= T, "older_past_means: first chunk ", first, " outside 0..", T);
  TORCH_CHECK(out.dim() == 4 && out.size(0) == B * H && out.size(1) == T - first && out.size(2) == C &&
                  out.size(3) >= E && out.is_contiguous(),
              "older_past_means: out must be contiguous (B*H, T - first, C, >= E), got ", out.sizes());
  const c10::cuda::CUDAGuard guard(sums.device());
  const int64_t threads = B * H * C * E;
  if (threads == 0 || T == first) return;
  const unsigned blocks = static_cast<unsigned>((threads + SUM_THREADS - 1) / SUM_THREADS);
  auto stream = c10::cuda::getCurrentCUDAStream();
  FCL_DISPATCH_FLOAT(out.scalar_type(), "older_past_means", [&] {
    older_past_means_kernel<scalar_t><<<blocks, SUM_THREADS, 0, stream>>>(
        sums.data_ptr<float>(), counts.data_ptr<float>(), B * H, static_cast<int>(T), static_cast<int>(C),
        static_cast<int>(E), static_cast<int>(first), out.data_ptr<scalar_t>(), static_cast<int>(out.size(3)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor older_past_means_backward_cuda(const at::Tensor& grad, const at::Tensor& counts, int64_t first,
                                          int64_t dim) {
  FCL_CHECK_CUDA(grad, "older_past_means_backward: grad");
  TORCH_CHECK(counts.dim() == 4 && counts.scalar_type() == at::kFloat && counts.is_contiguous(),
              "older_past_means_backward: counts must be contiguous (B, H, T, C) float32, got ", counts.sizes());
  const int64_t B = counts.size(0), H = counts.size(1), T = counts.size(2), C = counts.size(3);
  TORCH_CHECK(first >= 0 && first <= T, "older_past_means_backward: first chunk ", first, " outside 0..", T);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == B * H && grad.size(1) == T - first && grad.size(2) == C &&
                  grad.size(3) >= dim && grad.stride(3) == 1 && grad.stride(2) == grad.size(3) &&
                  grad.stride(1) == C * grad.size(3) && grad.stride(0) == (T - first) * C * grad.size(3),
              "older_past_means_backward: grad must be contiguous (B*H, T - first, C, >= dim), got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor grad_sums = at::empty({B, H, T, C, dim}, grad.options().dtype(at::kFloat));
  const int64_t threads = B * H * C * dim;
  if (threads == 0 || T == 0) return grad_sums;
  const unsigned blocks = static_cast<unsigned>((threads + SUM_THREADS - 1) / SUM_THREADS);
  auto stream = c10::cuda::getCurrentCUDAStream();
  FCL_DISPATCH_FLOAT(grad.scalar_type(), "older_past_means_backward", [&] {
    older_past_means_backward_kernel<scalar_t><<<blocks, SUM_THREADS, 0, stream>>>(
        grad.data_ptr<scalar_t>(), static_cast<int>(grad.size(3)), counts.data_ptr<float>(), B * H,
        static_cast<int>(T), static_cast<int>(C), static_cast<int>(dim), static_cast<int>(first),
        grad_sums.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_sums;
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
