// Compiles the functions between DSATTN_TARGET_PUSH("avx2,fma") and DSATTN_TARGET_POP() for those ISA features
// (GCC: push_options + target; clang: attribute push), so that one file holds one build per ISA and the runtime
// dispatch picks one. Include ATen/c10 and <immintrin.h> before the push: only the file's own code is retargeted.
#pragma once

#define DSATTN_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define DSATTN_TARGET_PUSH(features) \
  DSATTN_PRAGMA(clang attribute push(__attribute__((target(features))), apply_to = function))
#define DSATTN_TARGET_POP() DSATTN_PRAGMA(clang attribute pop)
#else
#define DSATTN_TARGET_PUSH(features) DSATTN_PRAGMA(GCC push_options) DSATTN_PRAGMA(GCC target(features))
#define DSATTN_TARGET_POP() DSATTN_PRAGMA(GCC pop_options)
#endif
