// Small helpers around absl::Status that Debian 12's abseil does not ship.
#pragma once

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define SP_STATUS_CONCAT_INNER(a, b) a##b
#define SP_STATUS_CONCAT(a, b) SP_STATUS_CONCAT_INNER(a, b)

#define SP_RETURN_IF_ERROR(expr)                              \
  do {                                                        \
    if (absl::Status sp_status_ = (expr); !sp_status_.ok()) { \
      return sp_status_;                                      \
    }                                                         \
  } while (0)

#define SP_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.ok()) return tmp.status();            \
  lhs = std::move(tmp).value()

// SP_ASSIGN_OR_RETURN(auto x, Foo()); declares x from a StatusOr or returns its error.
#define SP_ASSIGN_OR_RETURN(lhs, expr) \
  SP_ASSIGN_OR_RETURN_IMPL(SP_STATUS_CONCAT(sp_statusor_, __LINE__), lhs, expr)
