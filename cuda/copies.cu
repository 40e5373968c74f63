// Many tensor copies in one launch: the graph cache's input and output copies
// (fairseq_clustered/ops/graph_cache.py).
//
// A replayed composition copies its tensor arguments into the graph's static inputs and
// its outputs out of the graph into fresh tensors. torch's fused copy takes one launch
// only when every tensor has one dtype; a composition's arguments have three or four
// (bf16 activations, fp32 statistics, int64 cluster ids), and on a GPU server's CPU each
// launch through the dispatcher costs ~10 us, more than the kernel it launches. A copy
// between two tensors of the same dtype, sizes and strides that are dense (their elements
// fill one span of memory without gaps) is a copy of that byte span, whatever the dtype,
// so all of them go into one launch of one kernel here. Pairs of another layout are
// handed to torch's copy_.
#include "common.cuh"

#include <vector>

namespace fcl {
namespace {

constexpr int kMaxCopies = 16;  // byte spans per launch (the table travels as a kernel argument)
constexpr int kCopyThreads = 256;
constexpr int64_t kBytesPerBlock = 16 * 1024;  // four 16-byte vectors per thread

struct CopyTable {
  const char* src[kMaxCopies];
  char* dst[kMaxCopies];
  int64_t bytes[kMaxCopies];
  int64_t first_block[kMaxCopies + 1];  // blocks [first_block[i], first_block[i + 1]) copy span i
  bool vectorized[kMaxCopies];          // both ends and the length are multiples of 16 bytes
  int64_t count;                        // (64 bits: an int would leave 4 bytes of padding)
};
FCL_NO_PADDING(CopyTable);

__global__ void copy_spans_kernel(const CopyTable table) {
  const int64_t block = blockIdx.x;
  int i = 0;
  while (i + 1 < table.count && block >= table.first_block[i + 1]) ++i;
  const int64_t begin = (block - table.first_block[i]) * kBytesPerBlock;
  const int64_t end = min(begin + kBytesPerBlock, table.bytes[i]);
  const char* __restrict__ src = table.src[i];
  char* __restrict__ dst = table.dst[i];
  if (table.vectorized[i]) {
    for (int64_t at = begin + threadIdx.x * 16; at < end; at += kCopyThreads * 16) {
      *reinterpret_cast<uint4*>(dst + at) = *reinterpret_cast<const uint4*>(src + at);
    }
  } else {  // a view starting off a 16-byte boundary: rare, bytewise
    for (int64_t at = begin + threadIdx.x; at < end; at += kCopyThreads) dst[at] = src[at];
  }
}

bool is_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

class SpanCopier {
 public:
  explicit SpanCopier(cudaStream_t stream) : stream_(stream), table_{} {}

  void add(const at::Tensor& dst, const at::Tensor& src) {
    const int64_t bytes = src.numel() * src.element_size();
    if (bytes == 0) return;
    const int i = table_.count;
    table_.src[i] = static_cast<const char*>(src.data_ptr());
    table_.dst[i] = static_cast<char*>(dst.data_ptr());
    table_.bytes[i] = bytes;
    table_.vectorized[i] = bytes % 16 == 0 && is_aligned(table_.src[i]) && is_aligned(table_.dst[i]);
    table_.first_block[i] = blocks_;
    blocks_ += (bytes + kBytesPerBlock - 1) / kBytesPerBlock;
    table_.first_block[i + 1] = blocks_;
    if (++table_.count == kMaxCopies) flush();
  }

  void flush() {
    if (table_.count == 0) return;
    TORCH_CHECK(blocks_ < (int64_t{1} << 31), "copy_tensors: ", blocks_, " blocks exceed the grid limit");
    copy_spans_kernel<<<static_cast<unsigned>(blocks_), kCopyThreads, 0, stream_>>>(table_);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    table_.count = 0;
    blocks_ = 0;
  }

 private:
  cudaStream_t stream_;
  CopyTable table_;
  int64_t blocks_ = 0;
};

// Same dtype, sizes and strides, and no gaps: the elements of both are one byte span.
bool same_dense_span(const at::Tensor& dst, const at::Tensor& src) {
  return dst.scalar_type() == src.scalar_type() && dst.sizes() == src.sizes() && dst.strides() == src.strides() &&
         src.is_non_overlapping_and_dense();
}

}  // namespace

void copy_tensors_cuda(const std::vector<at::Tensor>& dsts, const std::vector<at::Tensor>& srcs) {
  TORCH_CHECK(dsts.size() == srcs.size(), "copy_tensors: ", dsts.size(), " destinations for ", srcs.size(),
              " sources");
  if (dsts.empty()) return;
  const auto device = dsts[0].device();
  for (size_t i = 0; i < dsts.size(); ++i) {
    FCL_CHECK_CUDA(dsts[i], "copy_tensors: destination");
    TORCH_CHECK(dsts[i].device() == device && srcs[i].device() == device, "copy_tensors: tensor ", i, " is on ",
                srcs[i].device(), " -> ", dsts[i].device(), ", the first destination on ", device);
    TORCH_CHECK(dsts[i].sizes() == srcs[i].sizes(), "copy_tensors: tensor ", i, " has sizes ", srcs[i].sizes(),
                " but its destination ", dsts[i].sizes());
  }
  const c10::cuda::CUDAGuard guard(device);
  SpanCopier copier(c10::cuda::getCurrentCUDAStream());
  for (size_t i = 0; i < dsts.size(); ++i) {
    if (same_dense_span(dsts[i], srcs[i])) {
      copier.add(dsts[i], srcs[i]);
    } else {
      dsts[i].copy_(srcs[i]);  // strided or converting: torch's copy (one launch of its own)
    }
  }
  copier.flush();
}

std::vector<at::Tensor> fresh_copies_cuda(const std::vector<at::Tensor>& srcs) {
  std::vector<at::Tensor> copies;
  copies.reserve(srcs.size());
  for (const auto& src : srcs) copies.push_back(at::empty_like(src));
  copy_tensors_cuda(copies, srcs);
  return copies;
}

}  // namespace fcl
