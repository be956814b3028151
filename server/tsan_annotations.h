// Happens-before edges that gRPC guarantees but ThreadSanitizer cannot see: gRPC core
// (Debian's libgrpc, not instrumented) orders a call's reactions, and OnDone comes after
// every other reaction has returned. A reactor marks the end of each reaction with
// SP_HAPPENS_BEFORE(this) and the start of OnDone with SP_HAPPENS_AFTER(this), so that
// TSan sees the order gRPC provides. No code in other builds.
#pragma once

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define SP_HAPPENS_BEFORE(addr) __tsan_release(const_cast<void*>(static_cast<const void*>(addr)))
#define SP_HAPPENS_AFTER(addr) __tsan_acquire(const_cast<void*>(static_cast<const void*>(addr)))
#else
#define SP_HAPPENS_BEFORE(addr) static_cast<void>(0)
#define SP_HAPPENS_AFTER(addr) static_cast<void>(0)
#endif
