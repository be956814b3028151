// superpose-load's output: markdown tables on stdout and every figure with the settings
// as JSON (--json). Columns and fields: docs/operations.md.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "client/load/settings.h"
#include "client/load/stats.h"

namespace superpose::load {

void PrintTables(const Settings& s, const std::vector<LevelReport>& levels);

absl::Status WriteJson(const Settings& s, const std::vector<LevelReport>& levels,
                       const Totals& warmup, const Totals& measured);

}  // namespace superpose::load
