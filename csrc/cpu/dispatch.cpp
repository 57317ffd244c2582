#include "dispatch.h"

#include <ATen/Version.h>

#include <string>

namespace rlhf_fast::cpu {

const char* capability_name(int rank) {
  static const char* names[kNumCapabilities] = {"DEFAULT", "AVX2", "AVX512"};
  return rank >= 0 && rank < kNumCapabilities ? names[rank] : "UNKNOWN";
}

int machine_capability_rank() {
  static const int rank = [] {
    const std::string cap = at::get_cpu_capability();
    if (cap.rfind("AVX512", 0) == 0) return 2;
    if (cap.rfind("AVX2", 0) == 0) return 1;
    return 0;
  }();
  return rank;
}

}  // namespace rlhf_fast::cpu
