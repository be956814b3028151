// LogId, and private mode's keyed hash of request ids in log lines.
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <array>
#include <atomic>

#include "absl/strings/escaping.h"
#include "engine/sequence/request.h"

namespace superpose::engine {
namespace {

struct LogKey {
  std::array<unsigned char, 32> bytes{};
  std::atomic<bool> set{false};
};

LogKey& Key() {
  static LogKey key;
  return key;
}

std::string Hashed(const std::string& request_id) {
  const LogKey& key = Key();
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  HMAC(EVP_sha256(), key.bytes.data(), static_cast<int>(key.bytes.size()),
       reinterpret_cast<const unsigned char*>(request_id.data()), request_id.size(), mac, &len);
  return "h" + absl::BytesToHexString(absl::string_view(reinterpret_cast<const char*>(mac), 8));
}

}  // namespace

absl::StatusOr<LogId> LogId::Of(const std::string& request_id) {
  if (absl::Status st = ValidateRequestId(request_id); !st.ok()) return st;
  if (Key().set.load(std::memory_order_acquire)) return LogId(Hashed(request_id));
  return LogId(request_id);
}

bool HashRequestIdsInLogs() {
  LogKey& key = Key();
  if (key.set.load(std::memory_order_acquire)) return true;
  if (RAND_bytes(key.bytes.data(), static_cast<int>(key.bytes.size())) != 1) return false;
  key.set.store(true, std::memory_order_release);
  return true;
}

}  // namespace superpose::engine
