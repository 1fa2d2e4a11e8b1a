// Output allocation for CPU kernels.
//
// glibc maps every allocation over its mmap threshold lazily and unmaps it when
// freed, so a kernel writing such an output pays a page fault per 4 KB page. The
// threshold is 32 MB at most, and moves with the history of frees: outputs of a
// few MB are fresh mappings on some calls too (a step writing two 4 MB latents
// took 6 ms instead of 0.8 in one process of a benchmark). Two remedies:
// transparent huge pages (500 times fewer faults on a fresh buffer), and a
// cache that keeps the memory of recently freed outputs for the next call, the
// way PyTorch's CUDA allocator keeps freed blocks.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/strides.h>
#include <c10/util/accumulate.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <deque>
#include <iterator>
#include <mutex>
#include <new>
#include <type_traits>

#ifdef __linux__
#include <sys/mman.h>
#endif
#ifdef __AVX__
#include <immintrin.h>
#endif

namespace genfast::cpu {

class OutputCache {
 public:
  // Outputs below a huge page are left to at::empty_like: glibc's heap keeps them mapped.
  static constexpr size_t kMinBytes = size_t(2) << 20;
  // The most memory kept for reuse; the oldest blocks are freed first. 1 GB holds GPT-2's logits
  // at 4 x 512 tokens (412 MB) beside the rest of a forward's outputs: with 256 or 512 MB the
  // logits' block was evicted within the next forward and mapped anew, 100 000 page faults and
  // about 130 ms of a 2.3 s forward (1.11x torch.nn's forward, 1.19x with 1 GB).
  static constexpr size_t kMaxCachedBytes = size_t(1024) << 20;
  // Blocks given back before the most recent kWarmBytes are marked MADV_FREE, once: the
  // kernel takes their pages only when memory runs short (a write before then keeps them), so
  // an idle cache holds no memory the machine needs. The blocks a loop reuses call after call
  // are not marked: the call walks every page, 50-125 us for a LayerNorm's 6 MB output (a
  // tenth of the kernel's time), where a page written again after it costs nothing more.
  static constexpr size_t kWarmBytes = size_t(256) << 20;
  static constexpr size_t kHugePage = size_t(2) << 20;

  // Leaked on purpose: tensors freed during interpreter shutdown still return their blocks.
  static OutputCache& instance() {
    static auto* cache = new OutputCache;
    return *cache;
  }

  // A block taken for an output, and whether its lines have likely left the CPU's caches: more
  // than kColdAfterBytes were given back after it. A kernel then writes it with streaming stores
  // (write_output): a plain store would first read each line back from memory. (A fresh block's
  // pages are zeroed as the first writes fault them in, in cache.)
  struct Taken {
    void* ptr;
    bool cold;
  };
  static constexpr size_t kColdAfterBytes = size_t(32) << 20;

  // A 2 MB-aligned block of `bytes` (a multiple of kHugePage), reused when one is cached: the
  // one given back last, whose lines the cache most likely still holds. (Taking the oldest
  // instead cycled a LayerNorm's outputs through 32 cached blocks, every store a miss to
  // memory: 2.05 ms against 1.17 on a 300 MB-L3 Xeon.)
  Taken take(size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
        if (it->bytes == bytes) {
          const Taken taken{it->ptr, given_bytes_ - it->given_at > kColdAfterBytes};
          cached_bytes_ -= bytes;
          blocks_.erase(std::next(it).base());
          return taken;
        }
      }
    }
    void* block = std::aligned_alloc(kHugePage, bytes);
    if (block == nullptr) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    // Advice only: where THP is disabled the call fails and nothing changes.
    madvise(block, bytes, MADV_HUGEPAGE);
#endif
    return {block, false};
  }

  void give(void* block, size_t bytes) {
    std::deque<Block> evicted;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      given_bytes_ += bytes;
      blocks_.push_back({block, bytes, false, given_bytes_});
      cached_bytes_ += bytes;
      while (cached_bytes_ > kMaxCachedBytes) {
        evicted.push_back(blocks_.front());
        cached_bytes_ -= blocks_.front().bytes;
        blocks_.pop_front();
      }
      mark_idle_blocks();
    }
    for (const Block& old : evicted) std::free(old.ptr);
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
    bool marked_free;  // MADV_FREE since it was given back
    size_t given_at;   // given_bytes_ once it was given back
  };

  // Marks the blocks given back before the most recent kWarmBytes, newest first (a block larger
  // than kWarmBytes, such as GPT-2's logits, only once that much has come back after it). Blocks
  // older than a marked one were past the line when it was marked (blocks only join at the new
  // end), so the walk stops there. Called under the lock: a block being taken while marked could
  // lose the writes made during the call.
  void mark_idle_blocks() {
    size_t newer = 0;
    for (auto it = blocks_.rbegin(); it != blocks_.rend() && !it->marked_free; ++it) {
      if (newer > kWarmBytes) {
#ifdef MADV_FREE
        madvise(it->ptr, it->bytes, MADV_FREE);  // advice: where it fails the pages stay as they were
#endif
        it->marked_free = true;
      }
      newer += it->bytes;
    }
  }
  std::mutex mutex_;
  std::deque<Block> blocks_;  // oldest first
  size_t cached_bytes_ = 0;
  size_t given_bytes_ = 0;  // given back in all, the clock of a block's coldness
};

// An uninitialised tensor of these sizes, strides (dense) and options, for a kernel to overwrite;
// where `cold` is given, whether to write it with streaming stores (OutputCache::Taken).
inline at::Tensor empty_output(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options,
                               bool* cold = nullptr) {
  const size_t bytes = c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (cold != nullptr) *cold = false;
  if (bytes < OutputCache::kMinBytes) return at::empty_strided(sizes, strides, options);
  const size_t rounded = (bytes + OutputCache::kHugePage - 1) / OutputCache::kHugePage * OutputCache::kHugePage;
  const OutputCache::Taken block = OutputCache::instance().take(rounded);
  if (cold != nullptr) *cold = block.cold;
  return at::from_blob(
      block.ptr, sizes, strides, [rounded](void* used) { OutputCache::instance().give(used, rounded); }, options);
}

// Shaped, strided and typed like the dense x.
inline at::Tensor empty_output_like(const at::Tensor& x, bool* cold = nullptr) {
  return empty_output(x.sizes(), x.strides(), x.options(), cold);
}

// Contiguous.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return empty_output(sizes, c10::contiguous_strides(sizes), options);
}

// Copies n floats from an L1 buffer to an output with non-temporal stores where the target has
// them (AVX): an ordinary store first reads the line it writes into the cache, a third of a
// copy's memory traffic. The stores start at dst's first 32-byte boundary. A thread calls
// store_fence() after its last one.
inline void store_streaming(float* dst, const float* src, int64_t n) {
  int64_t i = 0;
#ifdef __AVX__
  const int64_t head = static_cast<int64_t>((32 - reinterpret_cast<uintptr_t>(dst) % 32) % 32);
  if (head % sizeof(float) == 0) {
    for (; i < std::min(n, head / int64_t(sizeof(float))); ++i) dst[i] = src[i];
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
  }
#endif
  for (; i < n; ++i) dst[i] = src[i];
}

// Asks for the cache lines of values [0, n) of `values` without waiting for them.
template <typename T>
void prefetch(const T* values, int64_t n) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = 0; i < n; i += kLine) __builtin_prefetch(values + i);
}

// Writes n results computed in float (or double): float outputs stream past the cache, the others
// convert as they store.
template <typename T, typename acc_t>
void write_streaming(T* out, const acc_t* values, int64_t n) {
  if constexpr (std::is_same_v<T, float> && std::is_same_v<acc_t, float>) {
    store_streaming(out, values, n);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(values[i]);
  }
}

// Writes n results to out: past the cache where `streaming` (an output in a cold block, as
// empty_output tells), else with plain stores, which leave it in cache for the next reader.
template <typename T, typename acc_t>
void write_output(T* out, const acc_t* values, int64_t n, bool streaming) {
  if (streaming) {
    write_streaming(out, values, n);
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(values[i]);
}

inline void store_fence() {
#ifdef __AVX__
  _mm_sfence();
#endif
}

}  // namespace genfast::cpu
