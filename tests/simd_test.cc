#include "engine/simd.h"

#include <gtest/gtest.h>

#include "absl/strings/ascii.h"
#include "hwy/highway.h"

#include "tests/simd_targets.h"

namespace superpose::engine::simd {
namespace {

TEST(SimdTest, AvailableTargetsEndWithThePortableOne) {
  const auto targets = AvailableTargets();
  ASSERT_FALSE(targets.empty());
  // The baseline the code is compiled for is always there, last: on x86-64 the portable
  // fallback (EMU128, or SCALAR where the compiler's EMU128 is marked broken), on aarch64
  // NEON.
  EXPECT_EQ(targets.back(), HWY_STATIC_TARGET) << TargetName(targets.back());
  EXPECT_EQ(ActiveTargetName(), TargetName(targets.front()));
}

TEST(SimdTest, ScopedTargetRestrictsDispatch) {
  std::vector<std::string> seen;
  superpose::testing::ForEachSimdTarget([&](const std::string& name) {
    EXPECT_EQ(ActiveTargetName(), name);
    seen.push_back(name);
  });
  EXPECT_EQ(seen.size(), AvailableTargets().size());
  EXPECT_EQ(ActiveTargetName(), TargetName(AvailableTargets().front()));
}

TEST(SimdTest, UnknownTargetIsAnErrorNamingTheChoices) {
  const absl::Status s = LimitTargets("avx1024");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  const std::string last = TargetName(AvailableTargets().back());
  EXPECT_NE(s.message().find(absl::AsciiStrToLower(last)), std::string::npos) << s.message();
  EXPECT_TRUE(LimitTargets("auto").ok());
}

}  // namespace
}  // namespace superpose::engine::simd
