// The queries' stable sort by cluster, as a device function of a thread block cluster: the body of
// attention.cu's cluster_order_kernel, which Lloyd's one-launch kernel (clustering.cu) also runs on
// its final assignments, so that a forward needs no launch of its own for the sort.
#pragma once

#include "common.cuh"

namespace fcl {

constexpr int ORDER_THREADS = 1024;
constexpr int ORDER_WARPS = ORDER_THREADS / 32;
constexpr int MAX_ORDER_CLUSTERS = 256;  // per-warp counters of every bucket in shared memory

// The bucket of a cluster id: 0 for every negative id (the padded queries' -1), 1 + id for
// 0 .. C-1, C + 1 for ids >= C. Queries in the first or the last bucket are in no cluster.
__device__ __forceinline__ int order_bucket(int64_t id, int clusters) {
  return id < 0 ? 0 : id >= clusters ? clusters + 1 : static_cast<int>(id) + 1;
}

// Shared memory of order_row_slices: the bucket sizes of this block's slice, where each bucket's
// next query goes, the row's totals, and per warp a chunk's counts and where its runs start.
__host__ __device__ __forceinline__ size_t order_smem_bytes(int clusters) {
  return static_cast<size_t>(clusters + 2) * (3 + 2 * ORDER_WARPS) * sizeof(int);
}

// A stable counting sort of a row's cluster ids into `row_order` (N) and `row_seg_start` (C + 1),
// the first position of each cluster (row_seg_start[C]: the end of the last). That is the
// permutation of a stable sort of the ids but inside the first and the last bucket, kept in
// query order here. The row's blocks are the `blocks` blocks of this thread block cluster (one
// before sm_90), block `rank` taking ids [begin, end), consecutive slices in rank order. Blocks of
// ORDER_THREADS threads; `smem`: order_smem_bytes(clusters) of this block's shared memory, which
// the other blocks read between the cluster barriers here. Each block counts its slice's buckets,
// and after a cluster barrier reads every block's counts (distributed shared memory): a bucket of
// block r starts after the whole row's smaller buckets and the same bucket's queries in blocks
// before r. Each block then places its slice in chunks of ORDER_THREADS queries: each warp ranks
// its lanes among those of the same bucket (__match_any_sync), and per bucket one warp scans the
// 32 warps' counts (a lane per warp) into where each warp's run of it starts. The permutation does
// not depend on how the row is sliced.
__device__ __forceinline__ void order_row_slices(const int64_t* __restrict__ row_ids, int begin, int end, int clusters,
                                                 int rank, int blocks, int64_t* __restrict__ row_order,
                                                 int64_t* __restrict__ row_seg_start, int* smem) {
  const int buckets = clusters + 2;
  int* sizes = smem;                             // (buckets): this block's slice, read by the cluster
  int* next = sizes + buckets;                   // (buckets): where each bucket's next query goes
  int* totals = next + buckets;                  // (buckets): the whole row's
  int* counts = totals + buckets;                // (ORDER_WARPS, buckets): this chunk's, per warp
  int* offsets = counts + ORDER_WARPS * buckets;  // (ORDER_WARPS, buckets): where each warp's run starts
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < buckets * (3 + ORDER_WARPS); i += ORDER_THREADS) smem[i] = 0;
  __syncthreads();
  for (int n = begin + threadIdx.x; n < end; n += ORDER_THREADS) atomicAdd(sizes + order_bucket(row_ids[n], clusters), 1);
  cluster_barrier();  // (a block barrier too)
  for (int b = threadIdx.x; b < buckets; b += ORDER_THREADS) {
    int before = 0, total = 0;
    for (int r = 0; r < blocks; ++r) {
      const int size = r == rank ? sizes[b] : load_from_block(address_in_block(sizes + b, r));
      before += r < rank ? size : 0;
      total += size;
    }
    next[b] = before;
    totals[b] = total;
  }
  cluster_arrive();  // this block has read the others' counts: they may exit once all have
  __syncthreads();
  if (warp == 0) {  // the row's bucket sizes -> starts: an exclusive scan, 32 buckets at a time
    int carry = 0;
    for (int first = 0; first < buckets; first += 32) {
      const int b = first + lane;
      const int size = b < buckets ? totals[b] : 0;
      int through = size;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int below = __shfl_up_sync(FULL_MASK, through, off);
        if (lane >= off) through += below;
      }
      if (b < buckets) {
        next[b] += carry + through - size;
        totals[b] = carry + through - size;
      }
      carry += __shfl_sync(FULL_MASK, through, 31);
    }
  }
  __syncthreads();
  if (rank == 0) {
    for (int c = threadIdx.x; c <= clusters; c += ORDER_THREADS) row_seg_start[c] = totals[c + 1];
  }
  for (int first = begin; first < end; first += ORDER_THREADS) {  // uniform over the block
    const int n = first + threadIdx.x;
    const bool valid = n < end;
    const int b = valid ? order_bucket(row_ids[n], clusters) : -1;
    const unsigned peers = __match_any_sync(FULL_MASK, b);
    const int rank_in_warp = __popc(peers & ((1u << lane) - 1u));  // lanes of the same bucket before this one
    if (valid && rank_in_warp == 0) counts[warp * buckets + b] = __popc(peers);
    __syncthreads();
    for (int bb = warp; bb < buckets; bb += ORDER_WARPS) {  // lane w: warp w's run of bucket bb
      const int here = counts[lane * buckets + bb];
      int through = here;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int below = __shfl_up_sync(FULL_MASK, through, off);
        if (lane >= off) through += below;
      }
      const int start = next[bb];
      offsets[lane * buckets + bb] = start + through - here;
      counts[lane * buckets + bb] = 0;  // for the next chunk
      __syncwarp();
      if (lane == 31) next[bb] = start + through;
    }
    __syncthreads();  // (the next chunk's scan writes offsets only after its first barrier)
    if (valid) row_order[offsets[warp * buckets + b] + rank_in_warp] = n;
  }
  cluster_wait();
}

}  // namespace fcl
