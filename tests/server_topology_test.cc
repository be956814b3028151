// The deployment topology on loopback (deploy/nginx/superpose.conf): two
// superpose-server replicas behind Debian's nginx, driven by superpose-load. Both
// replicas serve and nothing fails; requests with one affinity key all reach one
// replica; when a replica is killed mid-run the rest go to the other and the failures
// are reported by gRPC status. nginx is required: without it the suite fails.
#include <signal.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "tests/load_process.h"
#include "tests/server_process.h"

namespace superpose::testing {
namespace {

class TopologyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(access(NginxBinary().c_str(), X_OK), 0)
        << NginxBinary() << " is missing: install nginx (apt-get install -y nginx-light, "
        << "scripts/setup.sh) or set $SUPERPOSE_NGINX";
    for (auto& r : replicas_) {
      r = std::make_unique<ServerProcess>(std::vector<std::string>{});
      ASSERT_TRUE(r->ok()) << "superpose-server did not start";
    }
    nginx_ = std::make_unique<NginxProcess>(
        std::vector<std::string>{replicas_[0]->address(), replicas_[1]->address()});
    ASSERT_TRUE(nginx_->ok()) << "nginx did not start:\n" << nginx_->Log();
  }
  void TearDown() override { nginx_.reset(); }

  double Served(int i) const {
    return MetricSum(replicas_[i]->metrics_port(), "superpose_requests_finished_total");
  }
  nlohmann::json Run(const std::vector<std::string>& args, int want_rc = 0) {
    LoadProcess load(nginx_->address(), args, dir_.path());
    EXPECT_EQ(load.Wait(), want_rc) << load.Log() << nginx_->Log();
    nlohmann::json j = load.Json();
    EXPECT_FALSE(j.is_discarded()) << load.Log();
    return j;
  }

  std::unique_ptr<ServerProcess> replicas_[2];
  std::unique_ptr<NginxProcess> nginx_;
  TempDir dir_;
};

TEST_F(TopologyTest, BothReplicasServeAndNoneFail) {
  const nlohmann::json j = Run({"--affinity=none", "--concurrency=4", "--duration_s=3",
                                "--input_len=uniform:16:64", "--output_len=32"});
  ASSERT_FALSE(j.is_discarded());
  const auto& level = j["levels"][0];
  EXPECT_EQ(level["errors"].get<int>(), 0) << level.dump();
  EXPECT_GT(level["ok"].get<int>(), 8);
  EXPECT_GT(Served(0), 0);
  EXPECT_GT(Served(1), 0);
  EXPECT_EQ(Served(0) + Served(1), level["requests"].get<double>());
}

TEST_F(TopologyTest, OneAffinityKeyReachesOneReplica) {
  const nlohmann::json j =
      Run({"--affinity=key:acme/doc-set-42", "--concurrency=4", "--requests=16", "--output_len=8"});
  ASSERT_FALSE(j.is_discarded());
  EXPECT_EQ(j["levels"][0]["ok"].get<int>(), 16);
  EXPECT_EQ(std::max(Served(0), Served(1)), 16);
  EXPECT_EQ(std::min(Served(0), Served(1)), 0);
}

TEST_F(TopologyTest, AutoAffinityKeepsEachDocumentSetOnOneReplica) {
  // 1 document set: every request has the same key, so one replica computes the
  // documents once (one stream: no two first requests race) and serves the rest from
  // its path cache.
  const nlohmann::json j =
      Run({"--workload=rag", "--rag_doc_sets=1", "--rag_docs=2", "--rag_pool=4",
           "--rag_doc_tokens=16", "--concurrency=1", "--requests=12", "--output_len=4"});
  ASSERT_FALSE(j.is_discarded());
  EXPECT_EQ(j["levels"][0]["ok"].get<int>(), 12);
  EXPECT_EQ(std::max(Served(0), Served(1)), 12);
  const int busy = Served(0) > 0 ? 0 : 1;
  EXPECT_EQ(MetricSum(replicas_[busy]->metrics_port(), "superpose_rag_path_cache_misses_total"), 2);
  EXPECT_EQ(MetricSum(replicas_[busy]->metrics_port(), "superpose_rag_path_cache_hits_total"),
            2 * 11);
}

TEST_F(TopologyTest, KilledReplicaFailsOverAndFailuresAreReportedByStatus) {
  LoadProcess load(nginx_->address(),
                   {"--affinity=none", "--concurrency=4", "--duration_s=10", "--output_len=128",
                    "--input_len=32"},
                   dir_.path());
  // Kill replica 0 once both have finished requests (least_conn keeps ~2 streams on
  // each, so some are mid-stream on replica 0 when it dies).
  for (int i = 0; i < 60 && (Served(0) <= 0 || Served(1) <= 0); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_GT(Served(0), 0);
  ASSERT_GT(Served(1), 0);
  replicas_[0]->Signal(SIGKILL);
  EXPECT_EQ(replicas_[0]->WaitExit(std::chrono::seconds(10)), -1);
  const double survivor_at_kill = Served(1);
  EXPECT_EQ(load.Wait(), 1) << load.Log();  // 1: some requests failed
  const nlohmann::json j = load.Json();
  ASSERT_FALSE(j.is_discarded()) << load.Log();
  const auto& level = j["levels"][0];
  EXPECT_GT(level["errors"].get<int>(), 0);
  int by_status = 0;
  for (const auto& [code, n] : level["errors_by_status"].items()) {
    EXPECT_NE(code, "OK");
    EXPECT_EQ(code.find("CODE_"), std::string::npos) << code;
    by_status += n.get<int>();
  }
  EXPECT_EQ(by_status, level["errors"].get<int>()) << level.dump();
  std::printf("after the kill: %s\n", level["errors_by_status"].dump().c_str());
  // The run went on after the kill, on the survivor.
  EXPECT_GT(Served(1), survivor_at_kill + 2);
  // And a new run goes entirely to it, without failures.
  const double before = Served(1);
  const nlohmann::json after =
      Run({"--affinity=none", "--concurrency=2", "--requests=8", "--output_len=8"});
  ASSERT_FALSE(after.is_discarded());
  EXPECT_EQ(after["levels"][0]["ok"].get<int>(), 8);
  EXPECT_EQ(Served(1) - before, 8);
}

}  // namespace
}  // namespace superpose::testing
