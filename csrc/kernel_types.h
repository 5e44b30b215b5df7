// Torch-free types shared by the CUDA launchers (.cu) and their torch-side callers (.cpp).
// Keeping torch out of .cu files keeps nvcc builds short.
#pragma once

#include <cstdint>

namespace pyssm {

enum class DType : int { kFloat64, kFloat32, kFloat16, kBFloat16 };

}  // namespace pyssm
