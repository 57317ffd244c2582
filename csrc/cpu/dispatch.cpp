#include "dispatch.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdlib>
#include <string>

namespace rlhf_fast::cpu {
namespace {

std::array<const KernelTable*, 3>& tables() {
  static std::array<const KernelTable*, 3> t{nullptr, nullptr, nullptr};
  return t;
}

int rank_of(const std::string& capability) {
  if (capability.rfind("AVX512", 0) == 0) return 2;
  if (capability.rfind("AVX2", 0) == 0) return 1;
  return 0;
}

const KernelTable& choose() {
  int allowed = rank_of(at::get_cpu_capability());
  for (int r = allowed; r >= 0; --r) {
    if (tables()[r] != nullptr) return *tables()[r];
  }
  TORCH_CHECK(false, "rlhf_fast._C has no CPU kernels registered (build error)");
}

}  // namespace

int register_kernels(const KernelTable& table) {
  TORCH_CHECK(table.rank >= 0 && table.rank < 3, "bad capability rank");
  static std::array<KernelTable, 3> storage;
  storage[table.rank] = table;
  tables()[table.rank] = &storage[table.rank];
  return table.rank;
}

const KernelTable& kernels() {
  static const KernelTable& chosen = choose();
  return chosen;
}

}  // namespace rlhf_fast::cpu
