// Constants of the softmax, which runs in the log2 domain (exp2 is one instruction).
#pragma once

namespace attn_backend {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

}  // namespace attn_backend
