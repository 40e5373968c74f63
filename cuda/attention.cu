// Per-cluster reductions, broadcasts and the per-query exact top-key products of
// improved clustered attention (forward and backward).
//
// Queries are visited in cluster order (a stable sort of the assignments, done by
// the caller), so the members of a cluster are contiguous: segment sums are
// deterministic (fixed summation order, no float atomics), and consecutive warps of
// the improved kernels read the same cluster's top keys from L1/L2.
#include "cluster_order.cuh"
#include "common.cuh"

namespace fcl {
namespace {

constexpr int SEG_THREADS = 128;

// ------------------------------------------------------ the queries' sort by cluster
// A thread block cluster per row (cluster_place().blocks of them; one block before sm_90): block r
// takes the r-th of consecutive slices of the row (order_row_slices, cluster_order.cuh). One block
// per row, as before the thirtieth session, left most of the GPU idle at 32 rows: 24 us at 8k.
__global__ void __launch_bounds__(ORDER_THREADS) cluster_order_kernel(const int64_t* __restrict__ ids, int length,
                                                                      int clusters, int64_t* __restrict__ order,
                                                                      int64_t* __restrict__ seg_start) {
  extern __shared__ int smem_order[];
  const auto [rank, blocks] = cluster_place();
  const int64_t row = blockIdx.x / blocks;
  const int per_block = (length + blocks - 1) / blocks;
  const int begin = min(length, rank * per_block), end = min(length, begin + per_block);
  order_row_slices(ids + row * length, begin, end, clusters, rank, blocks, order + row * length,
                   seg_start + row * (clusters + 1), smem_order);
}

// The end of both segment-sum kernels, after a barrier: thread e adds up the warps' partial sums of
// feature e in warp order (so reruns are bit-identical), divides by the `members` where `mean`
// (an empty cluster keeps its zeros) and stores it in the cluster's output row `out_row`.
template <int WARPS>
__device__ __forceinline__ void store_segment_total(const float (&partial)[WARPS][SEG_THREADS], int width,
                                                    int64_t members, bool mean, float* out_row) {
  const int e = threadIdx.x;
  if (e < width) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) total += partial[w][e];
    if (mean && members > 0) total /= static_cast<float>(members);
    out_row[e] = total;
  }
}

// out[bh, c, :] = sum (or mean) over the members of cluster c of x[bh, order[p], :].
// Each warp takes every 4th member (lanes cover the width, up to 4 values each, with
// four members' loads in flight); the four warps' sums are combined in a fixed order,
// so the result does not depend on scheduling.
template <typename scalar_t>
__global__ void segment_sum_kernel(Rows<const scalar_t> x, int width, const int64_t* __restrict__ order,
                                   const int64_t* __restrict__ seg_start, int length, int clusters, bool mean,
                                   float* __restrict__ out) {
  constexpr int WARPS = SEG_THREADS / 32;
  __shared__ float partial[WARPS][SEG_THREADS];
  const int64_t bh = blockIdx.y;
  const int c = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int64_t start = seg_start[bh * (clusters + 1) + c];
  const int64_t stop = seg_start[bh * (clusters + 1) + c + 1];
  const int64_t b = bh / x.heads, h = bh - b * x.heads;
  const scalar_t* base = x.ptr + b * x.sb + h * x.sh;
  const int64_t* ord = order + bh * length;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  int64_t p = start + warp;
  for (; p + 3 * WARPS < stop; p += 4 * WARPS) {
    const scalar_t* rows[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) rows[u] = base + ord[p + u * WARPS] * x.sl;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int e = lane + 32 * r;
        if (e < width) acc[r] += to_float(rows[u][e]);
      }
    }
  }
  for (; p < stop; p += WARPS) {
    const scalar_t* row = base + ord[p] * x.sl;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int e = lane + 32 * r;
      if (e < width) acc[r] += to_float(row[e]);
    }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) partial[warp][lane + 32 * r] = acc[r];
  __syncthreads();
  store_segment_total<WARPS>(partial, width, stop - start, mean, out + (bh * clusters + c) * width);
}

// The 16-byte-load kernels below: `lanes_per_row` lanes (a power of two) cover a member's row, VEC
// values each, so a warp reads 32 / lanes_per_row members per load, UNROLL loads in flight: SEG_UNROLL
// in the block per cluster (its four warps share a cluster), SEG_WARP_UNROLL in the warp per cluster.
// Each pass is two dependent round trips (order entries, then rows), and the launch ends with its
// largest cluster: at 32 rows of 2k, C = 100, clusters average 20 members and reach about 43, which
// took 3 passes of 16 members (bf16, D = 64) at 4 loads in flight and take 2 of 32 at 8. The
// unroll does not change the sum: each lane adds its members in the same sequence either way.
constexpr int SEG_UNROLL = 4;
constexpr int SEG_WARP_UNROLL = 8;

// Lane's part of one warp's sum over members first, first + step, ... (< stop) of a cluster, in
// that order, added into `acc` (the lane's VEC values of the row; zero-filled for an inactive
// lane, past the width). Every pass, the last one too, issues its UNROLL order entries, then
// its UNROLL rows, before adding: a small cluster's members take one round trip for each,
// where a remainder loop of one member per trip took up to UNROLL of them.
template <typename scalar_t, int VEC, int UNROLL>
__device__ __forceinline__ void add_segment_members(float (&acc)[VEC], const scalar_t* base, int64_t row_stride,
                                                    const int64_t* ord, int64_t first, int64_t stop, int step,
                                                    bool active) {
  for (int64_t p = first; p < stop; p += UNROLL * step) {
    int member[UNROLL];  // query indices (< length), -1 past the cluster
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) member[u] = p + u * step < stop ? static_cast<int>(ord[p + u * step]) : -1;
    uint4 raw[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      raw[u] = active && member[u] >= 0 ? *reinterpret_cast<const uint4*>(base + static_cast<int64_t>(member[u]) * row_stride)
                                        : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (member[u] < 0) continue;
      const scalar_t* vals = reinterpret_cast<const scalar_t*>(&raw[u]);
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[v] += to_float(vals[v]);
    }
  }
}

// Lane's values of the warp's sum: the rows' slots combined by shuffles in a fixed pattern (valid
// in the lanes of slot 0).
template <int VEC>
__device__ __forceinline__ void combine_slots(float (&acc)[VEC], int lanes_per_row) {
  for (int off = lanes_per_row; off < 32; off <<= 1) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] += __shfl_xor_sync(FULL_MASK, acc[v], off);
  }
}

// Both 16-byte kernels' side job (segment_sum_cuda's `zero`): their first block clears `count` ints,
// the launch a caller would otherwise spend on a fill (the centroid attention's tickets).
__device__ __forceinline__ void zero_in_first_block(int* zero, int count) {
  if (blockIdx.x == 0 && blockIdx.y == 0) {
    for (int i = threadIdx.x; i < count; i += blockDim.x) zero[i] = 0;
  }
}

// A lane's place in a warp's sum of a cluster (sum_cluster_rows): its slot (which of the members of
// each load it adds), its first value of the row, whether that lies inside the row, and the
// cluster's members.
struct SegmentLane {
  int slot, e0;
  bool active;
  int64_t members;
};

// Lane's part of warp `warp` (of `warps` taking cluster c of row bh together) of the cluster's sum,
// into `acc` (zeroed here): the slots' members added in sequence, then the slots combined, so that
// the lanes of slot 0 hold the warp's sum of their values.
template <typename scalar_t, int VEC, int UNROLL>
__device__ __forceinline__ SegmentLane sum_cluster_rows(float (&acc)[VEC], const Rows<const scalar_t>& x, int width,
                                                        int lanes_per_row, const int64_t* __restrict__ order,
                                                        const int64_t* __restrict__ seg_start, int length,
                                                        int clusters, int64_t bh, int c, int warp, int warps) {
  const int lane = threadIdx.x & 31;
  SegmentLane me;
  me.slot = lane / lanes_per_row;
  me.e0 = (lane - me.slot * lanes_per_row) * VEC;
  me.active = me.e0 < width;
  const int rows_per_warp = 32 / lanes_per_row;
  const int64_t start = seg_start[bh * (clusters + 1) + c];
  const int64_t stop = seg_start[bh * (clusters + 1) + c + 1];
  me.members = stop - start;
  const int64_t b = bh / x.heads, h = bh - b * x.heads;
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
  add_segment_members<scalar_t, VEC, UNROLL>(acc, x.ptr + b * x.sb + h * x.sh + (me.active ? me.e0 : 0), x.sl,
                                     order + bh * length, start + warp * rows_per_warp + me.slot, stop,
                                     warps * rows_per_warp, me.active);
  combine_slots<VEC>(acc, lanes_per_row);
  return me;
}

// A block per cluster, with 16-byte loads: 4 warps x 32 / lanes_per_row members per load, so
// SEG_UNROLL x that in flight (64 rows per block for bf16 rows of 64). The kernel above keeps 4
// rows per warp in flight, which left a large cluster's block waiting on one row after another
// (1.4 TB/s at 32 rows of 8k; benchmarks/NOTES.md, thirtieth session). The sum's order is fixed:
// each lane adds its members in sequence, the lanes of a warp combine by shuffles in a fixed
// pattern, the warps in index order.
template <typename scalar_t>
__global__ void __launch_bounds__(SEG_THREADS) segment_sum_wide_kernel(
    Rows<const scalar_t> x, int width, int lanes_per_row, const int64_t* __restrict__ order,
    const int64_t* __restrict__ seg_start, int length, int clusters, bool mean, float* __restrict__ out,
    int* __restrict__ zero, int zero_count) {
  wait_for_prior_kernels();
  zero_in_first_block(zero, zero_count);
  constexpr int VEC = 16 / sizeof(scalar_t);
  constexpr int WARPS = SEG_THREADS / 32;
  __shared__ float partial[WARPS][SEG_THREADS];
  const int64_t bh = blockIdx.y;
  const int c = blockIdx.x, warp = threadIdx.x / 32;
  float acc[VEC];
  const SegmentLane me = sum_cluster_rows<scalar_t, VEC, SEG_UNROLL>(acc, x, width, lanes_per_row, order, seg_start,
                                                                     length, clusters, bh, c, warp, WARPS);
  if (me.slot == 0 && me.active) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) partial[warp][me.e0 + v] = acc[v];
  }
  __syncthreads();
  store_segment_total<WARPS>(partial, width, me.members, mean, out + (bh * clusters + c) * width);
}

// A warp per cluster, 4 clusters per block, with the loads of the kernel above. For small clusters
// (tens of members) the block per cluster left most of its lanes idle and, at 40-56 registers a
// thread, kept 9-12 of its blocks per SM: 3200 clusters (32 rows, C = 100) ran in 2-3 waves, each a
// chain of three dependent loads (the cluster's start, its order entries, its rows). Here they
// fit in one wave; a large cluster's warp has 2x fewer rows in flight, so the block per cluster
// keeps those (segment_sum_cuda chooses by the shape: SEG_WARP_MAX_PASSES). No block barrier: a
// warp's sum is its slots' shuffles.
template <typename scalar_t>
__global__ void __launch_bounds__(SEG_THREADS) segment_sum_warp_kernel(
    Rows<const scalar_t> x, int width, int lanes_per_row, const int64_t* __restrict__ order,
    const int64_t* __restrict__ seg_start, int length, int clusters, bool mean, float* __restrict__ out,
    int* __restrict__ zero, int zero_count) {
  wait_for_prior_kernels();
  zero_in_first_block(zero, zero_count);
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int64_t bh = blockIdx.y;
  const int c = blockIdx.x * (SEG_THREADS / 32) + threadIdx.x / 32;
  if (c >= clusters) return;  // the whole warp: nothing below waits for the block
  float acc[VEC];
  const SegmentLane me = sum_cluster_rows<scalar_t, VEC, SEG_WARP_UNROLL>(acc, x, width, lanes_per_row, order,
                                                                          seg_start, length, clusters, bh, c, 0, 1);
  if (me.slot == 0 && me.active) {
    float* out_row = out + (bh * clusters + c) * width + me.e0;  // 16-byte aligned: width % VEC == 0
#pragma unroll
    for (int v = 0; v < VEC; v += 4) {
      float4 total = make_float4(acc[v], acc[v + 1], acc[v + 2], acc[v + 3]);
      if (mean && me.members > 0) {
        const float m = static_cast<float>(me.members);
        total = make_float4(total.x / m, total.y / m, total.z / m, total.w / m);
      }
      *reinterpret_cast<float4*>(out_row + v) = total;
    }
  }
}

// out[b, h, n, :] = src[bh, assignment, :] (zeros for padded queries), out addressed through
// its strides (the caller's layout: fairseq's (T, B, H * E) gives (B, H, N, E) views whose
// rows are not consecutive), one value per thread. The fallback of broadcast_rows_kernel
// where a row's 16-byte pieces are not aligned.
template <typename scalar_t>
__global__ void broadcast_kernel(const float* __restrict__ src, const int64_t* __restrict__ assignments,
                                 int64_t queries, int length, int clusters, int width, Rows<scalar_t> out) {
  const int64_t total = queries * width;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = idx / width;
    const int e = static_cast<int>(idx - q * width);
    const int64_t a = assignments[q];
    const int64_t bh = q / length;
    out.row(bh, q - bh * length)[e] = from_float<scalar_t>(a < 0 ? 0.f : src[(bh * clusters + a) * width + e]);
  }
}

// The same with 16-byte pieces: blockIdx.y is the row (batch x head), and each thread writes
// one piece of BROADCAST_UNROLL queries, its loads issued before its stores. Per query and
// piece the fallback above spent three 64-bit divisions, which made it issue-bound at
// 1.5 TB/s (benchmarks/NOTES.md, thirtieth session).
//
// `assignments_ready`: the caller vouches that the assignments were written before the kernel
// launched just before this one began (the forward's: Lloyd's, two launches back), so they are
// read before wait_for_prior_kernels(), while that kernel still runs, through L2 (ld.cg: no
// line of an earlier launch in this SM's L1). Then what follows the prior kernel's end is one
// round trip (the cluster rows) instead of two. Safe by the rule above wait_for_prior_kernels():
// the prior kernel let this one start only after its own wait, so every kernel before it had ended.
constexpr int BROADCAST_THREADS = 256;
constexpr int BROADCAST_UNROLL = 4;

template <typename scalar_t>
__global__ void __launch_bounds__(BROADCAST_THREADS) broadcast_rows_kernel(
    const float* __restrict__ src, const int64_t* __restrict__ assignments, int length, int clusters, int width,
    Rows<scalar_t> out, bool assignments_ready) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int pieces = width / VEC;                 // per query
  const int per_pass = BROADCAST_THREADS / pieces;  // queries written per pass of the block
  const int slot = threadIdx.x / pieces, e0 = (threadIdx.x - slot * pieces) * VEC;
  const int bh = blockIdx.y;
  const int64_t* row_assignments = assignments + static_cast<int64_t>(bh) * length;
  const int first = blockIdx.x * per_pass * BROADCAST_UNROLL + slot;
  int64_t a[BROADCAST_UNROLL];
  const auto load_assignments = [&] {
#pragma unroll
    for (int u = 0; u < BROADCAST_UNROLL; ++u) {
      const int n = first + u * per_pass;
      a[u] = n < length ? static_cast<int64_t>(__ldcg(reinterpret_cast<const long long*>(row_assignments + n)))
                        : -2;  // -2: past the row, nothing written
    }
  };
  if (assignments_ready && slot < per_pass) load_assignments();
  wait_for_prior_kernels();
  if (slot >= per_pass) return;
  if (!assignments_ready) load_assignments();
  const int heads = static_cast<int>(out.heads);
  const int b = bh / heads, h = bh - b * heads;
  scalar_t* base = out.ptr + b * out.sb + h * out.sh + e0;
  const float* row_src = src + static_cast<int64_t>(bh) * clusters * width + e0;
  float4 vals[BROADCAST_UNROLL][VEC / 4];
#pragma unroll
  for (int u = 0; u < BROADCAST_UNROLL; ++u) {
    const float4* from = reinterpret_cast<const float4*>(row_src + (a[u] < 0 ? 0 : a[u]) * width);
#pragma unroll
    for (int i = 0; i < VEC / 4; ++i) vals[u][i] = a[u] < 0 ? make_float4(0.f, 0.f, 0.f, 0.f) : from[i];
  }
#pragma unroll
  for (int u = 0; u < BROADCAST_UNROLL; ++u) {
    if (a[u] == -2) continue;
    uint4 raw;
    scalar_t* packed = reinterpret_cast<scalar_t*>(&raw);
    const float* v = reinterpret_cast<const float*>(vals[u]);
#pragma unroll
    for (int i = 0; i < VEC; ++i) packed[i] = from_float<scalar_t>(v[i]);
    *reinterpret_cast<uint4*>(base + static_cast<int64_t>(first + u * per_pass) * out.sl) = raw;
  }
}

struct TopKeys {
  const int64_t* index;   // (rows, C, K) top keys of each centroid
  const bool* key_mask;   // (B, S) True = padded key, or nullptr
  const float* drop;      // (rows, C, K) dropout multipliers of the top entries, or nullptr
  int heads, keys, topk, clusters;
  __device__ __forceinline__ int64_t key(int64_t bh, int j, int t) const {
    return index[(bh * clusters + j) * topk + t];
  }
  __device__ __forceinline__ bool valid(int64_t bh, int64_t key_idx) const {
    return key_mask == nullptr || !key_mask[(bh / heads) * keys + key_idx];
  }
  __device__ __forceinline__ float drop_mult(int64_t bh, int j, int t) const {
    return drop == nullptr ? 1.f : drop[(bh * clusters + j) * topk + t];
  }
};
FCL_NO_PADDING(TopKeys);

// The cluster's top keys are handled in blocks of 32: lane t holds the index of key
// t0 + t (loaded once, coalesced) and shuffles hand it to the other lanes, so the 32
// row loads of a block are independent and all in flight at once. Slots past K use
// row 0 (always present) with zero weight instead of a branch.
struct KeySlot {
  int64_t key;   // this lane's key index (0 for an empty slot)
  bool live;     // slot < K and the key is not padded
  bool in_range; // slot < K
};

__device__ __forceinline__ KeySlot key_slot(const TopKeys& top, int64_t bh, int j, int t0, int lane) {
  const int t = t0 + lane;
  KeySlot slot{0, false, t < top.topk};
  if (slot.in_range) {
    slot.key = top.key(bh, j, t);
    slot.live = top.valid(bh, slot.key);
  }
  return slot;
}

// Lane gets x . rows[key] for its slot: 32 rows (one per lane's slot) dotted with the
// warp's vector x (VPL values per lane), reduced across the warp.
template <int VPL, typename scalar_t>
__device__ __forceinline__ float block_dots(const scalar_t* base, int64_t stride, const KeySlot& slot,
                                            const float (&x)[VPL], int lane) {
  float part[32];
#pragma unroll
  for (int tt = 0; tt < 32; ++tt) {
    const int64_t key = __shfl_sync(FULL_MASK, slot.key, tt);
    float row[VPL];
    load_vec<VPL>(base + key * stride + lane * VPL, row);
    part[tt] = 0.f;
#pragma unroll
    for (int e = 0; e < VPL; ++e) part[tt] = fmaf(x[e], row[e], part[tt]);
  }
  return warp_transpose_sum(part, lane);
}

// Lane gets the scaled logit s q . k for its slot (-inf when not live).
template <int VPL, typename scalar_t>
__device__ __forceinline__ float block_logits(const scalar_t* k_base, int64_t k_stride, const KeySlot& slot,
                                              const float (&q)[VPL], float scale, int lane) {
  const float logit = block_dots<VPL>(k_base, k_stride, slot, q, lane) * scale;
  return slot.live ? logit : -INFINITY;
}

// Per-warp shared-memory copy of the current cluster's top-key rows (K <= 32): the
// members of a cluster are consecutive in sorted order, so a warp walking them loads
// the 32 key and value rows once per cluster instead of once per query.
template <int VPL, typename scalar_t>
__device__ __forceinline__ void fill_cache(const scalar_t* k_base, int64_t k_stride, const scalar_t* v_base,
                                           int64_t v_stride, const KeySlot& slot, int lane, scalar_t* kc,
                                           scalar_t* vc) {
  constexpr int D = 32 * VPL;
  __syncwarp();
#pragma unroll
  for (int tt = 0; tt < 32; ++tt) {
    const int64_t key = __shfl_sync(FULL_MASK, slot.key, tt);
#pragma unroll
    for (int e = 0; e < VPL; ++e) {
      kc[tt * D + lane * VPL + e] = k_base[key * k_stride + lane * VPL + e];
      vc[tt * D + lane * VPL + e] = v_base[key * v_stride + lane * VPL + e];
    }
  }
  __syncwarp();
}

template <int VPL, typename scalar_t>
__device__ __forceinline__ float cached_dots(const scalar_t* rows, const float (&x)[VPL], int lane) {
  constexpr int D = 32 * VPL;
  float part[32];
#pragma unroll
  for (int tt = 0; tt < 32; ++tt) {
    part[tt] = 0.f;
#pragma unroll
    for (int e = 0; e < VPL; ++e) part[tt] = fmaf(x[e], to_float(rows[tt * D + lane * VPL + e]), part[tt]);
  }
  return warp_transpose_sum(part, lane);
}

template <typename T>
__device__ __forceinline__ const T* head_base(const Rows<const T>& r, int64_t bh) {
  const int64_t b = bh / r.heads, h = bh - b * r.heads;
  return r.ptr + b * r.sb + h * r.sh;
}

// Softmax statistics (max m, sum l) of a query's logits over its top keys; the first
// block's slot and logit are returned for reuse (K <= 32 needs no second pass).
template <int VPL, typename scalar_t>
__device__ __forceinline__ void softmax_stats(const scalar_t* k_base, int64_t k_stride, const TopKeys& top,
                                              int64_t bh, int j, const float (&q)[VPL], float scale, int lane,
                                              float& m, float& l, KeySlot& first_slot, float& first_logit) {
  m = -INFINITY;
  l = 0.f;
  for (int t0 = 0; t0 < top.topk; t0 += 32) {
    const KeySlot slot = key_slot(top, bh, j, t0, lane);
    const float logit = block_logits<VPL>(k_base, k_stride, slot, q, scale, lane);
    if (t0 == 0) { first_slot = slot; first_logit = logit; }
    const float m_new = fmaxf(m, warp_max(logit));
    if (m_new == -INFINITY) continue;
    const float p = logit == -INFINITY ? 0.f : __expf(logit - m_new);
    l = l * (m == -INFINITY ? 0.f : __expf(m - m_new)) + warp_sum(p);
    m = m_new;
  }
}

// MODE 0: out_i = mass_j * exact_i + rest_j. MODE 1: gm_i = grad_out_i . exact_i.
// exact_i = sum_t softmax_t(s q_i . k_t) drop_t v_t over the top keys of i's cluster.
// Each warp walks `per_warp` consecutive sorted positions; with CACHE (K <= 32) the
// cluster's key / value rows come from the warp's shared-memory cache.
template <int MODE, bool CACHE, int VPL, typename scalar_t>
__global__ void improved_exact_fwd_kernel(Rows<const scalar_t> q, Rows<const scalar_t> k, Rows<const scalar_t> v,
                                          Rows<const scalar_t> grad_out, const int64_t* __restrict__ assignments,
                                          const int64_t* __restrict__ order, TopKeys top,
                                          const float* __restrict__ mass, const float* __restrict__ rest,
                                          int length, int per_warp, float scale, scalar_t* __restrict__ out,
                                          float* __restrict__ gm) {
  constexpr int D = 32 * VPL;
  extern __shared__ __align__(16) unsigned char smem_fwd[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x / 32;
  scalar_t* kc = reinterpret_cast<scalar_t*>(smem_fwd) + warp * 2 * 32 * D;
  scalar_t* vc = kc + 32 * D;
  const int64_t bh = blockIdx.y;
  const int p0 = (blockIdx.x * (blockDim.x / 32) + warp) * per_warp;
  const int p1 = min(p0 + per_warp, length);
  const scalar_t* k_base = head_base(k, bh);
  const scalar_t* v_base = head_base(v, bh);
  int cached = -1;
  KeySlot cslot{0, false, false};
  for (int p = p0; p < p1; ++p) {
    const int64_t i = order[bh * length + p];
    const int64_t j64 = assignments[bh * length + i];
    if (j64 < 0) {  // padded query
      if (MODE == 0) {
        float zero[VPL];
#pragma unroll
        for (int e = 0; e < VPL; ++e) zero[e] = 0.f;
        store_vec<VPL>(out + (bh * length + i) * D + lane * VPL, zero);
      } else if (lane == 0) {
        gm[bh * length + i] = 0.f;
      }
      continue;
    }
    const int j = static_cast<int>(j64);
    float qv[VPL];
    load_vec<VPL>(head_base(q, bh) + i * q.sl + lane * VPL, qv);
    float acc[VPL];
#pragma unroll
    for (int e = 0; e < VPL; ++e) acc[e] = 0.f;
    if constexpr (CACHE) {
      if (j != cached) {
        cslot = key_slot(top, bh, j, 0, lane);
        fill_cache<VPL>(k_base, k.sl, v_base, v.sl, cslot, lane, kc, vc);
        cached = j;
      }
      float logit = cached_dots<VPL>(kc, qv, lane) * scale;
      if (!cslot.live) logit = -INFINITY;
      const float m = warp_max(logit);
      if (m != -INFINITY) {
        float w = logit == -INFINITY ? 0.f : __expf(logit - m);
        w /= warp_sum(w);
        if (cslot.in_range) w *= top.drop_mult(bh, j, lane);
#pragma unroll
        for (int tt = 0; tt < 32; ++tt) {
          const float wt = __shfl_sync(FULL_MASK, w, tt);
#pragma unroll
          for (int e = 0; e < VPL; ++e) acc[e] = fmaf(wt, to_float(vc[tt * D + lane * VPL + e]), acc[e]);
        }
      }
    } else {
      float m, l, first_logit;
      KeySlot first_slot;
      softmax_stats<VPL>(k_base, k.sl, top, bh, j, qv, scale, lane, m, l, first_slot, first_logit);
      if (l > 0.f) {
        const float inv_l = 1.f / l;
        for (int t0 = 0; t0 < top.topk; t0 += 32) {
          const KeySlot slot = t0 == 0 ? first_slot : key_slot(top, bh, j, t0, lane);
          const float logit = t0 == 0 ? first_logit : block_logits<VPL>(k_base, k.sl, slot, qv, scale, lane);
          float w = logit == -INFINITY ? 0.f : __expf(logit - m) * inv_l;
          if (slot.in_range) w *= top.drop_mult(bh, j, t0 + lane);
#pragma unroll
          for (int tt = 0; tt < 32; ++tt) {
            const float wt = __shfl_sync(FULL_MASK, w, tt);
            const int64_t key = __shfl_sync(FULL_MASK, slot.key, tt);
            float vv[VPL];
            load_vec<VPL>(v_base + key * v.sl + lane * VPL, vv);
#pragma unroll
            for (int e = 0; e < VPL; ++e) acc[e] = fmaf(wt, vv[e], acc[e]);
          }
        }
      }
    }
    if (MODE == 0) {
      const float mj = mass[bh * top.clusters + j];
      const float* rj = rest + (bh * top.clusters + j) * D + lane * VPL;
      float o[VPL];
#pragma unroll
      for (int e = 0; e < VPL; ++e) o[e] = fmaf(mj, acc[e], rj[e]);
      store_vec<VPL>(out + (bh * length + i) * D + lane * VPL, o);
    } else {
      float g[VPL];
      load_vec<VPL>(head_base(grad_out, bh) + i * grad_out.sl + lane * VPL, g);
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < VPL; ++e) dot = fmaf(g[e], acc[e], dot);
      dot = warp_sum(dot);
      if (lane == 0) gm[bh * length + i] = dot;
    }
  }
}

// Backward of the exact top-key part. Each warp walks `per_warp` consecutive sorted
// positions. dq_i = sum_t glog_t k_t + dq_bar_j is written directly (one writer per
// query); the contributions to dk / dv of the cluster's top keys are summed per
// cluster run in shared memory (AGG, K <= 32) and added to the fp32 buffers with one
// atomic per element per run, or added per query (K > 32).
template <bool AGG, int VPL, typename scalar_t>
__global__ void improved_exact_bwd_kernel(Rows<const scalar_t> grad_out, Rows<const scalar_t> q,
                                          Rows<const scalar_t> k, Rows<const scalar_t> v,
                                          const int64_t* __restrict__ assignments, const int64_t* __restrict__ order,
                                          TopKeys top, const float* __restrict__ mass,
                                          const float* __restrict__ dq_bar, int length, int per_warp, float scale,
                                          scalar_t* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv) {
  constexpr int D = 32 * VPL;
  extern __shared__ float smem_bwd[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x / 32;
  // Per warp: wk, wv (32, D) fp32 sums of glog_t q_i and w_t grad_exact_i over the
  // run, then the cluster's key / value rows (32, D) in the input dtype.
  constexpr int WARP_BYTES = 2 * 32 * D * sizeof(float) + 2 * 32 * D * sizeof(scalar_t);
  float* wk = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(smem_bwd) + warp * WARP_BYTES);
  float* wv = wk + 32 * D;
  scalar_t* kc = reinterpret_cast<scalar_t*>(wv + 32 * D);
  scalar_t* vc = kc + 32 * D;
  KeySlot cslot{0, false, false};
  const int64_t bh = blockIdx.y;
  const int p0 = (blockIdx.x * (blockDim.x / 32) + warp) * per_warp;
  const int p1 = min(p0 + per_warp, length);
  const scalar_t* k_base = head_base(k, bh);
  const scalar_t* v_base = head_base(v, bh);
  const scalar_t* q_base = head_base(q, bh);
  const scalar_t* g_base = head_base(grad_out, bh);
  if (AGG) {
    for (int idx = lane; idx < 64 * D; idx += 32) wk[idx] = 0.f;
  }
  __syncwarp();
  int run_cluster = -1;

  auto flush = [&](int jc) {
    __syncwarp();
    const KeySlot slot = key_slot(top, bh, jc, 0, lane);
    for (int t = 0; t < min(32, top.topk); ++t) {
      const int64_t key = __shfl_sync(FULL_MASK, slot.key, t);
      const bool live = __shfl_sync(FULL_MASK, slot.live, t);
      float* wkr = wk + t * D + lane * VPL;
      float* wvr = wv + t * D + lane * VPL;
      if (live) {  // weights of padded keys are zero
        float* dkr = dk + (bh * top.keys + key) * D + lane * VPL;
        float* dvr = dv + (bh * top.keys + key) * D + lane * VPL;
#pragma unroll
        for (int e = 0; e < VPL; ++e) { atomicAdd(dkr + e, wkr[e]); atomicAdd(dvr + e, wvr[e]); }
      }
#pragma unroll
      for (int e = 0; e < VPL; ++e) { wkr[e] = 0.f; wvr[e] = 0.f; }
    }
    __syncwarp();
  };

  for (int p = p0; p < p1; ++p) {
    const int64_t i = order[bh * length + p];
    const int64_t j64 = assignments[bh * length + i];
    if (j64 < 0) {
      float zero[VPL];
#pragma unroll
      for (int e = 0; e < VPL; ++e) zero[e] = 0.f;
      store_vec<VPL>(dq + (bh * length + i) * D + lane * VPL, zero);
      continue;
    }
    const int j = static_cast<int>(j64);
    if (AGG && run_cluster != j) {
      if (run_cluster >= 0) flush(run_cluster);
      run_cluster = j;
      cslot = key_slot(top, bh, j, 0, lane);
      fill_cache<VPL>(k_base, k.sl, v_base, v.sl, cslot, lane, kc, vc);
    }
    float qv[VPL], ge[VPL], dqv[VPL];
    load_vec<VPL>(q_base + i * q.sl + lane * VPL, qv);
    load_vec<VPL>(g_base + i * grad_out.sl + lane * VPL, ge);
    const float mj = mass[bh * top.clusters + j];
#pragma unroll
    for (int e = 0; e < VPL; ++e) { ge[e] *= mj; dqv[e] = dq_bar[(bh * top.clusters + j) * D + lane * VPL + e]; }
    if constexpr (AGG) {
      float logit = cached_dots<VPL>(kc, qv, lane) * scale;
      if (!cslot.live) logit = -INFINITY;
      const float m = warp_max(logit);
      if (m != -INFINITY) {
        float prob = logit == -INFINITY ? 0.f : __expf(logit - m);
        prob /= warp_sum(prob);
        const float dotv = cached_dots<VPL>(vc, ge, lane);
        const float drop = cslot.in_range ? top.drop_mult(bh, j, lane) : 0.f;
        const float delta = warp_sum(prob * dotv * drop);
        const float glog_own = prob * (dotv * drop - delta) * scale;
        const float w_own = prob * drop;
#pragma unroll
        for (int tt = 0; tt < 32; ++tt) {
          const float glog = __shfl_sync(FULL_MASK, glog_own, tt);
          const float w = __shfl_sync(FULL_MASK, w_own, tt);
          float* wkr = wk + tt * D + lane * VPL;
          float* wvr = wv + tt * D + lane * VPL;
#pragma unroll
          for (int e = 0; e < VPL; ++e) {
            dqv[e] = fmaf(glog, to_float(kc[tt * D + lane * VPL + e]), dqv[e]);
            wkr[e] = fmaf(glog, qv[e], wkr[e]);
            wvr[e] = fmaf(w, ge[e], wvr[e]);
          }
        }
      }
      store_vec<VPL>(dq + (bh * length + i) * D + lane * VPL, dqv);
      continue;
    }
    float m, l, first_logit;
    KeySlot first_slot;
    softmax_stats<VPL>(k_base, k.sl, top, bh, j, qv, scale, lane, m, l, first_slot, first_logit);
    if (l > 0.f) {
      const float inv_l = 1.f / l;
      // delta = sum_t p_t gtp_t with gtp_t = (grad_exact . v_t) drop_t
      float delta = 0.f, first_dot = 0.f;
      for (int t0 = 0; t0 < top.topk; t0 += 32) {
        const KeySlot slot = t0 == 0 ? first_slot : key_slot(top, bh, j, t0, lane);
        const float logit = t0 == 0 ? first_logit : block_logits<VPL>(k_base, k.sl, slot, qv, scale, lane);
        const float dotv = block_dots<VPL>(v_base, v.sl, slot, ge, lane);
        if (t0 == 0) first_dot = dotv;
        const float prob = logit == -INFINITY ? 0.f : __expf(logit - m) * inv_l;
        const float drop = slot.in_range ? top.drop_mult(bh, j, t0 + lane) : 0.f;
        delta += warp_sum(prob * dotv * drop);
      }
      for (int t0 = 0; t0 < top.topk; t0 += 32) {
        const KeySlot slot = t0 == 0 ? first_slot : key_slot(top, bh, j, t0, lane);
        const float logit = t0 == 0 ? first_logit : block_logits<VPL>(k_base, k.sl, slot, qv, scale, lane);
        const float dotv = t0 == 0 ? first_dot : block_dots<VPL>(v_base, v.sl, slot, ge, lane);
        const float prob = logit == -INFINITY ? 0.f : __expf(logit - m) * inv_l;
        const float drop = slot.in_range ? top.drop_mult(bh, j, t0 + lane) : 0.f;
        const float glog_own = prob * (dotv * drop - delta) * scale;
        const float w_own = prob * drop;
#pragma unroll
        for (int tt = 0; tt < 32; ++tt) {
          const float glog = __shfl_sync(FULL_MASK, glog_own, tt);
          const float w = __shfl_sync(FULL_MASK, w_own, tt);
          const int64_t key = __shfl_sync(FULL_MASK, slot.key, tt);
          float kv[VPL];
          load_vec<VPL>(k_base + key * k.sl + lane * VPL, kv);
#pragma unroll
          for (int e = 0; e < VPL; ++e) dqv[e] = fmaf(glog, kv[e], dqv[e]);
          if (AGG) {
            float* wkr = wk + tt * D + lane * VPL;
            float* wvr = wv + tt * D + lane * VPL;
#pragma unroll
            for (int e = 0; e < VPL; ++e) { wkr[e] = fmaf(glog, qv[e], wkr[e]); wvr[e] = fmaf(w, ge[e], wvr[e]); }
          } else if (w != 0.f || glog != 0.f) {
            float* dkr = dk + (bh * top.keys + key) * D + lane * VPL;
            float* dvr = dv + (bh * top.keys + key) * D + lane * VPL;
#pragma unroll
            for (int e = 0; e < VPL; ++e) { atomicAdd(dkr + e, glog * qv[e]); atomicAdd(dvr + e, w * ge[e]); }
          }
        }
      }
    }
    store_vec<VPL>(dq + (bh * length + i) * D + lane * VPL, dqv);
  }
  if (AGG && run_cluster >= 0) flush(run_cluster);
}

void check_rows(const at::Tensor& t, const char* name, int64_t B, int64_t H, int64_t L, int64_t E) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == H && t.size(2) == L && t.size(3) == E, name,
              " must have shape (", B, ", ", H, ", ", L, ", ", E, "), got ", t.sizes());
}

at::Tensor last_contig(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Consecutive sorted positions per warp in the improved kernels: about 32 warps per
// SM in all; longer runs mean fewer cache fills and flushes.
int warps_per_query_run(int64_t queries) {
  const int64_t target_warps = 32LL * num_sms();
  const int64_t per_warp = (queries + target_warps - 1) / target_warps;
  return static_cast<int>(std::max<int64_t>(4, std::min<int64_t>(per_warp, 1024)));
}

}  // namespace

// (order (B*H, N), seg_start (B*H, C+1)) int64 of assignments (B, H, N) int64: see cluster_order_kernel.
std::tuple<at::Tensor, at::Tensor> cluster_order_cuda(const at::Tensor& assignments_in, int64_t num_clusters) {
  FCL_CHECK_CUDA(assignments_in, "cluster_order: assignments");
  TORCH_CHECK(assignments_in.dim() == 3 && assignments_in.scalar_type() == at::kLong,
              "cluster_order: assignments must be (B, H, N) int64, got ", assignments_in.sizes(), " ",
              assignments_in.scalar_type());
  TORCH_CHECK(num_clusters >= 1 && num_clusters <= MAX_ORDER_CLUSTERS, "cluster_order: num_clusters must be in 1..",
              MAX_ORDER_CLUSTERS, ", got ", num_clusters);
  TORCH_CHECK(assignments_in.size(2) < (int64_t(1) << 31), "cluster_order: at most 2**31 - 1 queries per row, got ",
              assignments_in.size(2));
  const c10::cuda::CUDAGuard guard(assignments_in.device());
  const at::Tensor assignments = assignments_in.contiguous();
  const int64_t rows = assignments.size(0) * assignments.size(1), N = assignments.size(2);
  at::Tensor order = at::empty({rows, N}, assignments.options());
  at::Tensor seg_start = at::empty({rows, num_clusters + 1}, assignments.options());
  if (rows == 0) return {order, seg_start};
  const size_t smem = order_smem_bytes(static_cast<int>(num_clusters));
  ensure_smem(cluster_order_kernel, smem);
  // Blocks per row: up to 8 (a portable cluster) and one chunk each, enough to fill the GPU twice.
  int blocks = 1;
  if (compute_major() >= 9) {
    const int64_t chunks = (N + ORDER_THREADS - 1) / ORDER_THREADS;
    blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({8, chunks, 2 * num_sms() / rows})));
  }
  TORCH_CHECK(rows * blocks <= 2147483647, "cluster_order: batch * heads must be < 2**31 / ", blocks, ", got ", rows);
  const ClusterLaunch launch(blocks, dim3(static_cast<unsigned>(rows * blocks)), dim3(ORDER_THREADS), smem,
                            c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, cluster_order_kernel, assignments.data_ptr<int64_t>(), static_cast<int>(N),
                                    static_cast<int>(num_clusters), order.data_ptr<int64_t>(),
                                    seg_start.data_ptr<int64_t>()));
  return {order, seg_start};
}

// A warp per cluster (segment_sum_warp_kernel) where the blocks per cluster would not all be resident
// at once and a warp takes at most this many passes over a cluster of the mean size (N / C and the
// passes rounded up, SEG_UNROLL x 32 / lanes_per_row members a pass). On an H200 at 32 rows and C =
// 100 (benchmarks/memory_kernels.py, NOTES thirty-ninth session) the warps won at up to 6 passes
// (bf16 D = 64 up to 8k, D = 128 and fp32 up to 4k, fp32 D = 128 at 2k) and lost from 7 on (bf16 D
// = 64 at 10k, D = 128 at 8k); at C = 32 (1024 blocks, one wave) the blocks won at every length.
// Those passes were the warp kernel's own, of SEG_UNROLL loads; since its SEG_WARP_UNROLL they are
// the rule's unit of cluster size (the same choices as measured).
constexpr int64_t SEG_WARP_MAX_PASSES = 6;

// Sum (mean if `mean`) of x's rows over each cluster's members, fp32 (B*H, C, E). `per_warp`: 1 a
// warp per cluster, 0 a block per cluster, -1 chosen by the shape (SEG_WARP_MAX_PASSES; the two
// sum in different orders, the tests run both). Rows that do not allow 16-byte loads take the scalar
// kernel (a block per cluster) either way.
at::Tensor segment_sum_cuda(const at::Tensor& x_in, const at::Tensor& order, const at::Tensor& seg_start, bool mean,
                            int64_t per_warp, const c10::optional<at::Tensor>& zero) {
  FCL_CHECK_CUDA(x_in, "segment_sum: x");
  TORCH_CHECK(x_in.dim() == 4, "segment_sum: x must be (B, H, N, E), got ", x_in.sizes());
  const int64_t B = x_in.size(0), H = x_in.size(1), N = x_in.size(2), E = x_in.size(3);
  TORCH_CHECK(E >= 1 && E <= SEG_THREADS, "segment_sum: width must be in 1..", SEG_THREADS, ", got ", E);
  TORCH_CHECK(order.is_contiguous() && order.scalar_type() == at::kLong && order.numel() == B * H * N,
              "segment_sum: order must be a contiguous int64 (B*H, N) permutation");
  TORCH_CHECK(seg_start.is_contiguous() && seg_start.scalar_type() == at::kLong && seg_start.dim() == 2 &&
                  seg_start.size(0) == B * H,
              "segment_sum: seg_start must be a contiguous int64 (B*H, C+1), got ", seg_start.sizes());
  if (zero.has_value()) {
    TORCH_CHECK(zero->device() == x_in.device() && zero->scalar_type() == at::kInt && zero->is_contiguous() &&
                    zero->numel() <= std::numeric_limits<int>::max(),
                "segment_sum: zero must be a contiguous int32 tensor on ", x_in.device(), ", got ",
                zero->scalar_type(), " on ", zero->device());
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = last_contig(x_in);
  const int64_t C = seg_start.size(1) - 1;
  at::Tensor out = at::empty({B * H, C, E}, x.options().dtype(at::kFloat));
  TORCH_CHECK(per_warp >= -1 && per_warp <= 1, "segment_sum: per_warp must be -1 (by the shape), 0 or 1, got ",
              per_warp);
  int* zero_at = zero.has_value() ? zero->data_ptr<int>() : nullptr;
  const int zero_count = zero.has_value() ? static_cast<int>(zero->numel()) : 0;
  if (out.numel() == 0) {
    if (zero_count > 0) zero->zero_();
    return out;
  }
  TORCH_CHECK(B * H <= 65535, "segment_sum: batch * heads must be <= 65535");
  auto stream = c10::cuda::getCurrentCUDAStream();
  FCL_DISPATCH_FLOAT(x.scalar_type(), "segment_sum", [&] {
    constexpr int VEC = 16 / sizeof(scalar_t);
    const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(B * H));
    // 16-byte loads need every row start 16-byte aligned: the base and every stride.
    if (E % VEC == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && x.stride(0) % VEC == 0 &&
        x.stride(1) % VEC == 0 && x.stride(2) % VEC == 0) {
      int lanes_per_row = 1;
      while (lanes_per_row * VEC < E) lanes_per_row *= 2;  // <= 32: E <= SEG_THREADS, VEC >= 4
      bool warps = per_warp == 1;
      if (per_warp == -1) {
        const int resident = resident_blocks(segment_sum_wide_kernel<scalar_t>, SEG_THREADS, 0);
        const int64_t per_pass = SEG_UNROLL * (32 / lanes_per_row);  // members of the measured rule's pass
        const int64_t passes = ((N + C - 1) / C + per_pass - 1) / per_pass;
        warps = B * H * C > static_cast<int64_t>(resident) * num_sms() && passes <= SEG_WARP_MAX_PASSES;
      }
      const auto kernel = warps ? segment_sum_warp_kernel<scalar_t> : segment_sum_wide_kernel<scalar_t>;
      const dim3 blocks(warps ? static_cast<unsigned>((C + SEG_THREADS / 32 - 1) / (SEG_THREADS / 32)) : grid.x, grid.y);
      launch_after_prior(kernel, blocks, dim3(SEG_THREADS), 0, stream, make_rows<const scalar_t>(x),
                         static_cast<int>(E), lanes_per_row, order.data_ptr<int64_t>(), seg_start.data_ptr<int64_t>(),
                         static_cast<int>(N), static_cast<int>(C), mean, out.data_ptr<float>(), zero_at, zero_count);
    } else {  // rows not 16-byte aligned (rare): the zeros take a launch of their own
      if (zero_count > 0) zero->zero_();
      segment_sum_kernel<scalar_t><<<grid, SEG_THREADS, 0, stream>>>(
          make_rows<const scalar_t>(x), static_cast<int>(E), order.data_ptr<int64_t>(), seg_start.data_ptr<int64_t>(),
          static_cast<int>(N), static_cast<int>(C), mean, out.data_ptr<float>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// out (B, H, N, E), any strides with a contiguous last dim: row assignments[b, h, n] of
// src (B*H, C, E) fp32, in out's dtype; zeros for -1.
void broadcast_into_cuda(const at::Tensor& src, const at::Tensor& assignments, const at::Tensor& out,
                         bool assignments_ready) {
  FCL_CHECK_CUDA(src, "broadcast: src");
  TORCH_CHECK(src.dim() == 3 && src.scalar_type() == at::kFloat && src.is_contiguous(),
              "broadcast: src must be a contiguous fp32 (B*H, C, E), got ", src.sizes(), " ", src.scalar_type());
  TORCH_CHECK(assignments.dim() == 3 && assignments.scalar_type() == at::kLong &&
                  assignments.size(0) * assignments.size(1) == src.size(0),
              "broadcast: assignments must be int64 (B, H, N) with B*H = ", src.size(0), ", got ", assignments.sizes());
  const int64_t C = src.size(1), E = src.size(2), N = assignments.size(2);
  check_rows(out, "broadcast: out", assignments.size(0), assignments.size(1), N, E);
  TORCH_CHECK(out.device() == src.device(), "broadcast: out must be on ", src.device(), ", got ", out.device());
  TORCH_CHECK(E <= 1 || out.stride(3) == 1, "broadcast: out's last dim must be contiguous, got strides ",
              out.strides());
  const c10::cuda::CUDAGuard guard(src.device());
  const at::Tensor a = assignments.contiguous();
  if (out.numel() == 0) return;
  const int64_t queries = a.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();
  FCL_DISPATCH_FLOAT(out.scalar_type(), "broadcast", [&] {
    constexpr int VEC = 16 / sizeof(scalar_t);
    // 16-byte pieces need every row start 16-byte aligned (the base and every stride of out,
    // and src's rows) and at most BROADCAST_THREADS pieces per row.
    const bool wide = E % VEC == 0 && E / VEC <= BROADCAST_THREADS &&
                      reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(src.data_ptr()) % 16 == 0 && out.stride(0) % VEC == 0 &&
                      out.stride(1) % VEC == 0 && out.stride(2) % VEC == 0;
    if (wide) {
      const int64_t per_block = (BROADCAST_THREADS / (E / VEC)) * BROADCAST_UNROLL;
      TORCH_CHECK(queries / N <= 65535, "broadcast: batch * heads must be <= 65535");
      const dim3 grid(static_cast<unsigned>((N + per_block - 1) / per_block), static_cast<unsigned>(queries / N));
      launch_after_prior(broadcast_rows_kernel<scalar_t>, grid, dim3(BROADCAST_THREADS), 0, stream,
                         src.data_ptr<float>(), a.data_ptr<int64_t>(), static_cast<int>(N), static_cast<int>(C),
                         static_cast<int>(E), make_rows<scalar_t>(out),
                         // a copy made here is the kernel just before: not ready early
                         assignments_ready && a.is_same(assignments));
    } else {
      const int blocks = static_cast<int>(std::min<int64_t>((queries * E + 255) / 256, 64LL * num_sms()));
      broadcast_kernel<scalar_t><<<std::max(blocks, 1), 256, 0, stream>>>(
          src.data_ptr<float>(), a.data_ptr<int64_t>(), queries, static_cast<int>(N), static_cast<int>(C),
          static_cast<int>(E), make_rows<scalar_t>(out));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// (B, H, N, E) contiguous in `dtype`: row assignments[b, h, n] of src (B*H, C, E) fp32; zeros for -1.
at::Tensor broadcast_cuda(const at::Tensor& src, const at::Tensor& assignments, at::ScalarType dtype) {
  TORCH_CHECK(assignments.dim() == 3, "broadcast: assignments must be (B, H, N), got ", assignments.sizes());
  TORCH_CHECK(src.dim() == 3, "broadcast: src must be (B*H, C, E), got ", src.sizes());
  at::Tensor out = at::empty({assignments.size(0), assignments.size(1), assignments.size(2), src.size(2)},
                             src.options().dtype(dtype));
  broadcast_into_cuda(src, assignments, out, false);
  return out;
}

namespace {
TopKeys make_top(const at::Tensor& top_index, const c10::optional<at::Tensor>& key_mask,
                 const c10::optional<at::Tensor>& drop_top, int64_t H, int64_t S) {
  TORCH_CHECK(top_index.dim() == 3 && top_index.is_contiguous() && top_index.scalar_type() == at::kLong,
              "improved: top_index must be a contiguous int64 (B*H, C, K), got ", top_index.sizes());
  TopKeys top{top_index.data_ptr<int64_t>(), nullptr, nullptr, static_cast<int>(H), static_cast<int>(S),
              static_cast<int>(top_index.size(2)), static_cast<int>(top_index.size(1))};
  if (key_mask.has_value()) {
    TORCH_CHECK(key_mask->is_contiguous() && key_mask->scalar_type() == at::kBool && key_mask->size(1) == S,
                "improved: key_padding_mask must be a contiguous bool (B, S=", S, ")");
    top.key_mask = key_mask->data_ptr<bool>();
  }
  if (drop_top.has_value()) {
    TORCH_CHECK(drop_top->is_contiguous() && drop_top->scalar_type() == at::kFloat &&
                    drop_top->sizes() == top_index.sizes(),
                "improved: drop_top must be a contiguous fp32 tensor shaped like top_index");
    top.drop = drop_top->data_ptr<float>();
  }
  return top;
}
}  // namespace

// mode 0: out (B, H, N, D) = mass * exact + rest. mode 1: gm (B*H, N) fp32 = grad_out . exact.
at::Tensor improved_exact_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                   const c10::optional<at::Tensor>& grad_out_in, const at::Tensor& assignments,
                                   const at::Tensor& order, const at::Tensor& top_index,
                                   const c10::optional<at::Tensor>& key_mask, const c10::optional<at::Tensor>& drop_top,
                                   const at::Tensor& mass, const at::Tensor& rest, double scale) {
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3), S = k_in.size(2);
  check_rows(q_in, "improved_exact_fwd: query", B, H, N, D);
  check_rows(k_in, "improved_exact_fwd: key", B, H, S, D);
  check_rows(v_in, "improved_exact_fwd: value (value dim must equal the head dim)", B, H, S, D);
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(),
              "improved_exact_fwd: query, key and value must share a dtype");
  TORCH_CHECK(assignments.is_contiguous() && order.is_contiguous(), "improved_exact_fwd: assignments/order must be contiguous");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_contig(q_in), k = last_contig(k_in), v = last_contig(v_in);
  const bool grad_mode = grad_out_in.has_value();
  at::Tensor g = grad_mode ? last_contig(*grad_out_in) : q;
  if (grad_mode) check_rows(g, "improved_exact_fwd: grad_out", B, H, N, D);
  TopKeys top = make_top(top_index, key_mask, drop_top, H, S);
  TORCH_CHECK(mass.is_contiguous() && rest.is_contiguous() && mass.scalar_type() == at::kFloat &&
                  rest.scalar_type() == at::kFloat,
              "improved_exact_fwd: mass and rest must be contiguous fp32");
  at::Tensor out = grad_mode ? at::empty({B * H, N}, q.options().dtype(at::kFloat)) : at::empty({B, H, N, D}, q.options());
  if (B * H * N == 0) return out;
  TORCH_CHECK(B * H <= 65535, "improved_exact_fwd: batch * heads must be <= 65535");
  constexpr int warps = 4;
  const bool cache = top.topk <= 32;
  const int per_warp = warps_per_query_run(B * H * N);
  const int64_t warps_per_row = (N + per_warp - 1) / per_warp;
  const dim3 grid(static_cast<unsigned>((warps_per_row + warps - 1) / warps), static_cast<unsigned>(B * H));
  auto stream = c10::cuda::getCurrentCUDAStream();
  FCL_DISPATCH_FLOAT(q.scalar_type(), "improved_exact_fwd", [&] {
    FCL_DISPATCH_DIM(D, "improved_exact_fwd", [&] {
      auto kernel = grad_mode ? (cache ? improved_exact_fwd_kernel<1, true, VPL, scalar_t>
                                       : improved_exact_fwd_kernel<1, false, VPL, scalar_t>)
                              : (cache ? improved_exact_fwd_kernel<0, true, VPL, scalar_t>
                                       : improved_exact_fwd_kernel<0, false, VPL, scalar_t>);
      const size_t smem = cache ? static_cast<size_t>(warps) * 2 * 32 * D * sizeof(scalar_t) : 0;
      ensure_smem(kernel, smem);
      kernel<<<grid, warps * 32, smem, stream>>>(
          make_rows<const scalar_t>(q), make_rows<const scalar_t>(k), make_rows<const scalar_t>(v),
          make_rows<const scalar_t>(g), assignments.data_ptr<int64_t>(), order.data_ptr<int64_t>(), top,
          mass.data_ptr<float>(), rest.data_ptr<float>(), static_cast<int>(N), per_warp, static_cast<float>(scale),
          grad_mode ? nullptr : out.data_ptr<scalar_t>(), grad_mode ? out.data_ptr<float>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// Returns dq (B, H, N, D); adds the top-key contributions into dk32 / dv32 (B*H, S, D) fp32.
at::Tensor improved_exact_bwd_cuda(const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in,
                                   const at::Tensor& v_in, const at::Tensor& assignments, const at::Tensor& order,
                                   const at::Tensor& top_index, const c10::optional<at::Tensor>& key_mask,
                                   const c10::optional<at::Tensor>& drop_top, const at::Tensor& mass,
                                   const at::Tensor& dq_bar, double scale, at::Tensor dk32, at::Tensor dv32) {
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3), S = k_in.size(2);
  check_rows(q_in, "improved_exact_bwd: query", B, H, N, D);
  check_rows(grad_out_in, "improved_exact_bwd: grad_out", B, H, N, D);
  check_rows(k_in, "improved_exact_bwd: key", B, H, S, D);
  check_rows(v_in, "improved_exact_bwd: value", B, H, S, D);
  TORCH_CHECK(dk32.is_contiguous() && dv32.is_contiguous() && dk32.scalar_type() == at::kFloat &&
                  dv32.scalar_type() == at::kFloat && dk32.numel() == B * H * S * D && dv32.numel() == B * H * S * D,
              "improved_exact_bwd: dk32 / dv32 must be contiguous fp32 (B*H, S, D)");
  TORCH_CHECK(dq_bar.is_contiguous() && dq_bar.scalar_type() == at::kFloat, "improved_exact_bwd: dq_bar must be contiguous fp32");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_contig(q_in), k = last_contig(k_in), v = last_contig(v_in), g = last_contig(grad_out_in);
  TopKeys top = make_top(top_index, key_mask, drop_top, H, S);
  at::Tensor dq = at::empty({B, H, N, D}, q.options());
  if (B * H * N == 0) return dq;
  TORCH_CHECK(B * H <= 65535, "improved_exact_bwd: batch * heads must be <= 65535");
  const bool agg = top.topk <= 32;
  // Shared memory per warp with AGG: fp32 sums (2 x 32 x D) and the key / value cache.
  const size_t warp_bytes = agg ? static_cast<size_t>(2 * 32 * D) * (sizeof(float) + q.element_size()) : 0;
  const int warps = agg ? static_cast<int>(std::max<size_t>(1, std::min<size_t>(4, (160 * 1024) / warp_bytes))) : 4;
  const int per_warp = warps_per_query_run(B * H * N);
  const int64_t warps_per_row = (N + per_warp - 1) / per_warp;
  const dim3 grid(static_cast<unsigned>((warps_per_row + warps - 1) / warps), static_cast<unsigned>(B * H));
  const size_t smem = static_cast<size_t>(warps) * warp_bytes;
  auto stream = c10::cuda::getCurrentCUDAStream();
  FCL_DISPATCH_FLOAT(q.scalar_type(), "improved_exact_bwd", [&] {
    FCL_DISPATCH_DIM(D, "improved_exact_bwd", [&] {
      auto kernel = agg ? improved_exact_bwd_kernel<true, VPL, scalar_t> : improved_exact_bwd_kernel<false, VPL, scalar_t>;
      ensure_smem(kernel, smem);
      kernel<<<grid, warps * 32, smem, stream>>>(
          make_rows<const scalar_t>(g), make_rows<const scalar_t>(q), make_rows<const scalar_t>(k),
          make_rows<const scalar_t>(v), assignments.data_ptr<int64_t>(), order.data_ptr<int64_t>(), top,
          mass.data_ptr<float>(), dq_bar.data_ptr<float>(), static_cast<int>(N), per_warp, static_cast<float>(scale),
          dq.data_ptr<scalar_t>(), dk32.data_ptr<float>(), dv32.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return dq;
}

}  // namespace fcl
