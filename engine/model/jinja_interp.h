// The evaluator of the Jinja interpreter (jinja.h): scopes, statements and expressions
// (jinja_eval.cc) and the built-in filters, tests, methods and globals
// (jinja_builtins.cc). Internal to engine/model/jinja*.cc.
#ifndef SUPERPOSE_ENGINE_MODEL_JINJA_INTERP_H_
#define SUPERPOSE_ENGINE_MODEL_JINJA_INTERP_H_

#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/time/time.h"
#include "engine/model/jinja.h"
#include "engine/model/jinja_ast.h"
#include "engine/model/jinja_value.h"

namespace superpose::model::jinja {

// Variables of a block; scopes live as long as the render (the Interp owns them).
struct Scope {
  Scope* parent = nullptr;
  absl::flat_hash_map<std::string, Value> vars;
  const Value* Find(const std::string& name) const;
  void Set(const std::string& name, Value v) { vars[name] = std::move(v); }
};

enum class Flow { kNormal, kBreak, kContinue };

class Interp {
 public:
  Interp(const RenderLimits& limits, absl::Time now) : limits_(limits), now_(now) {}
  ~Interp();
  std::string Run(const Node& program, const nlohmann::ordered_json& context);

  // Budget: each call charges `n` steps; strings longer than the output cap fail.
  void Step(int64_t n = 1);
  void CheckSize(size_t bytes) const;
  Scope* NewScope(Scope* parent);
  Value MakeNamespace();
  absl::Time now() const { return now_; }

  Flow Render(const std::vector<NodePtr>& body, Scope* scope, std::string* out);
  Value Eval(const Node* n, Scope* scope);
  Args EvalArgs(const std::vector<NodePtr>& args, Scope* scope);
  Value Call(const Value& fn, Args& args);

  // jinja_builtins.cc
  void AddGlobals(Scope* scope);
  Value Filter(const Value& v, const Node& filter, Scope* scope);
  Value SimpleFilter(const Value& v, const std::string& name);
  bool Test(const std::string& name, const Value& v, const Args& args) const;
  Value Attribute(const Value& object, const Value& property);

 private:
  void RenderStatement(const Node& n, Scope* scope, std::string* out, Flow* flow);
  Flow RenderFor(const Node& n, Scope* scope, std::string* out);
  std::vector<Value> ForItems(const Node& n, const Value& iterable, Scope* scope);
  void Bind(const Node& target, const Value& v, Scope* scope);
  void ExecSet(const Node& n, Scope* scope);
  Value DefineMacro(const Node& n, Scope* scope);
  void BindParameters(const std::vector<NodePtr>& params, Args& args, Scope* scope);
  Value CallBlock(const Node& n, Scope* scope);
  Value EvalBinary(const Node& n, Scope* scope);
  Value EvalUnary(const Node& n, Scope* scope);
  Value EvalMember(const Node& n, Scope* scope);
  Value EvalSlice(const Value& v, const Node& slice, Scope* scope);
  Value EvalLiteral(const Node& n, Scope* scope);
  // jinja_builtins.cc
  Value CallFilter(const Value& v, const std::string& name, Args& args, const Node& call);
  Value ListFilter(const Value& v, const std::string& name, Args& args, const Node& call);

  RenderLimits limits_;
  absl::Time now_;
  int64_t steps_ = 0;
  int call_depth_ = 0;
  std::deque<Scope> scopes_;
  std::vector<std::shared_ptr<Object>> namespaces_;  // cleared at the end (cycles)
};

// String methods (`s.strip()`), list and dict methods, as bound functions; undefined
// when `name` is none.
Value StringMethod(const Value& s, const std::string& name);
Value DictMethod(const Value& d, const std::string& name);
// Python-style `str.replace` with JavaScript's empty-pattern behaviour.
std::string ReplaceAll(const std::string& s, const std::string& from, const std::string& to,
                       int64_t count);

}  // namespace superpose::model::jinja

#endif  // SUPERPOSE_ENGINE_MODEL_JINJA_INTERP_H_
