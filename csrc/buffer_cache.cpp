// A small cache of large CPU buffers for the [tokens, V] tensors dpo_fast allocates itself:
// the logits gradient and the fused linear path's logits tiles.
//
// Why: a fresh [tokens, V] buffer is mmap-ed by the C allocator and handed back to the OS
// when freed, so every training step pays a first-touch page fault per 4 KiB page. At
// tokens=2048, V=32000 fp32 (262 MB) those faults cost more than the kernels that fill the
// buffer. A training step frees the gradient (the lm_head backward consumes it) before the
// next step asks for one of the same size, so keeping the freed block mapped and handing it
// out again removes the faults, as CUDA's caching allocator does on the GPU. Peak memory
// does not grow: the block is only idle between a step's backward and the next backward,
// while the next step's logits (at least as large) are being computed.
//
// Policy: at most kMaxBlocks idle blocks; a request takes the smallest idle block that
// holds it without wasting more than half of it, else gets a new one; a returned block
// evicts the oldest idle one when the cache is full. Thread-safe.

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <cstddef>
#include <deque>
#include <mutex>
#include <utility>

namespace dpo_fast {
namespace {

constexpr size_t kMaxBlocks = 2;

class BufferCache {
 public:
  void* acquire(size_t bytes) {
    {
      std::lock_guard<std::mutex> guard(mutex_);
      auto best = idle_.end();
      for (auto it = idle_.begin(); it != idle_.end(); ++it) {
        const bool fits = it->second >= bytes && it->second / 2 <= bytes;
        if (fits && (best == idle_.end() || it->second < best->second)) {
          best = it;
        }
      }
      if (best != idle_.end()) {
        void* data = best->first;
        idle_.erase(best);
        return data;
      }
    }
    return c10::alloc_cpu(bytes);
  }

  void release(void* data, size_t bytes) {
    void* evicted = nullptr;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (idle_.size() == kMaxBlocks) {
        evicted = idle_.front().first;
        idle_.pop_front();
      }
      idle_.emplace_back(data, bytes);
    }
    c10::free_cpu(evicted);  // free(nullptr) is a no-op
  }

  void clear() {
    std::deque<std::pair<void*, size_t>> blocks;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      blocks.swap(idle_);
    }
    for (auto& block : blocks) {
      c10::free_cpu(block.first);
    }
  }

 private:
  std::mutex mutex_;
  std::deque<std::pair<void*, size_t>> idle_;  // (data, bytes), oldest first
};

// Never destroyed: tensors may be freed after static destructors have run at exit.
BufferCache& cache() {
  static auto* instance = new BufferCache();
  return *instance;
}

at::Tensor cached_empty_cpu(at::IntArrayRef size, at::ScalarType dtype) {
  int64_t numel = 1;
  for (const int64_t dim : size) {
    TORCH_CHECK(dim >= 0, "cached_empty_cpu: size must be non-negative, got ", size);
    numel *= dim;
  }
  // at least one byte, so that every tensor owns a distinct block
  const size_t bytes = std::max<size_t>(1, numel * c10::elementSize(dtype));
  void* data = cache().acquire(bytes);
  return at::from_blob(
      data, size, [bytes](void* ptr) { cache().release(ptr, bytes); }, at::TensorOptions().dtype(dtype));
}

void empty_cache_cpu() {
  cache().clear();
}

}  // namespace
}  // namespace dpo_fast

TORCH_LIBRARY_FRAGMENT(dpo_fast, m) {
  m.def("cached_empty_cpu(SymInt[] size, ScalarType dtype) -> Tensor");
  m.def("empty_cache_cpu() -> ()");
}

// no tensor arguments to dispatch on: CompositeExplicitAutograd runs them for any call
TORCH_LIBRARY_IMPL(dpo_fast, CompositeExplicitAutograd, m) {
  m.impl("cached_empty_cpu", &dpo_fast::cached_empty_cpu);
  m.impl("empty_cache_cpu", &dpo_fast::empty_cache_cpu);
}
