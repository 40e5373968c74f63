// Shared helpers of the fairseq-clustered CUDA kernels: dtype conversion, warp
// reductions, strided row addressing and host-side checks.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <type_traits>
#include <utility>

namespace fcl {

constexpr unsigned FULL_MASK = 0xffffffffu;

// For a struct that kernels take by value. Its bytes travel into the launch, and into a captured
// graph's kernel node, whole: padding included, and padding holds whatever the host's stack held,
// often the upper half of some other device address. GraphInputs (graph_inputs.cpp) reads every
// 8-byte word of a captured kernel's parameters as a possible address of an input, so an int beside
// such padding can pass for one, and rewriting it turns the int into garbage (a 32k backward with
// `Rows::heads` an int faulted so). Kernel parameters therefore have no padding bytes.
#define FCL_NO_PADDING(T)                                       \
  static_assert(std::has_unique_object_representations_v<T>, \
                #T " is a kernel parameter: it must have no padding bytes (see FCL_NO_PADDING)")

// fp32 <-> storage type. All arithmetic happens in fp32.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(at::Half x) { return __half2float(static_cast<__half>(x)); }
__device__ __forceinline__ float to_float(at::BFloat16 x) {
  return __bfloat162float(static_cast<__nv_bfloat16>(x));
}
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ at::Half from_float<at::Half>(float x) { return at::Half(__float2half_rn(x)); }
template <>
__device__ __forceinline__ at::BFloat16 from_float<at::BFloat16>(float x) {
  return at::BFloat16(__float2bfloat16_rn(x));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, off));
  return v;
}

// Reduce 32 per-lane partial sums part[0..31] across the warp so that lane t ends
// with the full sum of part[t] over all lanes: 31 shuffles instead of 32 x 5. At
// each step a lane keeps the half of its remaining values selected by its lane bit
// and receives the partner's copy of that half. (Steps are templates so that every
// index is a compile-time constant and `part` stays in registers.)
template <int OFF>
__device__ __forceinline__ void transpose_step(float (&part)[32], int lane) {
  const bool upper = (lane & OFF) != 0;
#pragma unroll
  for (int i = 0; i < OFF; ++i) {
    const float send = upper ? part[i] : part[i + OFF];
    const float keep = upper ? part[i + OFF] : part[i];
    part[i] = keep + __shfl_xor_sync(FULL_MASK, send, OFF);
  }
}
__device__ __forceinline__ float warp_transpose_sum(float (&part)[32], int lane) {
  transpose_step<16>(part, lane);
  transpose_step<8>(part, lane);
  transpose_step<4>(part, lane);
  transpose_step<2>(part, lane);
  transpose_step<1>(part, lane);
  return part[0];
}

// A (B, H, L, E) tensor addressed through its strides; the last dim must be contiguous.
template <typename T>
struct Rows {
  T* ptr;
  int64_t sb, sh, sl;
  int64_t heads;  // (64 bits: an int would leave 4 bytes of padding)
  __device__ __forceinline__ T* row(int64_t bh, int64_t l) const {
    const int64_t b = bh / heads, h = bh - b * heads;
    return ptr + b * sb + h * sh + l * sl;
  }
};

FCL_NO_PADDING(Rows<float>);

template <typename T>
Rows<T> make_rows(const at::Tensor& t) {
  return Rows<T>{reinterpret_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.size(1)};
}

// Load / store VPL consecutive elements of one row into fp32 registers.
template <int VPL, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VPL]) {
#pragma unroll
  for (int e = 0; e < VPL; ++e) out[e] = to_float(p[e]);
}
template <int VPL, typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[VPL]) {
#pragma unroll
  for (int e = 0; e < VPL; ++e) p[e] = from_float<T>(in[e]);
}

// Distributed shared memory through 32-bit cluster addresses (sm_90; the hosts launch
// cluster kernels there only). address_in_block: where `local`, an address in this block's shared
// memory, lies in block `block` of the thread block cluster; load_from_block / store_to_block read
// and write there (other blocks see a store after a cluster barrier).
__device__ __forceinline__ uint32_t address_in_block(const void* local, unsigned block) {
  uint32_t there = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t here = static_cast<uint32_t>(__cvta_generic_to_shared(local));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(there) : "r"(here), "r"(block));
#else
  __trap();
#endif
  return there;
}

__device__ __forceinline__ int load_from_block(uint32_t address) {
  int value = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("ld.shared::cluster.u32 %0, [%1];\n" : "=r"(value) : "r"(address) : "memory");
#else
  __trap();
#endif
  return value;
}

__device__ __forceinline__ void store_to_block(uint32_t address, uint32_t value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("st.shared::cluster.u32 [%0], %1;\n" ::"r"(address), "r"(value) : "memory");
#else
  __trap();
#endif
}

// Two words at an 8-byte aligned address, in one load.
__device__ __forceinline__ uint2 load2_from_block(uint32_t address) {
  uint2 value = make_uint2(0, 0);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("ld.shared::cluster.v2.u32 {%0, %1}, [%2];\n" : "=r"(value.x), "=r"(value.y) : "r"(address) : "memory");
#else
  __trap();
#endif
  return value;
}

// Eight bytes at an 8-byte aligned address, in one store.
__device__ __forceinline__ void store64_to_block(uint32_t address, uint64_t value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("st.shared::cluster.u64 [%0], %1;\n" ::"r"(address), "l"(value) : "memory");
#else
  __trap();
#endif
}

// This block's rank in its thread block cluster, and the cluster's blocks: 0 and 1 before sm_90,
// whose launches have no clusters (on sm_90 a launch without them has clusters of one block).
struct ClusterPlace {
  int rank, blocks;
};
__device__ __forceinline__ ClusterPlace cluster_place() {
  unsigned rank = 0, blocks = 1;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(blocks));
#endif
  return {static_cast<int>(rank), static_cast<int>(blocks)};
}

// A barrier of every thread of the cluster, split: after cluster_arrive(), this block's shared
// memory writes before it are visible to the blocks that pass their cluster_wait(); a block waits
// for all to arrive. Before sm_90 (one block per cluster) a block barrier.
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#else
  __syncthreads();
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

// Both halves: a barrier of the cluster's threads after which every block sees the others' shared
// memory writes before it. The same instructions as cooperative groups' cluster.sync(), the
// release's GPU-wide fence (MEMBAR.ALL.GPU) included: ptxas emits it for the PTX form too (SASS of
// lloyd_cluster_kernel, thirty-second session).
__device__ __forceinline__ void cluster_barrier() {
  cluster_arrive();
  cluster_wait();
}

// Programmatic dependent launch (sm_90). A kernel launched with launch_after_prior (or a
// ClusterLaunch `after_prior`) may start while the kernel before it on the stream still runs: its
// blocks become resident once every block of that kernel has called let_next_kernel_start() (or
// exited), then wait in wait_for_prior_kernels() until that kernel has finished and its writes are
// visible. What it saves is each boundary's launch and ramp: the next kernel's blocks are in place
// when the last one ends. Every such kernel calls wait_for_prior_kernels() first, in every thread
// and before any early return: its own end then implies the end of the kernel before it, so a
// kernel after it (launched either way) sees everything earlier on the stream. A kernel lets the
// next one start only where what it has left is a short tail: waiting blocks are not free (with
// every kernel letting the next start at its top, the blocks of the next one waited through the
// whole of the current one, and the forward at 2k took 3-4 us longer; benchmarks/NOTES.md,
// fortieth session). Before sm_90 both are no-ops and the launches ordinary ones.
__device__ __forceinline__ void wait_for_prior_kernels() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void let_next_kernel_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// An attribute of the current device, queried once per device.
template <cudaDeviceAttr ATTRIBUTE>
inline int device_attribute() {
  static int cached[64] = {0};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 64 && cached[dev] > 0) return cached[dev];
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, ATTRIBUTE, dev));
  if (dev < 64) cached[dev] = value;
  return value;
}
inline int num_sms() { return device_attribute<cudaDevAttrMultiProcessorCount>(); }
inline int compute_major() { return device_attribute<cudaDevAttrComputeCapabilityMajor>(); }

// Whether launch_after_prior and ClusterLaunch's `after_prior` launch as programmatic dependents on
// the current device: sm_90 and newer, unless FAIRSEQ_CLUSTERED_PDL=0 (read once; a switch for
// measuring the launches' gain and for ruling them out when a result looks wrong; the Triton
// kernels' dependent_launch in ops/_triton.py reads it too).
inline bool dependent_launches() {
  static const int allowed = [] {
    const char* setting = std::getenv("FAIRSEQ_CLUSTERED_PDL");
    const std::string value = setting == nullptr ? "1" : setting;
    return value == "0" ? 0 : value == "1" ? 1 : -1;
  }();
  TORCH_CHECK(allowed >= 0, "FAIRSEQ_CLUSTERED_PDL must be 0 (off) or 1 (on, the default), got '",
              std::getenv("FAIRSEQ_CLUSTERED_PDL"), "'");
  return allowed == 1 && compute_major() >= 9;
}

// The launch attribute that makes a kernel a programmatic dependent of the one before it.
inline cudaLaunchAttribute after_prior_attribute() {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  return attribute;
}

// `kernel<<<grid, block, smem, stream>>>(args...)` as a programmatic dependent of the kernel before
// it on `stream` (see wait_for_prior_kernels, which `kernel` must call first), where
// dependent_launches(); else an ordinary launch.
template <typename... Params, typename... Args>
void launch_after_prior(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                        Args&&... args) {
  cudaLaunchAttribute attribute = after_prior_attribute();
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = dependent_launches() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// Blocks of `kernel` (`threads` each, `smem` bytes of dynamic shared memory) resident on one SM of
// the current device, queried once per kernel and device: host code that picks a kernel by it runs
// on every eager call.
template <typename Kernel>
int resident_blocks(Kernel kernel, int threads, size_t smem) {
  static std::mutex lock;
  static std::map<std::pair<const void*, int>, int> known;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), dev);
  std::lock_guard<std::mutex> guard(lock);
  const auto found = known.find(key);
  if (found != known.end()) return found->second;
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  known.emplace(key, blocks);
  return blocks;
}

// Raise a kernel's dynamic shared-memory limit when a launch needs more than 48 KB.
// Each (kernel, device) is raised once, to the device's opt-in maximum, on its first
// use (before any CUDA graph capture in practice).
inline void ensure_smem_impl(const void* kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex lock;
  static std::set<std::pair<const void*, int>> raised;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> guard(lock);
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "kernel needs ", bytes,
              " bytes of shared memory, the device allows ", limit);
  if (raised.count({kernel, dev})) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
  raised.insert({kernel, dev});
}
template <typename Kernel>
void ensure_smem(Kernel kernel, size_t bytes) {
  ensure_smem_impl(reinterpret_cast<const void*>(kernel), bytes);
}

// A launch (cudaLaunchKernelEx) of thread block clusters of `cluster_blocks` blocks along x: the
// configuration and its attributes, which `config.attrs` points into, so a holder is neither copied
// nor moved. Devices before sm_90 have no clusters: there (one block per cluster) the cluster shape
// is left out and the launch is an ordinary one. On sm_90 it is set even for one block, which
// cudaOccupancyMaxActiveClusters needs to count clusters. `after_prior`: a programmatic dependent
// of the kernel before it (launch_after_prior's terms) where dependent_launches().
struct ClusterLaunch {
  cudaLaunchAttribute attributes[2];
  cudaLaunchConfig_t config;
  ClusterLaunch(int cluster_blocks, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool after_prior = false)
      : attributes{}, config{} {
    attributes[0].id = cudaLaunchAttributeClusterDimension;
    attributes[0].val.clusterDim.x = static_cast<unsigned>(cluster_blocks);
    attributes[0].val.clusterDim.y = 1;
    attributes[0].val.clusterDim.z = 1;
    attributes[1] = after_prior_attribute();
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = attributes;
    config.numAttrs = compute_major() >= 9 ? (after_prior && dependent_launches() ? 2 : 1) : 0;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};
}  // namespace fcl

#define FCL_CHECK_CUDA(t, name) TORCH_CHECK((t).is_cuda(), name " must be a CUDA tensor, got ", (t).device())
#define FCL_CHECK_LAST_CONTIG(t, name) \
  TORCH_CHECK((t).stride(-1) == 1, name " must be contiguous in its last dim, got strides ", (t).strides())

// fp32 / fp16 / bf16 dispatch (fp64 stays on the reference, which gradcheck uses).
#define FCL_DISPATCH_FLOAT(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                     \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

// Head dims with a compiled kernel (values per lane = dim / 32).
#define FCL_DISPATCH_DIM(DIM, NAME, ...)                                            \
  [&] {                                                                             \
    switch (DIM) {                                                                  \
      case 32: { constexpr int VPL = 1; return __VA_ARGS__(); }                     \
      case 64: { constexpr int VPL = 2; return __VA_ARGS__(); }                     \
      case 128: { constexpr int VPL = 4; return __VA_ARGS__(); }                    \
      default: TORCH_CHECK(false, NAME ": head dim must be 32, 64 or 128, got ", DIM); \
    }                                                                               \
  }()
