// Parallel loop for short memory-bound kernels that must never wait for a thread that has not started.
//
// at::parallel_for ends at a barrier: if a worker thread is slow to be scheduled (another process holds
// its core), the caller waits for it, a scheduler time slice (milliseconds) for a sub-millisecond
// kernel. Here the caller and its helpers claim chunks from one atomic counter; the caller starts at
// once, and waits at the end only for the chunks a helper has claimed and not finished (at most one per
// helper). A helper that starts late finds no chunk left and returns without touching the caller's
// data; the counter lives in a shared_ptr, so it may outlive the call. The helpers run on ATen's
// inter-op thread pool (at::launch). Results must not depend on which thread ran a chunk.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

namespace rlhf_fast::cpu {
inline namespace CPU_CAPABILITY {

// Calls chunk(c) for every c in [0, n_chunks), on the calling thread and up to at::get_num_threads() - 1
// helpers; returns when every chunk has run.
template <typename F>
void claim_parallel(int64_t n_chunks, const F& chunk) {
  const int64_t helpers = std::min<int64_t>(at::get_num_threads(), n_chunks) - 1;
  if (helpers <= 0 || at::in_parallel_region()) {
    for (int64_t c = 0; c < n_chunks; ++c) chunk(c);
    return;
  }
  struct Claims {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    const F* chunk = nullptr;
    int64_t n = 0;
  };
  auto claims = std::make_shared<Claims>();
  claims->chunk = &chunk;
  claims->n = n_chunks;
  const auto run = [](Claims& s) {
    for (int64_t c = s.next.fetch_add(1, std::memory_order_relaxed); c < s.n;
         c = s.next.fetch_add(1, std::memory_order_relaxed)) {
      (*s.chunk)(c);  // valid: the caller is still waiting for this chunk
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t h = 0; h < helpers; ++h) at::launch([claims, run] { run(*claims); });
  run(*claims);
  while (claims->done.load(std::memory_order_acquire) < n_chunks) std::this_thread::yield();
}

}  // namespace CPU_CAPABILITY
}  // namespace rlhf_fast::cpu
