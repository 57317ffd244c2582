#include "hugepage_alloc.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <rlhf_fast/checks.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace rlhf_fast::cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kMinBytes = size_t{2} << 20;
constexpr int64_t kMaxMB = int64_t{1} << 20;  // 1 TB: a sanity bound on the setting

struct Block {
  void* ptr;
  size_t bytes;
};

// The bound from RLHF_FAST_CPU_BUFFER_CACHE_MB; unset or empty: 0, the cache is off.
size_t cache_capacity() {
  const char* env = std::getenv("RLHF_FAST_CPU_BUFFER_CACHE_MB");
  if (env == nullptr || *env == '\0') return 0;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  RLHF_FAST_CHECK(end != env && *end == '\0' && mb >= 0 && mb <= kMaxMB,
                  "RLHF_FAST_CPU_BUFFER_CACHE_MB: expected an integer in [0, ", kMaxMB, "] (MB), got '", env, "'");
  return size_t(mb) << 20;
}

// Idle buffers, oldest first. Never destroyed: tensors may outlive static destruction.
class Cache {
 public:
  Cache() : capacity_(cache_capacity()) {}

  bool enabled() const { return capacity_.load(std::memory_order_relaxed) > 0; }

  // New bound; frees the idle buffers beyond it (all of them for 0). Returns the old bound.
  size_t set_capacity(size_t bytes) {
    std::deque<Block*> evicted;
    size_t old = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      old = capacity_.exchange(bytes);
      while (idle_bytes_ > bytes) {
        evicted.push_back(idle_.front());
        idle_bytes_ -= idle_.front()->bytes;
        idle_.pop_front();
      }
    }
    for (Block* e : evicted) destroy(e);
    return old;
  }

  // A cached buffer of at least `bytes` and at most 25% more (the smallest such), or nullptr.
  Block* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      if ((*it)->bytes >= bytes && (*it)->bytes <= bytes + bytes / 4 &&
          (best == idle_.end() || (*it)->bytes < (*best)->bytes)) {
        best = it;
      }
    }
    if (best == idle_.end()) return nullptr;
    Block* b = *best;
    idle_.erase(best);
    idle_bytes_ -= b->bytes;
    return b;
  }

  void give_back(Block* b) {
    std::deque<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const size_t capacity = capacity_.load(std::memory_order_relaxed);
      if (b->bytes <= capacity) {
        idle_.push_back(b);
        idle_bytes_ += b->bytes;
        b = nullptr;
        while (idle_bytes_ > capacity) {
          evicted.push_back(idle_.front());
          idle_bytes_ -= idle_.front()->bytes;
          idle_.pop_front();
        }
      }
    }
    if (b != nullptr) evicted.push_back(b);
    for (Block* e : evicted) destroy(e);
  }

  int64_t release_all() {
    std::deque<Block*> all;
    {
      std::lock_guard<std::mutex> lock(mu_);
      all.swap(idle_);
      idle_bytes_ = 0;
    }
    int64_t freed = 0;
    for (Block* e : all) {
      freed += int64_t(e->bytes);
      destroy(e);
    }
    return freed;
  }

  static void destroy(Block* b) {
    std::free(b->ptr);
    delete b;
  }

 private:
  std::mutex mu_;
  std::deque<Block*> idle_;
  size_t idle_bytes_ = 0;
  std::atomic<size_t> capacity_;  // written under mu_; read without it only by enabled()
};

Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

void release_block(void* ctx) { cache().give_back(static_cast<Block*>(ctx)); }

struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (n + kHugePage - 1) / kHugePage * kHugePage;
    Block* b = cache().take(bytes);
    if (b == nullptr) {
      void* p = std::aligned_alloc(kHugePage, bytes);
      TORCH_CHECK(p != nullptr, "rlhf_fast: out of memory allocating ", n, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(p, bytes, MADV_HUGEPAGE);  // advice only: ignore failure
#endif
      b = new Block{p, bytes};
    }
    return {b->ptr, b, &release_block, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

at::Tensor empty_hugepage(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  if (size_t(numel) * c10::elementSize(dtype) < kMinBytes || !cache().enabled()) {
    return at::empty(sizes, at::TensorOptions().dtype(dtype).device(at::kCPU));
  }
  static HugePageAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   c10::MemoryFormat::Contiguous);
}

int64_t release_cached_buffers() { return cache().release_all(); }

int64_t set_buffer_cache_mb(int64_t mb) {
  RLHF_FAST_CHECK(mb >= 0 && mb <= kMaxMB, "mb: expected an integer in [0, ", kMaxMB, "] (MB), got ", mb);
  return int64_t(cache().set_capacity(size_t(mb) << 20) >> 20);
}

}  // namespace rlhf_fast::cpu

TORCH_LIBRARY_FRAGMENT(rlhf_fast_C, m) {
  // frees the idle large CPU buffers rlhf_fast keeps for reuse; returns the bytes released
  m.def("release_cpu_buffers() -> int", [] { return rlhf_fast::cpu::release_cached_buffers(); });
  // sets the most MB of idle buffers kept (0: the cache is off); returns the previous bound in MB
  m.def("set_cpu_buffer_cache_mb(int mb) -> int", [](int64_t mb) { return rlhf_fast::cpu::set_buffer_cache_mb(mb); });
}
