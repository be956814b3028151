#include "engine/model/tokenizer_bpe.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/model/tokenizer_unicode.h"
#include "engine/util/status.h"

namespace superpose::engine::tok {

using json = nlohmann::json;

namespace {

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

struct Symbol {
  int32_t id;
  int32_t prev;
  int32_t next;
  uint32_t len;  // bytes; 0 once merged into its left neighbour
};

struct Merge {
  int32_t rank;
  int32_t pos;
  int32_t new_id;
};

// Heap order: the top is the lowest rank, then the leftmost position.
struct MergeAfter {
  bool operator()(const Merge& a, const Merge& b) const {
    if (a.rank != b.rank) return a.rank > b.rank;
    return a.pos > b.pos;
  }
};

using MergeTable = absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>>;

// Merges adjacent symbols, lowest rank first, until no pair of the merge table is left.
void ApplyMerges(const MergeTable& merges, std::vector<Symbol>* symbols) {
  std::vector<Symbol>& syms = *symbols;
  std::vector<Merge> heap;
  heap.reserve(syms.size());
  for (size_t k = 0; k + 1 < syms.size(); ++k) {
    auto it = merges.find(PairKey(syms[k].id, syms[k + 1].id));
    if (it != merges.end()) {
      heap.push_back(Merge{it->second.first, static_cast<int32_t>(k), it->second.second});
    }
  }
  MergeAfter cmp;
  std::make_heap(heap.begin(), heap.end(), cmp);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), cmp);
    Merge top = heap.back();
    heap.pop_back();
    Symbol& cur = syms[top.pos];
    if (cur.len == 0 || cur.next < 0) continue;
    const int32_t next_pos = cur.next;
    const Symbol right = syms[next_pos];
    // Skip stale entries: the pair must still produce the same token.
    auto it = merges.find(PairKey(cur.id, right.id));
    if (it == merges.end() || it->second.second != top.new_id) continue;
    cur.id = top.new_id;
    cur.len += right.len;
    cur.next = right.next;
    syms[next_pos].len = 0;
    if (right.next >= 0) syms[right.next].prev = top.pos;
    if (cur.prev >= 0) {
      auto pit = merges.find(PairKey(syms[cur.prev].id, cur.id));
      if (pit != merges.end()) {
        heap.push_back(Merge{pit->second.first, cur.prev, pit->second.second});
        std::push_heap(heap.begin(), heap.end(), cmp);
      }
    }
    if (cur.next >= 0) {
      auto nit = merges.find(PairKey(cur.id, syms[cur.next].id));
      if (nit != merges.end()) {
        heap.push_back(Merge{nit->second.first, top.pos, nit->second.second});
        std::push_heap(heap.begin(), heap.end(), cmp);
      }
    }
  }
}

}  // namespace

namespace {
// One merge, "a b" or ["a", "b"]; null, or what is wrong with it.
const char* MergePair(const json& e, std::string* a, std::string* b) {
  if (e.is_string()) {
    const std::string& line = e.get_ref<const std::string&>();
    size_t sp = line.find(' ');
    if (sp == std::string::npos || line.find(' ', sp + 1) != std::string::npos) {
      return "expected exactly two tokens separated by one space";
    }
    *a = line.substr(0, sp);
    *b = line.substr(sp + 1);
    return nullptr;
  }
  if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
    *a = e[0].get<std::string>();
    *b = e[1].get<std::string>();
    return nullptr;
  }
  return "expected \"a b\" or [\"a\", \"b\"]";
}
}  // namespace

absl::StatusOr<std::unique_ptr<BpeModel>> BpeModel::Parse(const json& j, const ParseContext& ctx) {
  if (!j.is_object()) return ctx.Error("model", "expected an object");
  std::string type;
  if (j.contains("type") && !j.at("type").is_null()) {
    if (!j.at("type").is_string()) return ctx.Error("model.type", "expected a string");
    type = j.at("type").get<std::string>();
  } else if (j.contains("merges")) {
    type = "BPE";  // old files omit the type; BPE is the model with merges
  } else {
    return ctx.Error("model.type", "missing, and the model has no merges (only BPE is supported)");
  }
  if (type != "BPE") {
    return ctx.Error("model.type",
                     absl::StrCat("unsupported model type \"", type, "\" (only BPE is supported)"));
  }
  std::unique_ptr<BpeModel> m(new BpeModel());

  // vocab
  if (!j.contains("vocab") || !j.at("vocab").is_object()) {
    return ctx.Error("model.vocab", "expected an object {token: id}");
  }
  const json& vocab = j.at("vocab");
  int64_t max_id = -1;
  m->vocab_.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() >= kMaxTokenId) {
      return ctx.Error("model.vocab", "every id must be an integer in [0, 2^24)");
    }
    int64_t id = it.value().get<int64_t>();
    m->vocab_[it.key()] = static_cast<int32_t>(id);
    max_id = std::max(max_id, id);
  }
  m->vocab_r_.resize(static_cast<size_t>(max_id + 1));
  m->has_id_.assign(static_cast<size_t>(max_id + 1), 0);
  for (const auto& [token, id] : m->vocab_) {
    m->vocab_r_[id] = token;
    m->has_id_[id] = 1;
  }

  // options
  SP_ASSIGN_OR_RETURN(m->byte_fallback_, GetBool(j, "byte_fallback", false, "model", ctx));
  SP_ASSIGN_OR_RETURN(m->fuse_unk_, GetBool(j, "fuse_unk", false, "model", ctx));
  SP_ASSIGN_OR_RETURN(m->ignore_merges_, GetBool(j, "ignore_merges", false, "model", ctx));
  auto opt_string = [&](const char* key, std::string* out) -> absl::Status {
    if (!j.contains(key) || j.at(key).is_null()) return absl::OkStatus();
    if (!j.at(key).is_string())
      return ctx.Error(absl::StrCat("model.", key), "expected a string or null");
    *out = j.at(key).get<std::string>();
    return absl::OkStatus();
  };
  std::string unk;
  SP_RETURN_IF_ERROR(opt_string("unk_token", &unk));
  SP_RETURN_IF_ERROR(opt_string("continuing_subword_prefix", &m->continuing_subword_prefix_));
  SP_RETURN_IF_ERROR(opt_string("end_of_word_suffix", &m->end_of_word_suffix_));
  if (!unk.empty()) {
    // HF only fails when an unknown character is actually met; we then drop it.
    if (auto id = m->Lookup(unk)) m->unk_id_ = *id;
  }
  for (int b = 0; b < 256; ++b) {
    auto id = m->Lookup(absl::StrFormat("<0x%02X>", b));
    m->byte_ids_[b] = id ? *id : -1;
  }

  // merges: ["a b", ...] or [["a", "b"], ...]; rank = position.
  if (!j.contains("merges") || !j.at("merges").is_array()) {
    return ctx.Error("model.merges", "expected an array");
  }
  const json& merges = j.at("merges");
  m->merges_.reserve(merges.size());
  const size_t prefix_len = m->continuing_subword_prefix_.size();
  for (size_t r = 0; r < merges.size(); ++r) {
    std::string a, b;
    std::string field = absl::StrCat("model.merges[", r, "]");
    if (const char* why = MergePair(merges[r], &a, &b)) return ctx.Error(field, why);
    auto ida = m->Lookup(a);
    auto idb = m->Lookup(b);
    if (!ida || !idb) return ctx.Error(field, "merge token is not in the vocabulary");
    if (b.size() < prefix_len)
      return ctx.Error(field, "merge token shorter than the subword prefix");
    auto idn = m->Lookup(a + b.substr(prefix_len));
    if (!idn) return ctx.Error(field, "merged token is not in the vocabulary");
    // Later duplicates win, as when HF collects the merges into a map.
    m->merges_[PairKey(*ida, *idb)] = {static_cast<int32_t>(r), *idn};
  }
  return m;
}

std::optional<int32_t> BpeModel::Lookup(std::string_view s) const {
  auto it = vocab_.find(absl::string_view(s.data(), s.size()));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

std::optional<int32_t> BpeModel::TokenToId(std::string_view token) const { return Lookup(token); }

const std::string* BpeModel::IdToToken(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= vocab_r_.size() || !has_id_[id]) return nullptr;
  return &vocab_r_[id];
}

void BpeModel::Tokenize(std::string_view word, std::vector<int32_t>* out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (auto id = Lookup(word)) {
      out->push_back(*id);
      return;
    }
  }
  if (word.size() > kMaxCachedWordBytes) {
    MergeWord(word, out);
    return;
  }
  {
    absl::ReaderMutexLock lock(&mu_);
    auto it = cache_.find(absl::string_view(word.data(), word.size()));
    if (it != cache_.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  size_t first = out->size();
  MergeWord(word, out);
  std::vector<int32_t> ids(out->begin() + first, out->end());
  absl::MutexLock lock(&mu_);
  if (cache_.size() >= kCacheCapacity) cache_.clear();
  cache_.emplace(std::string(word), std::move(ids));
}

void BpeModel::MergeWord(std::string_view w, std::vector<int32_t>* out) const {
  std::vector<Symbol> syms;
  syms.reserve(w.size());
  auto add = [&syms](int32_t id, size_t len) {
    int32_t idx = static_cast<int32_t>(syms.size());
    syms.push_back(Symbol{id, idx - 1, -1, static_cast<uint32_t>(len)});
    if (idx > 0) syms[idx - 1].next = idx;
  };
  bool has_unk = false;
  int32_t unk_id = -1;
  size_t unk_len = 0;
  std::string buf;
  size_t i = 0;
  while (i < w.size()) {
    size_t start = i;
    char32_t c;
    NextCodePoint(w, &i, &c);
    std::string_view s = w.substr(start, i - start);
    const size_t byte_len = s.size();
    const bool affixed = (start > 0 && !continuing_subword_prefix_.empty()) ||
                         (i >= w.size() && !end_of_word_suffix_.empty());
    if (affixed) {
      buf.clear();
      if (start > 0) buf.append(continuing_subword_prefix_);
      buf.append(s);
      if (i >= w.size()) buf.append(end_of_word_suffix_);
      s = buf;
    }
    if (auto id = Lookup(s)) {
      if (has_unk) {
        add(unk_id, unk_len);
        has_unk = false;
      }
      add(*id, byte_len);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (unsigned char b : s) all = all && byte_ids_[b] >= 0;
      if (all) {
        for (unsigned char b : s) add(byte_ids_[b], 1);
        continue;
      }
    }
    if (unk_id_ >= 0) {
      if (has_unk && fuse_unk_) {
        unk_len += byte_len;
      } else {
        if (has_unk) add(unk_id, unk_len);
        has_unk = true;
        unk_id = unk_id_;
        unk_len = byte_len;
      }
    }
  }
  if (has_unk) add(unk_id, unk_len);

  if (syms.size() > 1 && !merges_.empty()) ApplyMerges(merges_, &syms);
  for (const Symbol& s : syms) {
    if (s.len != 0) out->push_back(s.id);
  }
}

}  // namespace superpose::engine::tok
