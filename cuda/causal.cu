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

}  // namespace

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
