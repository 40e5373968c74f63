// Hashing and Lloyd's k-means in Hamming space.
//
// Lloyd runs without a host synchronisation: per iteration one launch assigns the
// queries of a chunk to their nearest centroid and accumulates, per cluster, the
// member count and the number of members differing from the centroid in each bit (shared-memory atomics,
// then one global atomic per non-zero counter); a small update launch turns the
// counts into majority bits and zeroes the counters for the next iteration. Integer
// atomics make the result independent of the execution order.
//
// Nearest centroids on tensor cores (C <= 128, sm_80 and newer): a query and a centroid agree on
// popcount(x & c) + popcount(~x & ~c) of their bits, and the nearest centroid is the one that
// agrees most. A warp takes 16 queries against all centroids with 1-bit mma.sync (AND, then
// population counts summed: 16 queries x 8 centroids x the 64 bits and their 64 complements per
// instruction, exact in int32) where the fallback kernels compute two 32-bit population counts per
// (query, centroid) pair. Until the twenty-seventh session the products were int8 ones of the
// bits as +-1 bytes (two per tile of 8 centroids, the bytes built from each code per query, and a
// guard against padded centroids in every tile): the one-launch kernel's loop over a warp's 16
// queries at C = 100 took 416 instructions, 159 now (SASS). The centroids' fragments sit in shared
// memory, built once per block: in registers they left room for 16 warps per SM, too few to hide
// the search's latency (ncu: 0.87 eligible warps per scheduler); now 32 fit (benchmarks/NOTES.md,
// twenty-fifth session).
//
// One launch for all of Lloyd (sm_90, C <= 128: lloyd_cluster_kernel): a thread block cluster per
// row, its blocks summing their counters through distributed shared memory between two cluster
// barriers per iteration. It saves the 2 x iterations launches and the counters' global atomics
// where its clusters fill the GPU: 32 rows of 1k / 2k / 4k in 65 / 94 / 133 us instead of 102 / 111 /
// 145, 256 rows of 16k in 2.10 ms instead of 3.06 (benchmarks/NOTES.md, twenty-sixth session).
// Since the twenty-seventh session it counts each cluster's members and their set bits as 1-bit
// tensor-core products (membership bits AND the codes' transposed bits) instead of one
// shared-memory atomic per bit in which a member differs from its centroid.
#include "cluster_order.cuh"
#include "common.cuh"

#include <algorithm>
#include <string>
#include <type_traits>

namespace fcl {
namespace {

constexpr int HASH_THREADS = 128;
constexpr int MAX_BITS = 64;  // counters per cluster: 63 bits + the member count in slot 63
constexpr int COUNT_SLOT = 63;
constexpr int COUNTER_STRIDE = 65;  // padding: cluster c's counters start in bank c
// lloyd_cluster_kernel's counters are 16 bits, two to a 32-bit word (bits 2k and 2k + 1; the member
// count, slot 63, in word 31's high half): the update reads them from the cluster's other blocks,
// which takes longer the more bytes cross between SMs (three times the bytes took three times as
// long, thirty-first session). With half the bytes, and the loads issued together (the update
// below), the loads took 0.63 us per iteration at 32 rows of 2k in 3 blocks against 0.85 with
// 32-bit counters (forty-first session). A block counts at most its slice's queries, so slices are
// limited to MAX_CLUSTER_SLICE. Rows of 36 words: whole 16-byte rows, and 36 = 4 (mod 32), so that
// count_by_products' stores (8 rows x 4 consecutive words per warp) fall in 32 different banks.
constexpr int CLUSTER_COUNTER_WORDS = 36;
constexpr int MAX_CLUSTER_SLICE = 65535;

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
  int64_t heads;      // (64 bits: three ints would leave 4 bytes of padding)
  int length, clusters;
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
FCL_NO_PADDING(RowInfo);

// Bit `bit` of a centroid after the majority update, from its old value, its member count and
// how many members have it set (`ones`): set where more than half of the members have it set,
// cleared where fewer than half do; ties, empty clusters and bits >= `bits` keep the old bit.
__device__ __forceinline__ bool majority_of(bool old_bit, int bit, int bits, int members, int ones) {
  const int twice = 2 * ones;
  const bool decided = (bit < bits) & (twice != members);  // a select, not branches: the update runs it 4x per lane
  return decided ? twice > members : old_bit;
}

// The same from how many members differ from the old code `old` in that bit.
__device__ __forceinline__ bool majority_bit(int64_t old, int bit, int bits, int members, int differ) {
  const bool set = (static_cast<uint64_t>(old) >> bit) & 1;
  return majority_of(set, bit, bits, members, set ? members - differ : differ);
}

// Centroid j's initial code: the code of the valid query of rank floor(j * valid / C), or in
// rows with at most C valid queries, of rank j (0 past the last one). `row_codes`: the row's N.
__device__ __forceinline__ int64_t initial_centroid(const RowInfo& info, int b, int j, int nv,
                                                   const int64_t* row_codes) {
  if (nv <= info.clusters) return j < nv ? row_codes[info.position_of_rank(b, j)] : 0;
  const int r = static_cast<int>((static_cast<int64_t>(j) * nv) / info.clusters);
  return row_codes[info.position_of_rank(b, r)];
}

__global__ void lloyd_init_kernel(RowInfo info, const int64_t* __restrict__ codes,
                                  int64_t* __restrict__ centroids) {
  const int64_t bh = blockIdx.y;
  const int b = static_cast<int>(bh / info.heads);
  const int nv = info.num_valid(b);
  const int C = info.clusters;
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < C; j += gridDim.x * blockDim.x) {
    centroids[bh * C + j] = initial_centroid(info, b, j, nv, codes + bh * info.length);
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

// Centroid slots in shared memory: C padded to an even count plus one pair, since the compiler
// reads them in 16-byte pairs.
__host__ __device__ __forceinline__ int padded_clusters(int C) { return ((C + 1) / 2) * 2 + 2; }

// ------------------------------------------------- nearest centroids on tensor cores
// 16 warps per block, two blocks per SM: the nearest-centroid search is bound by latency (a
// warp's chain of products and maxima), so it wants many resident warps.
constexpr int MMA_THREADS = 512;
constexpr int MMA_MAX_CLUSTERS = 128;  // centroid tiles of 8, their fragments in shared memory
constexpr int MAX_CLUSTER_BLOCKS = 8;  // blocks per row of lloyd_cluster_kernel: the portable cluster size
static_assert(MMA_MAX_CLUSTERS <= MAX_ORDER_CLUSTERS, "the one-launch kernel sorts its assignments itself");
constexpr int UPDATE_LANES = 16;  // lloyd_cluster_kernel's update: lanes per centroid, 4 bits each
constexpr int LOADS_IN_FLIGHT = 4;  // lloyd_cluster_kernel's update: counter loads from other blocks issued together
static_assert(UPDATE_LANES * 4 == MAX_BITS && CLUSTER_COUNTER_WORDS % 4 == 0 && CLUSTER_COUNTER_WORDS % 32 == 4 &&
              2 * CLUSTER_COUNTER_WORDS >= MAX_BITS);
constexpr int CLUSTER_THREADS = 1024;  // lloyd_cluster_kernel's block: one per SM
constexpr int CLUSTER_CACHED_CODES = 8192;  // a block's slice of codes (and their transpose) kept up to this many
constexpr int COUNT_ROUND = 2048;  // lloyd_cluster_kernel's queries per counting round (their membership bits)

// The 32 of a code's 128 positions in the search's products that lane t of a quad holds (the
// products run over the code's 64 bits, then their complements, so that AND with a centroid's
// positions counts the bits where both are set plus those where both are clear): t = 0 / 1 hold
// bits 0..31 / 32..63, t = 2 / 3 their complements.
__device__ __forceinline__ uint32_t code_quarter(uint64_t code, int t) {
  const uint32_t half = static_cast<uint32_t>(code >> (32 * (t & 1)));
  return t & 2 ? ~half : half;
}

// Which of code_quarter's 32 positions are among the code's `bits` (the rest are zeroed in the
// centroids' quarters: no vote).
__device__ __forceinline__ uint32_t used_quarter(int t, int bits) {
  const int used = bits - 32 * (t & 1);
  return used >= 32 ? ~0u : used <= 0 ? 0u : (1u << used) - 1u;
}

// D += A (16 x 128 bits, row-major) x B (128 x 8 bits, column-major) with AND for the products and
// population counts for the sums: how many of the 128 positions hold a 1 in both.
__device__ __forceinline__ void mma_and_popc_k128(int (&d)[4], const uint32_t (&a)[2], uint32_t b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(b));
#else
  __trap();  // the host launches these kernels on sm_80 and newer only
#endif
}

// The same over 256 positions: A 16 x 256 bits, B 256 x 8 bits.
__device__ __forceinline__ void mma_and_popc_k256(int (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();  // the host launches these kernels on sm_80 and newer only
#endif
}

// Centroid tiles of 8 in groups of 4: a lane loads the fragments of 4 tiles with one 16-byte load.
__host__ __device__ __forceinline__ int fragment_groups(int tiles) { return (tiles + 3) / 4; }

// Shared memory of the centroids' fragments: 32 lanes x 16 bytes per group of 4 tiles.
__host__ __device__ __forceinline__ size_t mma_fragment_bytes(int tiles) {
  return static_cast<size_t>(fragment_groups(tiles)) * 32 * 16;
}

// The B fragments of the centroids (mma.m16n8k128 layout), every lane's, into shared memory:
// component i of `frags[32 group + lane]` is lane's register of centroid tile 4 group + i: the
// code_quarter(lane % 4) of centroid 8 tile + lane / 4, its unused bits cleared. Padded centroids
// are zero: they agree with no query in any position, so they never beat a real centroid (whose
// ids are lower, and ties go to the lowest id). Written by the whole block (a barrier before their
// use); a warp then reads 4 tiles' fragments with one conflict-free 16-byte load per lane.
template <int TILES>
__device__ __forceinline__ void store_centroid_fragments(const int64_t* cent, int C, int bits, uint4* frags) {
  uint32_t* words = reinterpret_cast<uint32_t*>(frags);
  for (int w = threadIdx.x; w < fragment_groups(TILES) * 32 * 4; w += blockDim.x) {
    const int lane = (w >> 2) & 31, tile = (w >> 7) * 4 + (w & 3);
    const int j = tile * 8 + (lane >> 2), t = lane & 3;
    words[w] = j < C ? code_quarter(static_cast<uint64_t>(cent[j]), t) & used_quarter(t, bits) : 0u;
  }
}

// Where store_centroid_fragments puts centroid j's code_quarter(t): its inverse.
__device__ __forceinline__ uint32_t* centroid_fragment_word(uint4* frags, int j, int t) {
  const int tile = j >> 3, lane = ((j & 7) << 2) | t;
  return reinterpret_cast<uint32_t*>(frags) + (tile >> 2) * 128 + lane * 4 + (tile & 3);
}

// Nearest centroid (ties: lowest id) of the warp's queries lane / 4 (code `lo`) and lane / 4 + 8
// (code `hi`); every lane of a quad gets both. One 1-bit product per tile of 8 centroids counts
// the bits on which each query and centroid agree. Keys are agreement * 128 + 127 - id, so the
// largest key has the most agreeing bits and, among those, the lowest id. A query agrees with a
// centroid on at most 63 bits (the unused ones are cleared in the centroids' fragments), so a key
// is below 2^13: the lo and hi queries' keys share a register as its two 16-bit halves, and one
// 3-input maximum of 16-bit pairs takes a tile's four keys. The search is bound by integer
// instructions (benchmarks/NOTES.md, thirty-seventh session), and with separate keys those maxima
// and the keys' shifts were most of them.
template <int TILES>
__device__ __forceinline__ void nearest16(uint64_t lo, uint64_t hi, const uint4* frags, int lane,
                                          int& nearest_lo, int& nearest_hi) {
  const int t = lane & 3;
  const uint32_t a[2] = {code_quarter(lo, t), code_quarter(hi, t)};  // rows lane / 4 and lane / 4 + 8
  constexpr uint32_t BOTH = 0x10001u;  // a value in both halves
  uint32_t best = 0x80008000u;  // both halves -2^15, below every key
#pragma unroll
  for (int group = 0; group < fragment_groups(TILES); ++group) {
    const uint4 f = frags[group * 32 + lane];
    const uint32_t b[4] = {f.x, f.y, f.z, f.w};
#pragma unroll
    for (int i = 0; i < 4 && group * 4 + i < TILES; ++i) {
      const int tile = group * 4 + i;
      int d[4] = {0, 0, 0, 0};  // (lo, id 2t), (lo, 2t + 1), (hi, 2t), (hi, 2t + 1) of the tile
      mma_and_popc_k128(d, a, b[i]);
      // 127 - id without this lane's 2t, subtracted once below (the same for all its keys).
      const uint32_t tie = 127 - tile * 8;
      const uint32_t even = ((static_cast<uint32_t>(d[2]) << 16) + d[0]) * 128 + tie * BOTH;  // (hi, lo) keys of id 2t
      const uint32_t odd = ((static_cast<uint32_t>(d[3]) << 16) + d[1]) * 128 + (tie - 1) * BOTH;  // of 2t + 1
      best = __vimax3_s16x2(best, even, odd);
    }
  }
  best -= 2 * t * BOTH;  // no borrow: each half is at least 127 - 8 * 15 - 1 >= 2t
#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) best = __vmaxs2(best, __shfl_xor_sync(FULL_MASK, best, off));
  nearest_lo = 127 - (best & 127);
  nearest_hi = 127 - ((best >> 16) & 127);
}

// The final assignments of a warp's 16 queries lane / 4 (`n_lo`, code `lo`) and lane / 4 + 8
// (`n_hi`, code `hi`) of row bh, those below `stop`: -1 for padded queries, the rank in a row
// with at most C valid queries (`single`), else the nearest centroid.
template <int TILES>
__device__ __forceinline__ void assign16(const RowInfo& info, int b, int64_t bh, bool single, int n_lo, int n_hi,
                                         int stop, uint64_t lo, uint64_t hi, const uint4* frags,
                                         int64_t* assignments, int lane) {
  const int t = lane & 3;
  int nearest_lo = 0, nearest_hi = 0;
  if (!single) nearest16<TILES>(lo, hi, frags, lane, nearest_lo, nearest_hi);
  if (t < 2) {  // lane t = 0 writes query lo, t = 1 query hi
    const int n = t == 0 ? n_lo : n_hi;
    if (n < stop) {
      int64_t a = -1;
      if (info.valid(b, n)) a = single ? info.rank(b, n) : (t == 0 ? nearest_lo : nearest_hi);
      assignments[bh * info.length + n] = a;
    }
  }
}

// A warp's counting of its 16 queries lane / 4 (`n_lo`, code `lo`) and lane / 4 + 8 (`n_hi`,
// code `hi`) of row b, those valid and below `stop`, into a block's shared counters `counts`
// (COUNTER_STRIDE per cluster): each member adds one to its cluster's member count and one per
// bit in which it differs from the centroid `cent[j]` (far fewer than its set bits once the
// centroids settle, so far fewer atomics). The four lanes of a quad split the bits: lane t
// counts bits 16 t .. 16 t + 15 of both queries.
__device__ __forceinline__ void count_members16(const RowInfo& info, int b, int n_lo, int n_hi, int stop,
                                                uint64_t lo, uint64_t hi, int nearest_lo, int nearest_hi,
                                                const int64_t* cent, int* counts, int lane) {
  const int t = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int n = h ? n_hi : n_lo;
    if (n >= stop || !info.valid(b, n)) continue;
    const int j = h ? nearest_hi : nearest_lo;
    int* cj = counts + j * COUNTER_STRIDE;
    if (t == 0) atomicAdd(cj + COUNT_SLOT, 1);
    uint32_t rest = static_cast<uint32_t>(((h ? hi : lo) ^ static_cast<uint64_t>(cent[j])) >> (16 * t)) & 0xFFFFu;
    while (rest) {
      atomicAdd(cj + 16 * t + (__ffs(rest) - 1), 1);
      rest &= rest - 1;
    }
  }
}

// Adds a block's shared counters (C x COUNTER_STRIDE) into the row's global ones (C x MAX_BITS),
// one atomic per non-zero counter. After the block's counting and a barrier.
__device__ __forceinline__ void add_block_counts(const int* counts, int* row_counters, int C) {
  for (int i = threadIdx.x; i < C * MAX_BITS; i += blockDim.x) {
    const int v = counts[(i / MAX_BITS) * COUNTER_STRIDE + i % MAX_BITS];
    if (v != 0) atomicAdd(row_counters + i, v);
  }
}

// Calls `visit(n_lo, n_hi, lo, hi)` for the block's queries start .. stop - 1 of a row, each warp
// taking 16 consecutive ones at a time: queries n_lo = base + lane / 4 and n_hi = n_lo + 8 with
// codes `lo` and `hi` (0 at and past `stop`, which the visitors skip). `slice[i]`: the code of
// query start + i. The next tile's codes are loaded before this tile's products: a warp's loop is
// a chain of short tiles, and a load's latency would otherwise stall each of them. Blocks of THREADS.
template <int THREADS, typename Visit>
__device__ __forceinline__ void for_query_tiles(const int64_t* slice, int start, int stop, Visit visit) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2;
  constexpr int STRIDE = 16 * (THREADS / 32);
  auto code_at = [&](int n) { return n < stop ? static_cast<uint64_t>(slice[n - start]) : uint64_t(0); };
  uint64_t next_lo = code_at(start + 16 * warp + g), next_hi = code_at(start + 16 * warp + g + 8);
  for (int base = start + 16 * warp; base < stop; base += STRIDE) {  // uniform per warp
    const int n_lo = base + g, n_hi = base + g + 8;
    const uint64_t lo = next_lo, hi = next_hi;
    next_lo = code_at(n_lo + STRIDE);
    next_hi = code_at(n_hi + STRIDE);
    visit(n_lo, n_hi, lo, hi);
  }
}

// Shared memory of the tensor-core kernels: the centroids' fragments, the centroids (padded), then
// the counters (C x `stride` ints, 16-byte aligned) where the kernel counts.
template <int TILES>
struct MmaSmem {
  uint4* frags;
  int64_t* cent;
  int* counts;
  __device__ __forceinline__ explicit MmaSmem(int64_t* base, int C)
      : frags(reinterpret_cast<uint4*>(base)),
        cent(reinterpret_cast<int64_t*>(reinterpret_cast<char*>(base) + mma_fragment_bytes(TILES))),
        counts(reinterpret_cast<int*>(cent + padded_clusters(C))) {}
  __host__ __device__ static size_t bytes(int C, bool counting, int stride = COUNTER_STRIDE) {
    return mma_fragment_bytes(TILES) + static_cast<size_t>(padded_clusters(C)) * sizeof(int64_t) +
           (counting ? static_cast<size_t>(C) * stride * sizeof(int) : 0);
  }
};

// Lloyd's assign + count (FINAL false) or final assignment (FINAL true) with nearest16: the
// same contract as lloyd_assign_kernel<true> / lloyd_final_kernel. Warps take 16 consecutive
// queries at a time and count them with count_members16.
template <int TILES, bool FINAL>
__global__ void __launch_bounds__(MMA_THREADS, 2) lloyd_mma_kernel(RowInfo info, const int64_t* __restrict__ codes,
                                                                const int64_t* __restrict__ centroids, int chunk,
                                                                int bits, int* __restrict__ counters,
                                                                int64_t* __restrict__ assignments) {
  extern __shared__ int64_t smem_mma[];
  const int64_t bh = blockIdx.y;
  const int b = static_cast<int>(bh / info.heads);
  const bool single = info.singleton(b);  // uniform over the block
  if (!FINAL && single) return;
  const int C = info.clusters;
  const MmaSmem<TILES> sm(smem_mma, C);
  if (!single) {
    for (int j = threadIdx.x; j < C; j += blockDim.x) sm.cent[j] = centroids[bh * C + j];
  }
  if (!FINAL) {
    for (int i = threadIdx.x; i < C * COUNTER_STRIDE; i += blockDim.x) sm.counts[i] = 0;
  }
  __syncthreads();
  if (!single) {  // uniform over the block
    store_centroid_fragments<TILES>(sm.cent, C, bits, sm.frags);
    __syncthreads();
  }
  const int lane = threadIdx.x & 31;
  const int start = blockIdx.x * chunk;
  const int stop = min(start + chunk, info.length);
  for_query_tiles<MMA_THREADS>(codes + bh * info.length + start, start, stop,
                               [&](int n_lo, int n_hi, uint64_t lo, uint64_t hi) {
    if (FINAL) {
      assign16<TILES>(info, b, bh, single, n_lo, n_hi, stop, lo, hi, sm.frags, assignments, lane);
    } else {
      int nearest_lo, nearest_hi;
      nearest16<TILES>(lo, hi, sm.frags, lane, nearest_lo, nearest_hi);
      count_members16(info, b, n_lo, n_hi, stop, lo, hi, nearest_lo, nearest_hi, sm.cent, sm.counts, lane);
    }
  });
  if (!FINAL) {
    __syncthreads();
    add_block_counts(sm.counts, counters + bh * C * MAX_BITS, C);
  }
}

// ------------------------------------- Lloyd in one launch: counting by 1-bit products
// A cluster's members that have a bit set are a 1-bit product: the cluster's membership bits
// (one per query) AND the bit's row of the codes (bit i of a query's code, one per query),
// summed. mma.m16n8k256 with AND and population counts takes 16 clusters x 8 bits x 256 queries
// per instruction, where counting each member's bits with shared-memory atomics took about one
// atomic per bit in which it differs from its centroid. The codes' bits are transposed once, the
// membership bits set by one atomic OR per member.

// Clusters of the membership rows: C padded to the 16 rows of an mma tile.
template <int TILES>
constexpr int membership_rows() { return (TILES * 8 + 15) / 16 * 16; }

// lloyd_cluster_kernel's shared memory past MmaSmem, worked out once by the host for a launch
// (cluster_layout) and passed to the kernel, so the two cannot disagree.
struct ClusterLayout {
  int chunk;         // queries per block: whole tiles of 16
  int round;         // queries per counting round: a multiple of 256 (one product's depth)
  int mask_stride;   // words per cluster's membership row: round / 32 + 4 (conflict-free loads)
  int bit_stride;    // words per row of the transposed codes: the slice's or a round's, + 4
  int whole_slice;   // 1: the slice's codes and their transpose kept for all iterations (an int: no padding)
  int masks_at, bits_at, codes_at, bytes;  // byte offsets into the dynamic shared memory, its size
  int order_at;      // where the sort of the final assignments works (over the counters and what follows)
};
FCL_NO_PADDING(ClusterLayout);

// Queries per block of lloyd_cluster_kernel in rows of `length` at `cluster_blocks` blocks per row:
// whole tiles of 16.
__host__ __forceinline__ int64_t cluster_chunk(int64_t length, int64_t cluster_blocks) {
  return ((length + cluster_blocks - 1) / cluster_blocks + 15) / 16 * 16;
}

// Whether lloyd_cluster_kernel's 16-bit counters hold every count of a block in such rows.
__host__ __forceinline__ bool cluster_slices_fit(int64_t length, int64_t cluster_blocks) {
  return std::min(cluster_chunk(length, cluster_blocks), length) <= MAX_CLUSTER_SLICE;
}

// The fewest blocks per row (1..MAX_CLUSTER_BLOCKS) whose slices fit the 16-bit counters, 0 where
// none do. Not ceil(length / MAX_CLUSTER_SLICE): slices are rounded up to tiles of 16, so 131070
// queries in 2 blocks give slices of 65536. More blocks never give larger slices.
__host__ inline int64_t fewest_fitting_cluster_blocks(int64_t length) {
  for (int64_t blocks = 1; blocks <= MAX_CLUSTER_BLOCKS; ++blocks) {
    if (cluster_slices_fit(length, blocks)) return blocks;
  }
  return 0;
}

// What lloyd_kmeans' refusal of too few blocks per row for `length` queries suggests instead.
__host__ inline std::string fitting_cluster_blocks_hint(int64_t length) {
  const int64_t fewest = fewest_fitting_cluster_blocks(length);
  if (fewest == 0) return "no cluster_blocks up to " + std::to_string(MAX_CLUSTER_BLOCKS) + " fits; pass cluster_blocks=0";
  return "pass cluster_blocks = " + std::to_string(fewest) + ".." + std::to_string(MAX_CLUSTER_BLOCKS) +
         " or cluster_blocks=0";
}

template <int TILES>
ClusterLayout cluster_layout(int length, int C, int cluster_blocks) {
  auto align16 = [](size_t bytes) { return (bytes + 15) / 16 * 16; };
  ClusterLayout layout;
  layout.chunk = static_cast<int>(cluster_chunk(length, cluster_blocks));
  layout.whole_slice = layout.chunk <= CLUSTER_CACHED_CODES;
  const int slice_words = (layout.chunk + 255) / 256 * 8;  // whole products of 256 queries
  layout.round = std::min(COUNT_ROUND, slice_words * 32);
  layout.mask_stride = layout.round / 32 + 4;
  layout.bit_stride = (layout.whole_slice ? slice_words : layout.round / 32) + 4;
  size_t at = align16(MmaSmem<TILES>::bytes(C, true, CLUSTER_COUNTER_WORDS));
  layout.masks_at = static_cast<int>(at);
  at = align16(at + sizeof(uint32_t) * membership_rows<TILES>() * layout.mask_stride);
  layout.bits_at = static_cast<int>(at);
  at = align16(at + sizeof(uint32_t) * MAX_BITS * layout.bit_stride);
  layout.codes_at = static_cast<int>(at);
  if (layout.whole_slice) at += sizeof(int64_t) * layout.chunk;
  layout.order_at = static_cast<int>(MmaSmem<TILES>::bytes(C, false));  // the counters' start: 16-byte aligned
  layout.bytes = static_cast<int>(std::max(at, layout.order_at + order_smem_bytes(C)));
  return layout;
}

// The 32 x 32 bit matrix whose row l is lane l's `row`, transposed: lane l gets column l (bit i
// is bit l of lane i's row). Five exchanges between lanes, each swapping the off-diagonal
// blocks of a level: halves, quarters, ... single bits.
__device__ __forceinline__ uint32_t transpose32(uint32_t row, int lane) {
  uint32_t low = 0x0000FFFFu;  // the positions of the level's low blocks
#pragma unroll
  for (int j = 16; j > 0; j >>= 1, low ^= low << j) {
    const uint32_t other = __shfl_xor_sync(FULL_MASK, row, j);
    row = (lane & j) ? (row & ~low) | ((other & ~low) >> j) : (row & low) | ((other & low) << j);
  }
  return row;
}

// The bit rows of `groups` groups of 32 queries from `first` (`codes[i]`: query first + i; 0 from
// `stop` on): bit i of bits[b * stride + g] is bit b of query first + 32 g + i, and row COUNT_SLOT
// is all ones (the codes have at most 63 bits: its product counts the members). A warp per group.
__device__ __forceinline__ void transpose_codes(const int64_t* codes, int first, int stop, int groups,
                                                uint32_t* bits, int stride) {
  const int lane = threadIdx.x & 31;
  for (int group = threadIdx.x >> 5; group < groups; group += blockDim.x >> 5) {  // uniform per warp
    const int n = first + 32 * group + lane;
    const uint64_t code = n < stop ? static_cast<uint64_t>(codes[n - first]) : 0;
    const uint32_t low_bits = transpose32(static_cast<uint32_t>(code), lane);
    const uint32_t high_bits = transpose32(static_cast<uint32_t>(code >> 32), lane);
    bits[lane * stride + group] = low_bits;
    bits[(32 + lane) * stride + group] = 32 + lane == COUNT_SLOT ? ~0u : high_bits;
  }
}

// Sets the membership bits of a warp's 16 queries (nearest16's layout), those valid and below
// `stop`: bit i % 32 of word i / 32 of cluster j's row in `masks`, i = n - first.
__device__ __forceinline__ void mark_members16(const RowInfo& info, int b, int n_lo, int n_hi, int stop,
                                               int nearest_lo, int nearest_hi, int first, uint32_t* masks,
                                               int stride, int lane) {
  const int t = lane & 3;
  if (t >= 2) return;  // lane t = 0 marks query lo, t = 1 query hi
  const int n = t == 0 ? n_lo : n_hi;
  if (n < stop && info.valid(b, n)) {
    const int i = n - first;
    atomicOr(masks + (t == 0 ? nearest_lo : nearest_hi) * stride + (i >> 5), 1u << (i & 31));
  }
}

// Adds to `counts` (C x CLUSTER_COUNTER_WORDS words of two 16-bit counters; stores where `first_round`,
// so that the counters need no clearing), for a round of `words` words of 32 queries (a multiple
// of 8), how many members of each cluster have each bit set, and in slot COUNT_SLOT how many
// members it has: the 1-bit products of the membership rows (`masks`) and the codes' bit rows
// (`bits`, row COUNT_SLOT all ones). Warp w takes clusters 16 (w / 4) .. + 15 and bits 16 (w % 4)
// .. + 15, so each counter has one writer and needs no atomic. After a barrier that completes
// `masks` and `bits`; blocks of at least 4 x membership_rows / 16 warps. A round's counts are at
// most its 2048 queries and a slice's at most MAX_CLUSTER_SLICE, so no half carries into the other.
template <int TILES>
__device__ __forceinline__ void count_by_products(const uint32_t* masks, int mask_stride, const uint32_t* bits,
                                                  int bit_stride, int words, int C, bool first_round,
                                                  uint32_t* counts) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int first_cluster = 16 * (warp >> 2), first_bit = 16 * (warp & 3);
  if (first_cluster >= membership_rows<TILES>()) return;  // uniform per warp
  // Fragments (mma.m16n8k256): A's row g has words t and t + 4 of 8 in registers 0 and 2, row
  // g + 8 in 1 and 3; B's column g words t and t + 4.
  const uint32_t* rows_lo = masks + (first_cluster + g) * mask_stride + t;
  const uint32_t* rows_hi = rows_lo + 8 * mask_stride;
  const uint32_t* bits_lo = bits + (first_bit + g) * bit_stride + t;
  const uint32_t* bits_hi = bits_lo + 8 * bit_stride;
  int d_lo[4] = {0, 0, 0, 0}, d_hi[4] = {0, 0, 0, 0};  // bits first_bit .. + 7, first_bit + 8 .. + 15
  for (int w = 0; w < words; w += 8) {
    const uint32_t a[4] = {rows_lo[w], rows_hi[w], rows_lo[w + 4], rows_hi[w + 4]};
    mma_and_popc_k256(d_lo, a, bits_lo[w], bits_lo[w + 4]);
    mma_and_popc_k256(d_hi, a, bits_hi[w], bits_hi[w + 4]);
  }
  // d[0], d[1]: cluster first_cluster + g, bits 2t and 2t + 1 of the tile's 8 (one counter word);
  // d[2], d[3]: cluster + 8.
  const int j = first_cluster + g;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int* d = h ? d_hi : d_lo;
    const int bit = first_bit + 8 * h + 2 * t;
    // Every (cluster < C, bit) counter has one writer here, so a first round's stores leave none stale.
    uint32_t* lo = counts + j * CLUSTER_COUNTER_WORDS + bit / 2;
    uint32_t* hi = lo + 8 * CLUSTER_COUNTER_WORDS;
    if (j < C) lo[0] = (first_round ? 0u : lo[0]) + (static_cast<uint32_t>(d[1]) << 16 | static_cast<uint32_t>(d[0]));
    if (j + 8 < C) hi[0] = (first_round ? 0u : hi[0]) + (static_cast<uint32_t>(d[3]) << 16 | static_cast<uint32_t>(d[2]));
  }
}

// All of Lloyd for a row in one launch: initial centroids, every iteration and the final
// assignment, by a thread block cluster per row (sm_90: blocks of a cluster are resident together
// and read each other's shared memory). Each block takes a slice of the row's queries
// (`layout.chunk`; their codes and the codes' bit rows kept in shared memory where
// `layout.whole_slice`) and counts its members into its own shared counters, a round of queries
// at a time: the nearest centroids set the round's membership bits, then count_by_products
// counts each cluster's members and their set bits. After a cluster barrier, block r updates
// centroids r, r + size, ... from the counters of every block of the cluster (integer sums: the
// result does not depend on timing) and writes each new code, and its words of the tensor-core
// fragments the search reads, into every block's copies; a second barrier ends the iteration. Two
// barriers per iteration where the other kernels take two launches and the counters' global
// atomics. One block of CLUSTER_THREADS per SM (64 registers each), so that a launch of one block
// per SM spreads over all of them. Same result as lloyd_init_kernel, the assign / update kernels
// and the final kernel. Where `order` is not null, the blocks then sort the row's final
// assignments by cluster (order_row_slices: `order` (rows, N) and `seg_start` (rows, C + 1) as
// cluster_order's), which saves the forward the sort's own launch.
template <int TILES>
__global__ void __launch_bounds__(CLUSTER_THREADS, 1)
    lloyd_cluster_kernel(RowInfo info, const int64_t* __restrict__ codes, int iterations, int bits,
                         ClusterLayout layout, int64_t* __restrict__ centroids,
                         int64_t* __restrict__ assignments, int64_t* __restrict__ order,
                         int64_t* __restrict__ seg_start) {
  static_assert(CLUSTER_THREADS == ORDER_THREADS, "the sort of the final assignments takes the kernel's blocks");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  wait_for_prior_kernels();  // launched as the hashing's dependent (with_lloyd_cluster_launch's after_prior)
  const auto [rank, size] = cluster_place();
  extern __shared__ int64_t smem_cluster[];
  char* smem_bytes = reinterpret_cast<char*>(smem_cluster);
  uint32_t* masks = reinterpret_cast<uint32_t*>(smem_bytes + layout.masks_at);
  uint32_t* code_bits = reinterpret_cast<uint32_t*>(smem_bytes + layout.bits_at);
  const int64_t bh = blockIdx.y;  // the cluster's blocks share it: every branch on it is uniform
  const int b = static_cast<int>(bh / info.heads);
  const bool single = info.singleton(b);
  const int C = info.clusters;
  const MmaSmem<TILES> sm(smem_cluster, C);
  uint32_t* counts = reinterpret_cast<uint32_t*>(sm.counts);  // C x CLUSTER_COUNTER_WORDS: 16-bit counters
  const int64_t* row_codes = codes + bh * info.length;
  const int start = min(rank * layout.chunk, info.length), stop = min(start + layout.chunk, info.length);
  const int64_t* slice = row_codes + start;
  if (layout.whole_slice) {
    int64_t* cached = reinterpret_cast<int64_t*>(smem_bytes + layout.codes_at);
    for (int i = threadIdx.x; i < stop - start; i += blockDim.x) cached[i] = slice[i];
    slice = cached;
  }
  const int nv = info.num_valid(b);
  for (int j = threadIdx.x; j < C; j += blockDim.x) sm.cent[j] = initial_centroid(info, b, j, nv, row_codes);
  const int lane = threadIdx.x & 31;
  const int mask_words = membership_rows<TILES>() * layout.mask_stride;
  const auto clear_membership = [&] {
    for (int i = threadIdx.x; i < mask_words; i += blockDim.x) masks[i] = 0;
  };
  // Cleared here, then after each round's counting (the last one's while the block waits at the
  // cluster barrier). The counters need no clearing: a round's first counting stores them, and a
  // block with no queries never counts, so its zeros stay.
  clear_membership();
  if (start >= stop) {
    for (int i = threadIdx.x; i < C * CLUSTER_COUNTER_WORDS; i += blockDim.x) counts[i] = 0;
  }
  __syncthreads();
  if (!single) {
    // The centroids' fragments, once: the update below writes each new code's fragment words too.
    store_centroid_fragments<TILES>(sm.cent, C, bits, sm.frags);
    if (layout.whole_slice) {  // the slice's bit rows, once: bit_stride - 4 words each
      transpose_codes(slice, start, stop, layout.bit_stride - 4, code_bits, layout.bit_stride);
    }
  }
  __syncthreads();  // the fragments and bit rows written, before the search or the final assignment
  for (int it = 0; !single && it < iterations; ++it) {
    for (int first = start; first < stop; first += layout.round) {  // uniform over the block
      const int last = min(first + layout.round, stop);
      const int words = (last - first + 255) / 256 * 8;
      if (!layout.whole_slice) {
        transpose_codes(slice + (first - start), first, last, words, code_bits, layout.bit_stride);
        __syncthreads();  // the codes' bit rows written
      }
      // The round's nearest centroids, as membership bits.
      for_query_tiles<CLUSTER_THREADS>(slice + (first - start), first, last,
                                       [&](int n_lo, int n_hi, uint64_t lo, uint64_t hi) {
        int nearest_lo, nearest_hi;
        nearest16<TILES>(lo, hi, sm.frags, lane, nearest_lo, nearest_hi);
        mark_members16(info, b, n_lo, n_hi, last, nearest_lo, nearest_hi, first, masks, layout.mask_stride,
                       lane);
      });
      __syncthreads();  // the round's membership bits set
      const uint32_t* round_bits = code_bits + (layout.whole_slice ? (first - start) / 32 : 0);
      count_by_products<TILES>(masks, layout.mask_stride, round_bits, layout.bit_stride, words, C, first == start,
                               counts);
      __syncthreads();  // the round counted before its bits are cleared
      if (last < stop) {  // the next round's bits cleared (a barrier follows the transposition or the search)
        clear_membership();
        if (layout.whole_slice) __syncthreads();
      }
    }
    cluster_arrive();
    // The next iteration's membership bits cleared while the other blocks finish counting (read
    // by this block only, after the second barrier).
    clear_membership();
    cluster_wait();  // every block's counters complete
    // Half a warp per centroid: lane q of the half sums bits 4q .. 4q + 3 of every block's counters
    // (8-byte loads of two counter words through 32-bit cluster addresses; the member count, slot
    // COUNT_SLOT = 63, is lane 15's fourth), decides their majorities, and the half ORs its lanes'
    // bits into the new code. Its lanes then write the code and its four fragment words
    // (code_quarter t = 0..3, what the search reads) into every block, so that no block rebuilds its
    // fragments from the codes. One pass over C = 100 centroids from 2 blocks per row on, where 64
    // threads per centroid, each loading a counter at a time, took 3 passes at 3 blocks (2.1 us per
    // iteration at 32 rows of 2k, the largest phase; benchmarks/NOTES.md, thirty-fourth session).
    // (Through generic pointers in a loop unrolled to MAX_CLUSTER_BLOCKS, the address arithmetic
    // made the update issue-bound: twenty-ninth session, ncu's source view.)
    const int q = lane & (UPDATE_LANES - 1);
    const unsigned half_warp = ((1u << UPDATE_LANES) - 1u) << (lane & UPDATE_LANES);
    for (int j = rank + size * (threadIdx.x / UPDATE_LANES); j < C;
         j += size * (CLUSTER_THREADS / UPDATE_LANES)) {  // uniform over each half warp
      const uint32_t* counters = counts + j * CLUSTER_COUNTER_WORDS + 2 * q;  // counters 4q .. 4q + 3
      int4 ones = make_int4(0, 0, 0, 0);
      // Four blocks' loads in flight at a time, those past the cluster's predicated off: one round
      // trip for up to four blocks (the compiler's own unrolling by four took two at three blocks:
      // one for a pair and one for the remainder).
      for (int i = 0; i < size; i += LOADS_IN_FLIGHT) {
        uint2 part[LOADS_IN_FLIGHT];
#pragma unroll
        for (int k = 0; k < LOADS_IN_FLIGHT; ++k) {
          // From this block on, so that the cluster's blocks start on different blocks' counters
          // (integer sums: the order does not change them).
          const int r = rank + i + k < size ? rank + i + k : rank + i + k - size;
          part[k] = i + k < size ? load2_from_block(address_in_block(counters, r)) : make_uint2(0, 0);
        }
#pragma unroll
        for (int k = 0; k < LOADS_IN_FLIGHT; ++k) {
          ones.x += part[k].x & 0xFFFFu, ones.y += part[k].x >> 16;
          ones.z += part[k].y & 0xFFFFu, ones.w += part[k].y >> 16;
        }
      }
      const int members = __shfl_sync(half_warp, ones.w, (lane & UPDATE_LANES) | (UPDATE_LANES - 1));
      // This lane's bits 4q .. 4q + 3 of the old code, then of the new one, as a nibble of a 32-bit
      // word: with a 64-bit shift and OR per bit the new code took 0.47 us per iteration at 32 rows of
      // 2k, 0.39 like this (benchmarks/lloyd_phases.py --split-update, thirty-eighth session).
      const uint32_t old_nibble = static_cast<uint32_t>(static_cast<uint64_t>(sm.cent[j]) >> (4 * q)) & 15u;
      const int counted[4] = {ones.x, ones.y, ones.z, ones.w};
      uint32_t nibble = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        nibble |= static_cast<uint32_t>(majority_of((old_nibble >> k) & 1, 4 * q + k, bits, members, counted[k])) << k;
      }
      const uint32_t placed = nibble << (4 * (q & 7));  // lanes 0..7: the code's low word, 8..15 its high word
      // Every lane has read the old code before the half's reduction, so before any store below.
      const uint64_t code = static_cast<uint64_t>(__reduce_or_sync(half_warp, q < 8 ? 0u : placed)) << 32 |
                            __reduce_or_sync(half_warp, q < 8 ? placed : 0u);
      for (int s = q; s < 5 * size; s += UPDATE_LANES) {  // (block, word): the code, then fragment words
        const int target = s / 5, word = s % 5;
        if (word == 0) {
          store64_to_block(address_in_block(sm.cent + j, target), code);
        } else {
          const int t = word - 1;
          store_to_block(address_in_block(centroid_fragment_word(sm.frags, j, t), target),
                         code_quarter(code, t) & used_quarter(t, bits));
        }
      }
    }
    cluster_barrier();  // every copy of the centroids updated, every block's counters read
  }
  // What is left (the final assignment and the sort) takes a few microseconds: time enough for the
  // next kernel's launch, whose blocks then wait for this one's end.
  let_next_kernel_start();
  for_query_tiles<CLUSTER_THREADS>(slice, start, stop, [&](int n_lo, int n_hi, uint64_t lo, uint64_t hi) {
    assign16<TILES>(info, b, bh, single, n_lo, n_hi, stop, lo, hi, sm.frags, assignments, lane);
  });
  if (rank == 0) {
    for (int j = threadIdx.x; j < C; j += blockDim.x) centroids[bh * C + j] = sm.cent[j];
  }
  if (order != nullptr) {  // uniform over the cluster
    // The slice's assignments were written by this block (visible to it after the barrier); the
    // counters and what follows them are free: no block reads them after the last iteration.
    __syncthreads();
    order_row_slices(assignments + bh * info.length, start, stop, C, rank, size, order + bh * info.length,
                     seg_start + bh * (C + 1), reinterpret_cast<int*>(smem_bytes + layout.order_at));
  }
#else
  __trap();  // the host launches it on sm_90 and newer only
#endif
}

// Calls `launch(std::integral_constant<int, TILES>())` with the fewest centroid tiles of
// {2, 4, 8, 13, 16} that hold C <= MMA_MAX_CLUSTERS centroids (8 each).
template <typename Launch>
void with_centroid_tiles(int C, Launch launch) {
  if (C <= 16) launch(std::integral_constant<int, 2>());
  else if (C <= 32) launch(std::integral_constant<int, 4>());
  else if (C <= 64) launch(std::integral_constant<int, 8>());
  else if (C <= 104) launch(std::integral_constant<int, 13>());
  else launch(std::integral_constant<int, 16>());
}

// Launches lloyd_mma_kernel (C <= MMA_MAX_CLUSTERS).
template <bool FINAL>
void launch_lloyd_mma(const dim3& grid, cudaStream_t stream, const RowInfo& info, const int64_t* codes,
                      const int64_t* centroids, int chunk, int bits, int* counters, int64_t* assignments) {
  with_centroid_tiles(info.clusters, [&](auto tiles) {
    constexpr int TILES = decltype(tiles)::value;
    auto kernel = lloyd_mma_kernel<TILES, FINAL>;
    const size_t bytes = MmaSmem<TILES>::bytes(info.clusters, !FINAL);
    ensure_smem(kernel, bytes);
    kernel<<<grid, MMA_THREADS, bytes, stream>>>(info, codes, centroids, chunk, bits, counters, assignments);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Calls `use(kernel, config, layout)` with lloyd_cluster_kernel for C = info.clusters
// (<= MMA_MAX_CLUSTERS), its launch configuration and its shared memory's layout: clusters of
// `cluster_blocks` blocks, one cluster per row of `rows`; a programmatic dependent of the kernel
// before it where `after_prior` (the launch itself; not the occupancy query).
template <typename Use>
void with_lloyd_cluster_launch(int cluster_blocks, int64_t rows, cudaStream_t stream, const RowInfo& info, Use use,
                               bool after_prior = false) {
  with_centroid_tiles(info.clusters, [&](auto tiles) {
    constexpr int TILES = decltype(tiles)::value;
    auto kernel = lloyd_cluster_kernel<TILES>;
    const ClusterLayout layout = cluster_layout<TILES>(info.length, info.clusters, cluster_blocks);
    ensure_smem(kernel, layout.bytes);
    const ClusterLaunch launch(cluster_blocks, dim3(static_cast<unsigned>(cluster_blocks), static_cast<unsigned>(rows)),
                              dim3(CLUSTER_THREADS), layout.bytes, stream, after_prior);
    use(kernel, launch.config, layout);
  });
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
  int* counts = reinterpret_cast<int*>(smem_lloyd + padded_clusters(C));
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
    add_block_counts(counts, gcount, C);
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
  const bool new_bit = active && majority_bit(centroids[bh * C + j], bit, bits, cj[COUNT_SLOT], cj[bit]);
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
// tensor_cores: the nearest centroids by 1-bit products where C <= 128 on sm_80 and newer (false:
// by population counts everywhere; the results are the same, the tests compare them).
// cluster_blocks: 0 for the kernels above (two launches per iteration), else all of Lloyd in one
// launch of lloyd_cluster_kernel with that many blocks per row (1..8; sm_90 and newer, C <= 128;
// queries_per_block and tensor_cores do not apply). The same result either way.
// sorted: also (order, seg_start) of the final assignments, as cluster_order's, from the one-launch
// kernel (cluster_blocks > 0); else those two are undefined tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lloyd_kmeans_into(
    const at::Tensor& codes_in, const c10::optional<at::Tensor>& mask_in, int64_t num_clusters, int64_t iterations,
    int64_t bits, int64_t queries_per_block, bool tensor_cores, int64_t cluster_blocks, bool sorted) {
  FCL_CHECK_CUDA(codes_in, "lloyd_kmeans: codes");
  TORCH_CHECK(codes_in.dim() == 3 && codes_in.scalar_type() == at::kLong,
              "lloyd_kmeans: codes must be (B, H, N) int64, got ", codes_in.sizes(), " ", codes_in.scalar_type());
  TORCH_CHECK(num_clusters >= 1 && num_clusters <= MAX_SMEM_CLUSTERS,
              "lloyd_kmeans: num_clusters must be in 1..", MAX_SMEM_CLUSTERS, " for the kernel, got ", num_clusters);
  TORCH_CHECK(iterations >= 0, "lloyd_kmeans: iterations must be >= 0, got ", iterations);
  TORCH_CHECK(bits >= 1 && bits <= 63, "lloyd_kmeans: bits must be in 1..63, got ", bits);
  TORCH_CHECK(queries_per_block >= 0 && queries_per_block <= (1 << 30),
              "lloyd_kmeans: queries_per_block must be 0 (automatic) or a positive count, got ", queries_per_block);
  TORCH_CHECK(cluster_blocks >= 0 && cluster_blocks <= MAX_CLUSTER_BLOCKS,
              "lloyd_kmeans: cluster_blocks must be 0 (launches per iteration) or 1..", MAX_CLUSTER_BLOCKS,
              " (blocks per row of the one-launch kernel), got ", cluster_blocks);
  const c10::cuda::CUDAGuard guard(codes_in.device());
  if (cluster_blocks > 0) {
    TORCH_CHECK(compute_major() >= 9, "lloyd_kmeans: cluster_blocks > 0 needs thread block clusters (sm_90 or newer); "
                "this GPU is sm_", compute_major(), "x: pass cluster_blocks=0");
    TORCH_CHECK(num_clusters <= MMA_MAX_CLUSTERS, "lloyd_kmeans: cluster_blocks > 0 takes num_clusters <= ",
                MMA_MAX_CLUSTERS, ", got ", num_clusters, ": pass cluster_blocks=0");
  }
  TORCH_CHECK(!sorted || cluster_blocks > 0, "lloyd_kmeans_sorted: needs the one-launch kernel (cluster_blocks > 0)");
  TORCH_CHECK(codes_in.size(2) < (int64_t(1) << 31), "lloyd_kmeans: at most 2**31 - 1 queries per row, got ",
              codes_in.size(2));
  const at::Tensor codes = codes_in.contiguous();
  const int64_t B = codes.size(0), H = codes.size(1), N = codes.size(2);
  const int C = static_cast<int>(num_clusters);
  at::Tensor assignments = at::empty_like(codes);
  at::Tensor centroids = at::empty({B, H, C}, codes.options());
  at::Tensor order, seg_start;
  if (sorted) {
    order = at::empty({B * H, N}, codes.options());
    seg_start = at::empty({B * H, C + 1}, codes.options());  // written whole by the kernel's block of rank 0
  }
  if (B * H == 0 || N == 0) {
    centroids.zero_();
    if (sorted) seg_start.zero_();
    return {assignments, centroids, order, seg_start};
  }
  TORCH_CHECK(B * H <= 65535, "lloyd_kmeans: batch * heads must be <= 65535, got ", B * H);
  TORCH_CHECK(cluster_blocks == 0 || cluster_slices_fit(N, cluster_blocks), "lloyd_kmeans: cluster_blocks = ",
              cluster_blocks, " gives blocks of ", std::min(cluster_chunk(N, cluster_blocks), N), " of the ", N,
              " queries per row; the one-launch kernel's 16-bit counters take at most ", MAX_CLUSTER_SLICE,
              " per block: ", fitting_cluster_blocks_hint(N));

  at::Tensor mask, cum;
  RowInfo info{nullptr, nullptr, H, static_cast<int>(N), C};
  if (mask_in.has_value()) {
    TORCH_CHECK(mask_in->dim() == 2 && mask_in->size(0) == B && mask_in->size(1) == N,
                "lloyd_kmeans: query_padding_mask must be (B=", B, ", N=", N, "), got ", mask_in->sizes());
    mask = mask_in->to(codes.device(), at::kBool).contiguous();
    cum = at::cumsum(mask.logical_not(), 1, at::kInt).contiguous();
    info.mask = mask.data_ptr<bool>();
    info.cum = cum.data_ptr<int>();
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (cluster_blocks > 0) {
    with_lloyd_cluster_launch(static_cast<int>(cluster_blocks), B * H, stream, info,
                              [&](auto kernel, const cudaLaunchConfig_t& config, const ClusterLayout& layout) {
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, info, codes.data_ptr<int64_t>(),
                                        static_cast<int>(std::min<int64_t>(iterations, 1 << 30)),
                                        static_cast<int>(bits), layout, centroids.data_ptr<int64_t>(),
                                        assignments.data_ptr<int64_t>(),
                                        sorted ? order.data_ptr<int64_t>() : nullptr,
                                        sorted ? seg_start.data_ptr<int64_t>() : nullptr));
    }, /*after_prior=*/true);
    return {assignments, centroids, order, seg_start};
  }
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
  const bool mma = tensor_cores && C <= MMA_MAX_CLUSTERS && compute_major() >= 8;

  if (iterations > 0) {
    at::Tensor counters = at::zeros({B * H, C, MAX_BITS}, codes.options().dtype(at::kInt));
    // Centroids then the counters.
    const size_t cent_bytes = static_cast<size_t>(padded_clusters(C)) * sizeof(int64_t);
    const size_t smem_counts = cent_bytes + static_cast<size_t>(C) * COUNTER_STRIDE * sizeof(int);
    const bool use_smem = smem_counts <= 200 * 1024;
    const size_t smem = use_smem ? smem_counts : cent_bytes;
    auto kernel = use_smem ? lloyd_assign_kernel<true> : lloyd_assign_kernel<false>;
    ensure_smem(kernel, smem);
    for (int64_t it = 0; it < iterations; ++it) {
      if (mma) {  // C <= 128: the counters fit in shared memory
        launch_lloyd_mma<false>(grid, stream, info, codes.data_ptr<int64_t>(), centroids.data_ptr<int64_t>(),
                                static_cast<int>(chunk), static_cast<int>(bits), counters.data_ptr<int>(), nullptr);
      } else {
        kernel<<<grid, threads, smem, stream>>>(info, codes.data_ptr<int64_t>(), centroids.data_ptr<int64_t>(),
                                                static_cast<int>(chunk), counters.data_ptr<int>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      lloyd_update_kernel<<<update_grid, 128, 0, stream>>>(info, static_cast<int>(bits), centroids.data_ptr<int64_t>(),
                                                           counters.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  // Padded: the compiler reads the centroids in 16-byte pairs.
  const size_t smem_final = static_cast<size_t>(C + 2) * sizeof(int64_t);
  if (mma) {
    launch_lloyd_mma<true>(grid, stream, info, codes.data_ptr<int64_t>(), centroids.data_ptr<int64_t>(),
                           static_cast<int>(chunk), static_cast<int>(bits), nullptr, assignments.data_ptr<int64_t>());
  } else {
    ensure_smem(lloyd_final_kernel, std::max<size_t>(smem_final, 1));
    lloyd_final_kernel<<<grid, threads, smem_final, stream>>>(info, codes.data_ptr<int64_t>(), centroids.data_ptr<int64_t>(),
                                                              static_cast<int>(chunk), assignments.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {assignments, centroids, order, seg_start};
}

std::tuple<at::Tensor, at::Tensor> lloyd_kmeans_cuda(const at::Tensor& codes, const c10::optional<at::Tensor>& mask,
                                                     int64_t num_clusters, int64_t iterations, int64_t bits,
                                                     int64_t queries_per_block, bool tensor_cores,
                                                     int64_t cluster_blocks) {
  auto [assignments, centroids, order, seg_start] = lloyd_kmeans_into(
      codes, mask, num_clusters, iterations, bits, queries_per_block, tensor_cores, cluster_blocks, false);
  return {assignments, centroids};
}

// (assignments, centroids, order, seg_start): lloyd_kmeans_cuda's by the one-launch kernel
// (cluster_blocks in 1..8), then the stable sort of the assignments by cluster that cluster_order
// gives, from the same launch.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lloyd_kmeans_sorted_cuda(
    const at::Tensor& codes, const c10::optional<at::Tensor>& mask, int64_t num_clusters, int64_t iterations,
    int64_t bits, int64_t cluster_blocks) {
  return lloyd_kmeans_into(codes, mask, num_clusters, iterations, bits, 0, true, cluster_blocks, true);
}

// How many clusters of `cluster_blocks` blocks of Lloyd's one-launch kernel the current GPU keeps
// resident at once, for rows of `length` queries and `num_clusters` (cudaOccupancyMaxActiveClusters:
// a cluster's blocks share one GPC, so GPCs whose SM count is not a multiple of the cluster size
// leave SMs idle). Rows past it wait for a second wave. 0 where the kernel does not run (before sm_90,
// more than MMA_MAX_CLUSTERS clusters, blocks of more than MAX_CLUSTER_SLICE queries).
int64_t lloyd_cluster_capacity(int64_t length, int64_t num_clusters, int64_t cluster_blocks) {
  TORCH_CHECK(cluster_blocks >= 1 && cluster_blocks <= MAX_CLUSTER_BLOCKS, "lloyd_cluster_capacity: cluster_blocks must be 1..",
              MAX_CLUSTER_BLOCKS, ", got ", cluster_blocks);
  TORCH_CHECK(length >= 1 && length <= (1 << 30), "lloyd_cluster_capacity: length must be in 1..2^30, got ", length);
  if (compute_major() < 9 || num_clusters < 1 || num_clusters > MMA_MAX_CLUSTERS ||
      !cluster_slices_fit(length, cluster_blocks)) {
    return 0;
  }
  RowInfo info{nullptr, nullptr, 1, static_cast<int>(length), static_cast<int>(num_clusters)};
  int capacity = 0;
  // One row: the count is of clusters, whatever the grid.
  with_lloyd_cluster_launch(static_cast<int>(cluster_blocks), 1, c10::cuda::getCurrentCUDAStream(), info,
                            [&](auto kernel, const cudaLaunchConfig_t& config, const ClusterLayout&) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&capacity, kernel, &config));
  });
  return capacity;
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
