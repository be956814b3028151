// Superposition RAG scores do not depend on where a path sits in the step or on the
// number of CPU threads: two identical documents in one request get bitwise equal
// scores, so the documented tie rule (rag::TopK: the earlier document wins) decides
// which is kept, and the scores at 1 and 2 threads are bitwise equal. The paths of a
// request run as rows of one step (a prefill-sized one, more than 64 rows), so this
// checks that a row's log-probabilities depend on that row only.
#include <gtest/gtest.h>

#include <omp.h>

#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/cpu/cpu_backend.h"
#include "engine/cpu/small_gemm.h"
#include "engine/rag/rag.h"
#include "engine/runtime/engine.h"
#include "engine/runtime/model_bundle.h"
#include "tests/test_util.h"

namespace superpose {
namespace {

using engine::rag::Spec;
using testing::Completion;

// The backend's GEMM at prefill sizes (blocked, copied to aligned rows): a row's
// outputs are those of that row alone, wherever it sits and whatever the threads.
TEST(GemmDeterminismTest, RowResultsDoNotDependOnPlaceBatchOrThreads) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> ud(-1.0f, 1.0f);
  for (const auto& [in, out] : {std::pair{64, 192}, std::pair{172, 344}, std::pair{768, 130}}) {
    const int32_t rows = 300;
    std::vector<float> x(static_cast<size_t>(rows) * in), w(static_cast<size_t>(out) * in);
    for (float& v : x) v = ud(rng);
    for (float& v : w) v = ud(rng);
    std::vector<float> single(out);
    engine::cpu::SmallBatchGemm(x.data(), 1, in, w.data(), out, single.data());
    for (int32_t threads : {1, 2}) {
      omp_set_num_threads(threads);
      // Row 0 copied to rows 5 and 299 (a full block, the last partial block).
      for (int32_t r : {5, 299}) std::copy(x.begin(), x.begin() + in, x.begin() + r * in);
      std::vector<float> y(static_cast<size_t>(rows) * out);
      engine::cpu::SmallBatchGemm(x.data(), rows, in, w.data(), out, y.data());
      for (int32_t r : {0, 5, 299}) {
        for (int32_t o = 0; o < out; ++o) {
          ASSERT_EQ(y[static_cast<size_t>(r) * out + o], single[o])
              << "in=" << in << " row " << r << " col " << o << " threads " << threads;
        }
      }
    }
  }
}

class RagDeterminismTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto bundle = engine::LoadModelBundle(testing::Stories260kDir());
    ASSERT_TRUE(bundle.ok()) << bundle.status();
    model_ = std::move(*bundle);
  }
  std::vector<int32_t> Enc(const std::string& s, bool bos = false) {
    return model_.tokenizer->Encode(s, bos);
  }
  // Documents 0 and 2 are identical; document 0 answers the query best.
  Spec MakeSpec(int32_t top_k) {
    Spec s;
    s.preamble = Enc("Read the stories and answer.", true);
    const std::vector<std::string> texts = {
        "Lily went to the park with her mom. She saw a big red ball.\n",
        "Tom had a little dog named Max. Max liked to run and jump in the garden all day.\n",
        "Lily went to the park with her mom. She saw a big red ball.\n",
        "The sun was shining.\n",
        "Once upon a time there was a cat who loved fish. The cat was very happy.\n",
        "Sam found a shiny stone by the river and gave it to his sister.\n"};
    for (const std::string& t : texts) s.documents.push_back(Enc(t));
    s.query = Enc("What did Lily see at the park?");
    s.postamble = Enc(" Answer:");
    s.options.top_k = top_k;
    s.options.path_cache = false;  // both copies are computed, not one taken from the other
    return s;
  }
  Completion Run(int32_t threads, const Spec& spec) {
    engine::BackendOptions opts;
    opts.kv_num_blocks = 256;
    opts.kv_block_size = 16;
    opts.num_threads = threads;
    engine::cpu::CpuBackend backend(opts);
    EXPECT_TRUE(backend.Load(model_.config, *model_.weights, engine::Shard{}).ok());
    engine::Engine eng(engine::EngineOptions{.prefix_caching = false}, model_.config,
                       model_.tokenizer.get(), &backend);
    eng.Start();
    engine::Request req = testing::GreedyRequest({}, 6);
    req.rag = std::make_shared<Spec>(spec);
    Completion c = testing::RunRequest(eng, std::move(req));
    eng.Shutdown(absl::ZeroDuration());
    return c;
  }
  engine::ModelBundle model_;
};

TEST_F(RagDeterminismTest, IdenticalDocumentsScoreBitwiseEqualAtAnyThreadCount) {
  const Spec spec = MakeSpec(/*top_k=*/1);
  int64_t step_tokens = static_cast<int64_t>(spec.preamble.size() + spec.postamble.size());
  for (const auto& d : spec.documents) step_tokens += d.size() + spec.query.size();
  // A prefill-sized step (more than 64 rows: where the backend used to call sgemm).
  ASSERT_GT(step_tokens, 64);
  std::vector<Completion> runs;
  for (int32_t threads : {1, 2}) {
    runs.push_back(Run(threads, spec));
    const Completion& c = runs.back();
    ASSERT_TRUE(c.status.ok()) << c.status;
    ASSERT_NE(c.rag, nullptr);
    ASSERT_EQ(c.rag->docs.size(), spec.documents.size());
    const auto& docs = c.rag->docs;
    EXPECT_EQ(docs[0].score, docs[2].score) << "threads=" << threads;
    EXPECT_EQ(docs[0].doc_ll, docs[2].doc_ll) << "threads=" << threads;
    EXPECT_EQ(docs[0].query_ll, docs[2].query_ll) << "threads=" << threads;
    for (size_t i = 0; i < docs.size(); ++i) {
      if (i != 0 && i != 2) {
        ASSERT_GT(docs[0].score, docs[i].score) << "the duplicated document must score best";
      }
    }
    // top_k = 1 and a tie at the top: the earlier copy is kept.
    EXPECT_TRUE(docs[0].kept) << "threads=" << threads;
    EXPECT_FALSE(docs[2].kept) << "threads=" << threads;
  }
  for (size_t i = 0; i < spec.documents.size(); ++i) {
    EXPECT_EQ(runs[0].rag->docs[i].score, runs[1].rag->docs[i].score) << "document " << i;
    EXPECT_EQ(runs[0].rag->docs[i].kept, runs[1].rag->docs[i].kept) << "document " << i;
  }
  EXPECT_EQ(runs[0].tokens, runs[1].tokens);
}

}  // namespace
}  // namespace superpose
