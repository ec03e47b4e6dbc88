// The one switch over the CPU kernels' ISAs. dispatch_isa(isa, f) resolves `isa` (-1: the best the CPU has, or
// env DSATTN_CPU_ISA; resolve_isa's errors) and calls f with the chosen ISA's tag, an empty type per ISA
// namespace (isa_portable::Tag, isa_avx2::Tag, isa_avx512::Tag, with `value` its Isa). Each ISA's entry points
// are overloads of one name taking that tag first, so a generic lambda picks the ISA's build by overload:
//   dispatch_isa(isa, [&](auto tag) { sliding_window(tag, a); });
#pragma once

#include <cstdint>
#include <utility>

#include "cpu/attention_kernels.h"

namespace dsattn {
namespace cpu_attn {

template <typename F>
decltype(auto) dispatch_isa(int64_t requested, F&& f) {
  switch (resolve_isa(requested)) {
    case kAvx512: return std::forward<F>(f)(isa_avx512::Tag{});
    case kAvx2: return std::forward<F>(f)(isa_avx2::Tag{});
    default: return std::forward<F>(f)(isa_portable::Tag{});
  }
}

}  // namespace cpu_attn
}  // namespace dsattn
