// Hashing and Lloyd's k-means in Hamming space.
//
// Lloyd runs without a host synchronisation: per iteration one launch assigns the
// queries of a chunk to their nearest centroid and accumulates, per cluster, the
// member count and the number of members differing from the centroid in each bit (shared-memory atomics,
// then one global atomic per non-zero counter); a small update launch turns the
// counts into majority bits and zeroes the counters for the next iteration. Integer
// atomics make the result independent of the execution order.
#include "common.cuh"

#include <algorithm>

namespace fcl {
namespace {

constexpr int HASH_THREADS = 128;
constexpr int MAX_BITS = 64;  // counters per cluster: 63 bits + the member count in slot 63
constexpr int COUNT_SLOT = 63;
constexpr int COUNTER_STRIDE = 65;  // padding: cluster c's counters start in bank c

// ------------------------------------------------------------------------- hashing
// One thread per vector; the planes sit transposed in shared memory (planes_t[d][b]),
// so each dimension costs 16 broadcast float4 loads for 64 fused multiply-adds.
template <typename scalar_t>
__global__ void hash_kernel(Rows<const scalar_t> x, int64_t rows, int length, int dim,
                            const float* __restrict__ planes, const float* __restrict__ offsets,
                            int bits, int64_t* __restrict__ codes) {
  extern __shared__ float4 smem_hash[];
  float* planes_t = reinterpret_cast<float*>(smem_hash);  // dim x 64
  for (int idx = threadIdx.x; idx < dim * MAX_BITS; idx += blockDim.x) {
    const int d = idx / MAX_BITS, b = idx % MAX_BITS;
    planes_t[idx] = b < bits ? planes[b * dim + d] : 0.f;
  }
  __syncthreads();
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= rows * length) return;
  const int64_t bh = item / length;
  const int64_t n = item - bh * length;
  const scalar_t* xr = x.row(bh, n);
  float acc[MAX_BITS];
#pragma unroll
  for (int b = 0; b < MAX_BITS; ++b) acc[b] = 0.f;
  auto project = [&](int d, float xv) {
    const float4* p = reinterpret_cast<const float4*>(planes_t + d * MAX_BITS);
#pragma unroll
    for (int b4 = 0; b4 < MAX_BITS / 4; ++b4) {
      const float4 w = p[b4];
      acc[4 * b4 + 0] = fmaf(xv, w.x, acc[4 * b4 + 0]);
      acc[4 * b4 + 1] = fmaf(xv, w.y, acc[4 * b4 + 1]);
      acc[4 * b4 + 2] = fmaf(xv, w.z, acc[4 * b4 + 2]);
      acc[4 * b4 + 3] = fmaf(xv, w.w, acc[4 * b4 + 3]);
    }
  };
  // 16-byte loads where the row allows them (8x fewer load instructions for bf16).
  constexpr int VEC = 16 / sizeof(scalar_t);
  if (dim % VEC == 0 && reinterpret_cast<uintptr_t>(xr) % 16 == 0) {
    for (int d0 = 0; d0 < dim; d0 += VEC) {
      const uint4 raw = *reinterpret_cast<const uint4*>(xr + d0);
      const scalar_t* vals = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
      for (int u = 0; u < VEC; ++u) project(d0 + u, to_float(vals[u]));
    }
  } else {
    for (int d = 0; d < dim; ++d) project(d, to_float(xr[d]));
  }
  int64_t code = 0;
#pragma unroll
  for (int b = 0; b < MAX_BITS; ++b) {
    if (b < bits && acc[b] > offsets[b]) code |= (int64_t(1) << b);
  }
  codes[item] = code;
}

// --------------------------------------------------------------------- clustering
struct RowInfo {
  const int* cum;     // (B, N) inclusive count of valid queries, or nullptr (no padding)
  const bool* mask;   // (B, N) True = padded, or nullptr
  int heads, length, clusters;
  __device__ __forceinline__ int num_valid(int b) const {
    return cum == nullptr ? length : cum[static_cast<int64_t>(b) * length + length - 1];
  }
  __device__ __forceinline__ bool valid(int b, int n) const {
    return mask == nullptr || !mask[static_cast<int64_t>(b) * length + n];
  }
  __device__ __forceinline__ int rank(int b, int n) const {  // rank among valid queries
    return cum == nullptr ? n : cum[static_cast<int64_t>(b) * length + n] - 1;
  }
  // Position of the valid query of rank r (first n with cum[n] >= r + 1).
  __device__ __forceinline__ int position_of_rank(int b, int r) const {
    if (cum == nullptr) return r;
    const int* c = cum + static_cast<int64_t>(b) * length;
    int lo = 0, hi = length - 1;
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (c[mid] >= r + 1) hi = mid; else lo = mid + 1;
    }
    return lo;
  }
  // Rows with at most C valid queries put every query in its own cluster.
  __device__ __forceinline__ bool singleton(int b) const { return num_valid(b) <= clusters; }
};

__global__ void lloyd_init_kernel(RowInfo info, const int64_t* __restrict__ codes,
                                  int64_t* __restrict__ centroids) {
  const int64_t bh = blockIdx.y;
  const int b = static_cast<int>(bh / info.heads);
  const int nv = info.num_valid(b);
  const int C = info.clusters;
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < C; j += gridDim.x * blockDim.x) {
    int64_t code = 0;
    if (nv <= C) {
      if (j < nv) code = codes[bh * info.length + info.position_of_rank(b, j)];
    } else {
      const int r = static_cast<int>((static_cast<int64_t>(j) * nv) / C);
      code = codes[bh * info.length + info.position_of_rank(b, r)];
    }
    centroids[bh * C + j] = code;
  }
}

__device__ __forceinline__ int nearest(int64_t code, const int64_t* cent, int C) {
  int best = 0, best_d = 65;
  for (int j = 0; j < C; ++j) {
    const int d = __popcll(static_cast<unsigned long long>(code ^ cent[j]));
    if (d < best_d) { best_d = d; best = j; }  // strict: ties keep the lowest index
  }
  return best;
}

// Assign + accumulate counts (SMEM_COUNTS: counters in shared memory, else global).
template <bool SMEM_COUNTS>
__global__ void lloyd_assign_kernel(RowInfo info, const int64_t* __restrict__ codes,
                                    const int64_t* __restrict__ centroids, int chunk,
                                    int* __restrict__ counters /* (rows, C, 64) */) {
  extern __shared__ int64_t smem_lloyd[];
  const int64_t bh = blockIdx.y;
  const int b = static_cast<int>(bh / info.heads);
  if (info.singleton(b)) return;  // uniform over the block
  const int C = info.clusters;
  int64_t* cent = smem_lloyd;
  int* counts = reinterpret_cast<int*>(smem_lloyd + ((C + 1) / 2) * 2 + 2);
  for (int j = threadIdx.x; j < C; j += blockDim.x) cent[j] = centroids[bh * C + j];
  if (SMEM_COUNTS) {
    for (int i = threadIdx.x; i < C * COUNTER_STRIDE; i += blockDim.x) counts[i] = 0;
  }
  __syncthreads();
  int* gcount = counters + bh * C * MAX_BITS;
  const int start = blockIdx.x * chunk;
  const int stop = min(start + chunk, info.length);
  for (int n = start + threadIdx.x; n < stop; n += blockDim.x) {
    if (!info.valid(b, n)) continue;
    const int64_t code = codes[bh * info.length + n];
    const int j = nearest(code, cent, C);
    // Count the bits where the member differs from its centroid (the update recovers
    // the ones from them): after a few iterations these are far fewer than the set
    // bits, so far fewer atomics.
    unsigned long long rest = static_cast<unsigned long long>(code ^ cent[j]);
    if (SMEM_COUNTS) {
      int* cj = counts + j * COUNTER_STRIDE;
      atomicAdd(cj + COUNT_SLOT, 1);
      while (rest) { atomicAdd(cj + (__ffsll(rest) - 1), 1); rest &= rest - 1; }
    } else {
      int* cj = gcount + j * MAX_BITS;
      atomicAdd(cj + COUNT_SLOT, 1);
      while (rest) { atomicAdd(cj + (__ffsll(rest) - 1), 1); rest &= rest - 1; }
    }
  }
  if (SMEM_COUNTS) {
    __syncthreads();
    for (int i = threadIdx.x; i < C * MAX_BITS; i += blockDim.x) {
      const int j = i / MAX_BITS, s = i % MAX_BITS;
      const int v = counts[j * COUNTER_STRIDE + s];
      if (v != 0) atomicAdd(gcount + i, v);
    }
  }
}

// Majority update; ties and empty clusters keep the old bit. Zeroes the counters.
// One thread per (cluster, bit): two warps per cluster, each packs 32 bits by ballot.
__global__ void lloyd_update_kernel(RowInfo info, int bits, int64_t* __restrict__ centroids,
                                    int* __restrict__ counters) {
  const int64_t bh = blockIdx.y;
  const int b = static_cast<int>(bh / info.heads);
  if (info.singleton(b)) return;
  const int C = info.clusters;
  const int j = blockIdx.x * (blockDim.x / MAX_BITS) + threadIdx.x / MAX_BITS;
  const int bit = threadIdx.x % MAX_BITS;
  const bool active = j < C;  // uniform per warp (64 threads per cluster)
  int* cj = counters + (bh * C + (active ? j : 0)) * MAX_BITS;
  bool new_bit = false;
  if (active) {
    const int members = cj[COUNT_SLOT];
    const int differ = cj[bit];  // members whose bit differs from the centroid's
    new_bit = (static_cast<uint64_t>(centroids[bh * C + j]) >> bit) & 1;
    const int ones = new_bit ? members - differ : differ;
    if (bit < bits) {
      if (2 * ones > members) new_bit = true;
      else if (2 * ones < members) new_bit = false;
    }
  }
  const unsigned word = __ballot_sync(FULL_MASK, new_bit);
  __syncthreads();  // every thread has read the counters and the old code
  if (active) {
    cj[bit] = 0;
    if ((threadIdx.x & 31) == 0) {
      unsigned* halves = reinterpret_cast<unsigned*>(centroids + bh * C + j);
      halves[bit / 32] = word;  // little-endian: bits 0..31, then 32..63
    }
  }
}

// Final assignment: -1 for padded queries, the rank in singleton rows, else nearest.
__global__ void lloyd_final_kernel(RowInfo info, const int64_t* __restrict__ codes,
                                   const int64_t* __restrict__ centroids, int chunk,
                                   int64_t* __restrict__ assignments) {
  extern __shared__ int64_t smem_final[];
  const int64_t bh = blockIdx.y;
  const int b = static_cast<int>(bh / info.heads);
  const bool single = info.singleton(b);
  const int C = info.clusters;
  if (!single) {
    for (int j = threadIdx.x; j < C; j += blockDim.x) smem_final[j] = centroids[bh * C + j];
  }
  __syncthreads();
  const int start = blockIdx.x * chunk;
  const int stop = min(start + chunk, info.length);
  for (int n = start + threadIdx.x; n < stop; n += blockDim.x) {
    int64_t a = -1;
    if (info.valid(b, n)) {
      a = single ? info.rank(b, n) : nearest(codes[bh * info.length + n], smem_final, C);
    }
    assignments[bh * info.length + n] = a;
  }
}

// Nearest codebook entry (Hamming; ties: lowest id) of codes that took no part in the
// fit: the causal variant fits its key codebook on the first 2W keys only.
__global__ void codebook_assign_kernel(const int64_t* __restrict__ codes, const int64_t* __restrict__ codebook,
                                       int length, int clusters, int chunk, int64_t* __restrict__ ids) {
  extern __shared__ int64_t smem_codebook[];
  const int64_t bh = blockIdx.y;
  for (int j = threadIdx.x; j < clusters; j += blockDim.x) smem_codebook[j] = codebook[bh * clusters + j];
  __syncthreads();
  const int start = blockIdx.x * chunk;
  const int stop = min(start + chunk, length);
  for (int n = start + threadIdx.x; n < stop; n += blockDim.x) {
    ids[bh * length + n] = nearest(codes[bh * length + n], smem_codebook, clusters);
  }
}

}  // namespace

// Largest C whose centroids fit in shared memory (the final / assign kernels keep them there).
constexpr int MAX_SMEM_CLUSTERS = 6144;

at::Tensor hash_codes_cuda(const at::Tensor& x_in, const at::Tensor& planes_in, const at::Tensor& offsets_in) {
  FCL_CHECK_CUDA(x_in, "hash_codes: x");
  TORCH_CHECK(x_in.dim() == 4, "hash_codes: x must be (B, H, N, D), got ", x_in.sizes());
  TORCH_CHECK(planes_in.dim() == 2 && planes_in.size(1) == x_in.size(3) && planes_in.size(0) >= 1 &&
                  planes_in.size(0) <= 63,
              "hash_codes: planes must be (bits in 1..63, D=", x_in.size(3), "), got ", planes_in.sizes());
  TORCH_CHECK(offsets_in.dim() == 1 && offsets_in.size(0) == planes_in.size(0),
              "hash_codes: offsets must be (bits=", planes_in.size(0), ",), got ", offsets_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.stride(-1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor planes = planes_in.to(x.device(), at::kFloat).contiguous();
  const at::Tensor offsets = offsets_in.to(x.device(), at::kFloat).contiguous();
  const int64_t rows = x.size(0) * x.size(1);
  const int length = static_cast<int>(x.size(2)), dim = static_cast<int>(x.size(3));
  at::Tensor codes = at::empty({x.size(0), x.size(1), x.size(2)}, x.options().dtype(at::kLong));
  if (codes.numel() == 0) return codes;
  const size_t smem = static_cast<size_t>(dim) * MAX_BITS * sizeof(float);
  TORCH_CHECK(smem <= 200 * 1024, "hash_codes: dim ", dim, " too large for the kernel (max 800)");
  const int blocks = static_cast<int>((rows * length + HASH_THREADS - 1) / HASH_THREADS);
  auto stream = c10::cuda::getCurrentCUDAStream();
  FCL_DISPATCH_FLOAT(x.scalar_type(), "hash_codes", [&] {
    auto kernel = hash_kernel<scalar_t>;
    ensure_smem(kernel, smem);
    kernel<<<blocks, HASH_THREADS, smem, stream>>>(make_rows<const scalar_t>(x), rows, length, dim,
                                                    planes.data_ptr<float>(), offsets.data_ptr<float>(),
                                                    static_cast<int>(planes.size(0)), codes.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return codes;
}

// queries_per_block: how many queries each block of the assign kernels takes (0: enough
// blocks to fill the GPU twice, 256..4096 queries each). Every block adds its shared-memory
// bit counts to the row's global counters once per iteration, so more blocks per row mean
// more global atomics; fewer blocks, less parallelism. Results do not depend on it.
std::tuple<at::Tensor, at::Tensor> lloyd_kmeans_cuda(const at::Tensor& codes_in,
                                                     const c10::optional<at::Tensor>& mask_in,
                                                     int64_t num_clusters, int64_t iterations, int64_t bits,
                                                     int64_t queries_per_block) {
  FCL_CHECK_CUDA(codes_in, "lloyd_kmeans: codes");
  TORCH_CHECK(codes_in.dim() == 3 && codes_in.scalar_type() == at::kLong,
              "lloyd_kmeans: codes must be (B, H, N) int64, got ", codes_in.sizes(), " ", codes_in.scalar_type());
  TORCH_CHECK(num_clusters >= 1 && num_clusters <= MAX_SMEM_CLUSTERS,
              "lloyd_kmeans: num_clusters must be in 1..", MAX_SMEM_CLUSTERS, " for the kernel, got ", num_clusters);
  TORCH_CHECK(iterations >= 0, "lloyd_kmeans: iterations must be >= 0, got ", iterations);
  TORCH_CHECK(bits >= 1 && bits <= 63, "lloyd_kmeans: bits must be in 1..63, got ", bits);
  TORCH_CHECK(queries_per_block >= 0 && queries_per_block <= (1 << 30),
              "lloyd_kmeans: queries_per_block must be 0 (automatic) or a positive count, got ", queries_per_block);
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous();
  const int64_t B = codes.size(0), H = codes.size(1), N = codes.size(2);
  const int C = static_cast<int>(num_clusters);
  at::Tensor assignments = at::empty_like(codes);
  at::Tensor centroids = at::empty({B, H, C}, codes.options());
  if (B * H == 0 || N == 0) { centroids.zero_(); return {assignments, centroids}; }
  TORCH_CHECK(B * H <= 65535, "lloyd_kmeans: batch * heads must be <= 65535, got ", B * H);

  at::Tensor mask, cum;
  RowInfo info{nullptr, nullptr, static_cast<int>(H), static_cast<int>(N), C};
  if (mask_in.has_value()) {
    TORCH_CHECK(mask_in->dim() == 2 && mask_in->size(0) == B && mask_in->size(1) == N,
                "lloyd_kmeans: query_padding_mask must be (B=", B, ", N=", N, "), got ", mask_in->sizes());
    mask = mask_in->to(codes.device(), at::kBool).contiguous();
    cum = at::cumsum(mask.logical_not(), 1, at::kInt).contiguous();
    info.mask = mask.data_ptr<bool>();
    info.cum = cum.data_ptr<int>();
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 small_grid(static_cast<unsigned>((C + 127) / 128), static_cast<unsigned>(B * H));
  lloyd_init_kernel<<<small_grid, 128, 0, stream>>>(info, codes.data_ptr<int64_t>(), centroids.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  int64_t chunk = queries_per_block;
  if (chunk == 0) {  // enough blocks to fill the GPU twice over, at most 4096 queries each
    const int64_t target_blocks = 2 * num_sms();
    chunk = std::min<int64_t>(std::max<int64_t>((B * H * N + target_blocks - 1) / target_blocks, 256), 4096);
  }
  chunk = std::min<int64_t>(chunk, std::max<int64_t>(N, 1));
  const dim3 grid(static_cast<unsigned>((N + chunk - 1) / chunk), static_cast<unsigned>(B * H));
  constexpr int threads = 512;
  const dim3 update_grid(static_cast<unsigned>((C + 1) / 2), static_cast<unsigned>(B * H));

  if (iterations > 0) {
    at::Tensor counters = at::zeros({B * H, C, MAX_BITS}, codes.options().dtype(at::kInt));
    // Centroids (C, padded to an even count plus one pair) then the counters.
    const size_t cent_bytes = static_cast<size_t>(((C + 1) / 2) * 2 + 2) * sizeof(int64_t);
    const size_t smem_counts = cent_bytes + static_cast<size_t>(C) * COUNTER_STRIDE * sizeof(int);
    const bool use_smem = smem_counts <= 200 * 1024;
    const size_t smem = use_smem ? smem_counts : cent_bytes;
    auto kernel = use_smem ? lloyd_assign_kernel<true> : lloyd_assign_kernel<false>;
    ensure_smem(kernel, smem);
    for (int64_t it = 0; it < iterations; ++it) {
      kernel<<<grid, threads, smem, stream>>>(info, codes.data_ptr<int64_t>(), centroids.data_ptr<int64_t>(),
                                              static_cast<int>(chunk), counters.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      lloyd_update_kernel<<<update_grid, 128, 0, stream>>>(info, static_cast<int>(bits), centroids.data_ptr<int64_t>(),
                                                           counters.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  // Padded: the compiler reads the centroids in 16-byte pairs.
  const size_t smem_final = static_cast<size_t>(C + 2) * sizeof(int64_t);
  ensure_smem(lloyd_final_kernel, std::max<size_t>(smem_final, 1));
  lloyd_final_kernel<<<grid, threads, smem_final, stream>>>(info, codes.data_ptr<int64_t>(), centroids.data_ptr<int64_t>(),
                                                            static_cast<int>(chunk), assignments.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {assignments, centroids};
}

}  // namespace fcl

namespace fcl {

at::Tensor codebook_assign_cuda(const at::Tensor& codes_in, const at::Tensor& codebook_in) {
  FCL_CHECK_CUDA(codes_in, "codebook_assign: codes");
  FCL_CHECK_CUDA(codebook_in, "codebook_assign: codebook");
  TORCH_CHECK(codes_in.dim() == 3 && codes_in.scalar_type() == at::kLong,
              "codebook_assign: codes must be (B, H, N) int64, got ", codes_in.sizes(), " ", codes_in.scalar_type());
  TORCH_CHECK(codebook_in.dim() == 3 && codebook_in.scalar_type() == at::kLong &&
                  codebook_in.size(0) == codes_in.size(0) && codebook_in.size(1) == codes_in.size(1),
              "codebook_assign: codebook must be (B=", codes_in.size(0), ", H=", codes_in.size(1),
              ", C) int64, got ", codebook_in.sizes(), " ", codebook_in.scalar_type());
  const int64_t B = codes_in.size(0), H = codes_in.size(1), N = codes_in.size(2), C = codebook_in.size(2);
  TORCH_CHECK(C >= 1 && C <= MAX_SMEM_CLUSTERS, "codebook_assign: the codebook must have 1..",
              MAX_SMEM_CLUSTERS, " entries, got ", C);
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const at::Tensor codes = codes_in.contiguous();
  const at::Tensor codebook = codebook_in.contiguous();
  at::Tensor ids = at::empty_like(codes);
  if (B * H == 0 || N == 0) return ids;
  TORCH_CHECK(B * H <= 65535, "codebook_assign: batch * heads must be <= 65535, got ", B * H);
  const int64_t target_blocks = 2 * num_sms();
  int64_t chunk = (B * H * N + target_blocks - 1) / target_blocks;
  chunk = std::min<int64_t>(std::max<int64_t>(chunk, 256), 4096);
  const dim3 grid(static_cast<unsigned>((N + chunk - 1) / chunk), static_cast<unsigned>(B * H));
  // Padded by two entries: the compiler reads the codebook in 16-byte pairs.
  const size_t smem = static_cast<size_t>(C + 2) * sizeof(int64_t);
  ensure_smem(codebook_assign_kernel, smem);
  codebook_assign_kernel<<<grid, 512, smem, c10::cuda::getCurrentCUDAStream()>>>(
      codes.data_ptr<int64_t>(), codebook.data_ptr<int64_t>(), static_cast<int>(N), static_cast<int>(C),
      static_cast<int>(chunk), ids.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ids;
}

}  // namespace fcl
