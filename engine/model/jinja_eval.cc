// Statements and expressions of the Jinja interpreter, as @huggingface/jinja evaluates
// them (jinja.h).
#include <cmath>

#include "absl/strings/str_cat.h"
#include "engine/model/jinja_interp.h"

namespace superpose::model::jinja {

const Value* Scope::Find(const std::string& name) const {
  for (const Scope* s = this; s; s = s->parent) {
    auto it = s->vars.find(name);
    if (it != s->vars.end()) return &it->second;
  }
  return nullptr;
}

Interp::~Interp() {
  // Namespaces are the only mutable values: clearing them breaks any reference cycle
  // a template built through them.
  for (auto& ns : namespaces_) ns->items.clear();
}

void Interp::Step(int64_t n) {
  steps_ += n;
  if (steps_ > limits_.max_steps) {
    throw Error(Error::Kind::kBudget,
                absl::StrCat("template exceeded its budget of ", limits_.max_steps, " steps"));
  }
}

void Interp::CheckSize(size_t bytes) const {
  if (static_cast<int64_t>(bytes) > limits_.max_output_bytes) {
    throw Error(Error::Kind::kBudget,
                absl::StrCat("template built a string over ", limits_.max_output_bytes, " bytes"));
  }
}

Scope* Interp::NewScope(Scope* parent) {
  Step();
  scopes_.emplace_back();
  scopes_.back().parent = parent;
  return &scopes_.back();
}

Value Interp::MakeNamespace() {
  Value ns = Value::Dict(nullptr, Type::kNamespace);
  namespaces_.push_back(ns.obj);
  return ns;
}

std::string Interp::Run(const Node& program, const nlohmann::ordered_json& context) {
  Scope* global = NewScope(nullptr);
  AddGlobals(global);
  if (context.is_object()) {
    for (const auto& [key, value] : context.items()) {
      if (global->vars.contains(key)) throw Error("Variable already declared: " + key);
      global->Set(key, FromJson(value));
    }
  }
  std::string out;
  if (Render(program.a, global, &out) != Flow::kNormal) {
    throw Error("break or continue outside a loop");
  }
  return out;
}

Flow Interp::Render(const std::vector<NodePtr>& body, Scope* scope, std::string* out) {
  Flow flow = Flow::kNormal;
  for (const NodePtr& n : body) {
    Step();
    RenderStatement(*n, scope, out, &flow);
    CheckSize(out->size());
    if (flow != Flow::kNormal) break;
  }
  return flow;
}

void Interp::RenderStatement(const Node& n, Scope* scope, std::string* out, Flow* flow) {
  switch (n.kind) {
    case NodeKind::kText:
      *out += n.str;
      return;
    case NodeKind::kIf:
      *flow = Render(Eval(n.x.get(), scope).Truthy() ? n.a : n.b, scope, out);
      return;
    case NodeKind::kFor:
      *flow = RenderFor(n, scope, out);
      return;
    case NodeKind::kSet:
      ExecSet(n, scope);
      return;
    case NodeKind::kMacro:
      scope->Set(n.str, DefineMacro(n, scope));
      return;
    case NodeKind::kBreak:
      *flow = Flow::kBreak;
      return;
    case NodeKind::kContinue:
      *flow = Flow::kContinue;
      return;
    default:
      break;
  }
  Value v;
  if (n.kind == NodeKind::kCallBlock) {
    v = CallBlock(n, scope);
  } else if (n.kind == NodeKind::kFilterBlock) {
    std::string body;
    if (Render(n.a, scope, &body) != Flow::kNormal)
      throw Error("break or continue in a filter block");
    v = Filter(Value::Str(std::move(body)), *n.x, scope);
  } else {
    v = Eval(&n, scope);
  }
  if (!v.IsNone() && !v.IsUndefined()) *out += ToPrint(v);
}

std::vector<Value> Interp::ForItems(const Node& n, const Value& iterable, Scope* scope) {
  std::vector<Value> candidates;
  if (iterable.IsList()) {
    candidates = *iterable.arr;
  } else if (iterable.is(Type::kObject)) {
    for (const auto& item : iterable.obj->items) candidates.push_back(Value::Str(item.first));
  } else {
    throw Error(absl::StrCat("Expected iterable or object type in for loop: got ",
                             TypeName(iterable.type)));
  }
  if (n.x->kind == NodeKind::kIdent && !n.z) return candidates;
  std::vector<Value> items;
  for (const Value& item : candidates) {
    if (n.x->kind == NodeKind::kTuple) {
      if (!item.IsList()) throw Error("Cannot unpack non-iterable type in for loop");
      if (item.arr->size() != n.x->a.size()) throw Error("Wrong number of items to unpack");
    }
    if (n.z) {
      Scope* test_scope = NewScope(scope);
      Bind(*n.x, item, test_scope);
      if (!Eval(n.z.get(), test_scope).Truthy()) continue;
    }
    items.push_back(item);
  }
  return items;
}

Flow Interp::RenderFor(const Node& n, Scope* parent, std::string* out) {
  Scope* scope = NewScope(parent);
  const std::vector<Value> items = ForItems(n, Eval(n.y.get(), scope), scope);
  const auto size = static_cast<int64_t>(items.size());
  for (int64_t k = 0; k < size; ++k) {
    auto loop = std::make_shared<Object>();
    loop->items = {{"index", Value::Int(k + 1)},
                   {"index0", Value::Int(k)},
                   {"revindex", Value::Int(size - k)},
                   {"revindex0", Value::Int(size - k - 1)},
                   {"first", Value::Bool(k == 0)},
                   {"last", Value::Bool(k == size - 1)},
                   {"length", Value::Int(size)},
                   {"previtem", k > 0 ? items[k - 1] : Value()},
                   {"nextitem", k < size - 1 ? items[k + 1] : Value()}};
    scope->Set("loop", Value::Dict(std::move(loop)));
    Bind(*n.x, items[k], scope);
    // As Python Jinja: what the iteration wrote before a break or continue stays, and
    // `else` renders only when there was no item (@huggingface/jinja drops the first
    // and counts an iteration that continued as none).
    if (Render(n.a, scope, out) == Flow::kBreak) break;
  }
  if (items.empty()) Render(n.b, scope, out);
  return Flow::kNormal;
}

void Interp::Bind(const Node& target, const Value& v, Scope* scope) {
  if (target.kind == NodeKind::kIdent) {
    scope->Set(target.str, v);
    return;
  }
  for (size_t k = 0; k < target.a.size(); ++k) {
    if (target.a[k]->kind != NodeKind::kIdent) throw Error("Cannot unpack to a non-identifier");
    scope->Set(target.a[k]->str, k < v.arr->size() ? (*v.arr)[k] : Value());
  }
}

void Interp::ExecSet(const Node& n, Scope* scope) {
  Value rhs;
  if (n.y) {
    rhs = Eval(n.y.get(), scope);
  } else {
    std::string body;
    if (Render(n.a, scope, &body) != Flow::kNormal) throw Error("break or continue in a set block");
    rhs = Value::Str(std::move(body));
  }
  const Node& target = *n.x;
  if (target.kind == NodeKind::kIdent) {
    scope->Set(target.str, std::move(rhs));
  } else if (target.kind == NodeKind::kTuple) {
    if (!rhs.IsList()) throw Error("Cannot unpack non-iterable type in set");
    if (rhs.arr->size() != target.a.size()) throw Error("Wrong number of items to unpack in set");
    Bind(target, rhs, scope);
  } else if (target.kind == NodeKind::kMember && !target.flag) {
    const Value object = Eval(target.x.get(), scope);
    if (!object.is(Type::kNamespace))
      throw Error("cannot assign attribute on non-namespace object");
    if (target.y->kind != NodeKind::kIdent) throw Error("Cannot assign to a non-identifier member");
    object.obj->Set(target.y->str, std::move(rhs));
  } else {
    throw Error("Invalid left-hand side of an assignment");
  }
}

void Interp::BindParameters(const std::vector<NodePtr>& params, Args& args, Scope* scope) {
  std::vector<const Node*> pending;
  for (size_t k = 0; k < params.size(); ++k) {
    const Node& p = *params[k];
    const std::string& name = p.kind == NodeKind::kKwArg ? p.str : p.str;
    const Value* given = k < args.pos.size() ? &args.pos[k] : args.Kw(name);
    if (!given && p.kind == NodeKind::kKwArg) pending.push_back(&p);
    scope->Set(name, given ? *given : Value());
  }
  auto kwargs = std::make_shared<Object>();
  for (const auto& [key, value] : args.kw) {
    bool is_param = false;
    for (const NodePtr& p : params) is_param |= p->str == key;
    if (!is_param) kwargs->Set(key, value);
  }
  scope->Set("kwargs", Value::Dict(std::move(kwargs)));
  Array varargs;
  for (size_t k = params.size(); k < args.pos.size(); ++k) varargs.push_back(args.pos[k]);
  scope->Set("varargs", Value::List(std::move(varargs)));
  for (const Node* p : pending) scope->Set(p->str, Eval(p->x.get(), scope));
}

Value Interp::DefineMacro(const Node& n, Scope* scope) {
  const Node* node = &n;
  return Value::Func([node, scope](Interp& in, Args& args) {
    if (++in.call_depth_ > in.limits_.max_call_depth) {
      throw Error(Error::Kind::kBudget, "template macros nested too deeply");
    }
    Scope* outer = in.NewScope(scope);
    outer->Set("caller", args.caller);
    Scope* inner = in.NewScope(outer);
    in.BindParameters(node->a, args, inner);
    std::string out;
    if (in.Render(node->b, inner, &out) != Flow::kNormal)
      throw Error("break or continue in a macro");
    --in.call_depth_;
    return Value::Str(std::move(out));
  });
}

Value Interp::CallBlock(const Node& n, Scope* scope) {
  const Node* node = &n;
  Args args = EvalArgs(n.x->a, scope);
  args.caller = Value::Func([node, scope](Interp& in, Args& caller_args) {
    Scope* body_scope = in.NewScope(scope);
    in.BindParameters(node->a, caller_args, body_scope);
    std::string out;
    if (in.Render(node->b, body_scope, &out) != Flow::kNormal) throw Error("break in a call block");
    return Value::Str(std::move(out));
  });
  return Call(Eval(n.x->x.get(), scope), args);
}

Args Interp::EvalArgs(const std::vector<NodePtr>& nodes, Scope* scope) {
  Args args;
  for (const NodePtr& a : nodes) {
    if (a->kind == NodeKind::kSpread) {
      const Value v = Eval(a->x.get(), scope);
      if (!v.IsList())
        throw Error(absl::StrCat("Cannot unpack non-iterable type: ", TypeName(v.type)));
      args.pos.insert(args.pos.end(), v.arr->begin(), v.arr->end());
    } else if (a->kind != NodeKind::kKwArg && a->kind != NodeKind::kKwSpread) {
      args.pos.push_back(Eval(a.get(), scope));
    }
  }
  for (const NodePtr& a : nodes) {
    if (a->kind == NodeKind::kKwArg) {
      if (args.Kw(a->str)) throw Error("Got multiple values for keyword argument '" + a->str + "'");
      args.kw.emplace_back(a->str, Eval(a->x.get(), scope));
    } else if (a->kind == NodeKind::kKwSpread) {
      const Value v = Eval(a->x.get(), scope);
      if (!v.is(Type::kObject)) throw Error("Argument after ** must be a mapping");
      for (const auto& item : v.obj->items) args.kw.push_back(item);
    }
  }
  return args;
}

Value Interp::Call(const Value& fn, Args& args) {
  if (!fn.is(Type::kFunction)) {
    throw Error(
        absl::StrCat("Cannot call something that is not a function: got ", TypeName(fn.type)));
  }
  return (*fn.fn)(*this, args);
}

Value Interp::Eval(const Node* n, Scope* scope) {
  if (!n) return Value();
  Step();
  switch (n->kind) {
    case NodeKind::kIdent: {
      const Value* v = scope->Find(n->str);
      return v ? *v : Value();
    }
    case NodeKind::kInt:
      return Value::Int(n->i);
    case NodeKind::kFloat:
      return Value::Float(n->f);
    case NodeKind::kString:
      return Value::Str(n->str);
    case NodeKind::kList:
    case NodeKind::kTuple:
    case NodeKind::kDict:
      return EvalLiteral(*n, scope);
    case NodeKind::kMember:
      return EvalMember(*n, scope);
    case NodeKind::kCall: {
      Args args = EvalArgs(n->a, scope);
      return Call(Eval(n->x.get(), scope), args);
    }
    case NodeKind::kBinary:
      return EvalBinary(*n, scope);
    case NodeKind::kUnary:
      return EvalUnary(*n, scope);
    case NodeKind::kFilter:
      return Filter(Eval(n->x.get(), scope), *n->y, scope);
    case NodeKind::kTest: {
      const Value v = Eval(n->x.get(), scope);
      const Args args = EvalArgs(n->a, scope);
      return Value::Bool(Test(n->str, v, args) != n->flag);
    }
    case NodeKind::kSelect:
      return Eval(n->y.get(), scope).Truthy() ? Eval(n->x.get(), scope) : Value();
    case NodeKind::kTernary:
      return Eval(Eval(n->x.get(), scope).Truthy() ? n->y.get() : n->z.get(), scope);
    default:
      throw Error("Unexpected statement in an expression");
  }
}

Value Interp::EvalLiteral(const Node& n, Scope* scope) {
  if (n.kind != NodeKind::kDict) {
    Array items;
    for (const NodePtr& x : n.a) items.push_back(Eval(x.get(), scope));
    return Value::List(std::move(items), n.kind == NodeKind::kTuple ? Type::kTuple : Type::kArray);
  }
  auto obj = std::make_shared<Object>();
  for (size_t k = 0; k < n.a.size(); ++k) {
    const Value key = Eval(n.a[k].get(), scope);
    if (!key.is(Type::kString)) {
      throw Error(absl::StrCat("Object keys must be strings: got ", TypeName(key.type)));
    }
    obj->Set(key.str(), Eval(n.b[k].get(), scope));
  }
  return Value::Dict(std::move(obj));
}

Value Interp::EvalMember(const Node& n, Scope* scope) {
  const Value object = Eval(n.x.get(), scope);
  if (n.flag && n.y->kind == NodeKind::kSlice) return EvalSlice(object, *n.y, scope);
  Value property;
  if (n.flag) {
    property = Eval(n.y.get(), scope);
  } else if (n.y->kind == NodeKind::kInt) {
    property = Value::Int(n.y->i);
  } else {
    property = Value::Str(n.y->str);
  }
  return Attribute(object, property);
}

namespace {
// JavaScript's slice helper of @huggingface/jinja (Python semantics).
std::vector<size_t> SliceIndices(int64_t len, const Value& start_v, const Value& stop_v,
                                 const Value& step_v) {
  const int64_t step = step_v.IsUndefined() ? 1 : step_v.i;
  if (step == 0) throw Error("slice step cannot be zero");
  int64_t start, stop;
  if (step > 0) {
    start = start_v.IsUndefined() ? 0 : start_v.i;
    stop = stop_v.IsUndefined() ? len : stop_v.i;
    start = start < 0 ? std::max<int64_t>(len + start, 0) : std::min(start, len);
    stop = stop < 0 ? std::max<int64_t>(len + stop, 0) : std::min(stop, len);
  } else {
    start = start_v.IsUndefined() ? len - 1 : start_v.i;
    stop = stop_v.IsUndefined() ? -1 : stop_v.i;
    start = start < 0 ? std::max<int64_t>(len + start, -1) : std::min(start, len - 1);
    stop = stop < -1 ? std::max<int64_t>(len + stop, -1) : std::min(stop, len - 1);
  }
  std::vector<size_t> out;
  for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) out.push_back(k);
  return out;
}
}  // namespace

Value Interp::EvalSlice(const Value& v, const Node& slice, Scope* scope) {
  if (!v.IsList() && !v.is(Type::kString)) throw Error("Slice object must be an array or string");
  const Value start = Eval(slice.x.get(), scope), stop = Eval(slice.y.get(), scope),
              step = Eval(slice.z.get(), scope);
  for (const Value* part : {&start, &stop, &step}) {
    if (!part->is(Type::kInt) && !part->IsUndefined())
      throw Error("Slice indices must be integers");
  }
  if (v.IsList()) {
    Array out;
    for (size_t k : SliceIndices(v.arr->size(), start, stop, step)) out.push_back((*v.arr)[k]);
    Step(out.size());
    return Value::List(std::move(out));
  }
  const std::vector<std::string> chars = CodePoints(v.str());
  std::string out;
  for (size_t k : SliceIndices(chars.size(), start, stop, step)) out += chars[k];
  Step(chars.size());
  return Value::Str(std::move(out));
}

Value Interp::EvalUnary(const Node& n, Scope* scope) {
  const Value v = Eval(n.x.get(), scope);
  if (n.str == "not") return Value::Bool(!v.Truthy());
  const int sign = n.str == "-" ? -1 : 1;
  if (v.is(Type::kFloat)) return Value::Float(sign * v.f);
  if (v.is(Type::kInt) || v.is(Type::kBool))
    return Value::Int(sign * (v.is(Type::kInt) ? v.i : v.b));
  throw Error(absl::StrCat("Unknown operator \"", n.str, "\" for ", TypeName(v.type)));
}

namespace {
Value Arithmetic(const std::string& op, const Value& l, const Value& r) {
  const bool fl = l.is(Type::kFloat) || r.is(Type::kFloat);
  const double a = l.num(), b = r.num();
  if (op == "+" || op == "-" || op == "*") {
    if (fl) return Value::Float(op == "+" ? a + b : op == "-" ? a - b : a * b);
    int64_t out;
    const bool overflow = op == "+"   ? __builtin_add_overflow(l.i, r.i, &out)
                          : op == "-" ? __builtin_sub_overflow(l.i, r.i, &out)
                                      : __builtin_mul_overflow(l.i, r.i, &out);
    if (overflow) throw Error("integer overflow");
    return Value::Int(out);
  }
  if (op == "/") return Value::Float(a / b);
  if (op == "//" || op == "%") {
    if (!fl && r.i == 0) throw Error("integer division or modulo by zero");
    if (op == "%") return fl ? Value::Float(std::fmod(a, b)) : Value::Int(l.i % r.i);
    return fl ? Value::Float(std::floor(a / b))
              : Value::Int(static_cast<int64_t>(std::floor(a / b)));
  }
  if (op == "<") return Value::Bool(a < b);
  if (op == ">") return Value::Bool(a > b);
  if (op == "<=") return Value::Bool(a <= b);
  if (op == ">=") return Value::Bool(a >= b);
  return Value();  // not an arithmetic operator: the caller goes on
}

bool Member(const Value& item, const Value& list) {
  for (const Value& x : *list.arr) {
    if (StrictEquals(x, item)) return true;
  }
  return false;
}
}  // namespace

Value Interp::EvalBinary(const Node& n, Scope* scope) {
  const std::string& op = n.str;
  const Value l = Eval(n.x.get(), scope);
  if (op == "and") return l.Truthy() ? Eval(n.y.get(), scope) : l;
  if (op == "or") return l.Truthy() ? l : Eval(n.y.get(), scope);
  const Value r = Eval(n.y.get(), scope);
  if (op == "==" || op == "!=") return Value::Bool(LooseEquals(l, r) == (op == "=="));
  const bool in = op == "in" || op == "not in";
  if (l.IsNumber() && r.IsNumber() && op != "~" && op != "**") {
    Value v = Arithmetic(op, l, r);
    if (!v.IsUndefined()) return v;
  } else if (l.IsUndefined() || r.IsUndefined()) {
    if (r.IsUndefined() && in) return Value::Bool(op == "not in");
    if (op == "~" && !l.IsNone() && !r.IsNone()) {
      std::string s = (l.IsUndefined() ? "" : JsString(l)) + (r.IsUndefined() ? "" : JsString(r));
      return Value::Str(std::move(s));
    }
    throw Error("Cannot perform operation " + op + " on undefined values");
  } else if (l.IsNone() || r.IsNone()) {
    throw Error("Cannot perform operation on null values");
  } else if (op == "~") {
    std::string s = JsString(l) + JsString(r);
    CheckSize(s.size());
    Step(s.size() / 256);
    return Value::Str(std::move(s));
  } else if (op == "**" && !l.IsList() && (l.IsNumber() || l.is(Type::kBool)) &&
             (r.IsNumber() || r.is(Type::kBool))) {
    if (l.num() == 0 && r.num() < 0) throw Error("0.0 cannot be raised to a negative power");
    const double v = std::pow(l.num(), r.num());
    if (!std::isfinite(v) || std::fabs(v) > 9007199254740992.0)
      throw Error("Exponentiation result too large");
    if (l.is(Type::kFloat) || r.is(Type::kFloat) || r.num() < 0) return Value::Float(v);
    return Value::Int(static_cast<int64_t>(v));
  } else if (l.IsList() && r.IsList()) {
    if (op == "+") {
      Array out = *l.arr;
      out.insert(out.end(), r.arr->begin(), r.arr->end());
      Step(out.size());
      return Value::List(std::move(out));
    }
  } else if (r.IsList() && in) {
    return Value::Bool(Member(l, r) == (op == "in"));
  }
  if ((l.is(Type::kString) || r.is(Type::kString)) && op == "+") {
    std::string s = JsString(l) + JsString(r);
    CheckSize(s.size());
    Step(s.size() / 256);
    return Value::Str(std::move(s));
  }
  if (l.is(Type::kString) && r.is(Type::kString) && in) {
    return Value::Bool((r.str().find(l.str()) != std::string::npos) == (op == "in"));
  }
  if (l.is(Type::kString) && r.is(Type::kObject) && in) {
    return Value::Bool((r.obj->Find(l.str()) != nullptr) == (op == "in"));
  }
  throw Error(absl::StrCat("Unknown operator \"", op, "\" between ", TypeName(l.type), " and ",
                           TypeName(r.type)));
}

}  // namespace superpose::model::jinja

namespace superpose::model::jinja {

absl::StatusOr<Template> Template::Parse(const std::string& source) {
  absl::StatusOr<NodePtr> root = ParseTemplate(source);
  if (!root.ok()) return root.status();
  return Template(std::shared_ptr<const Node>(std::move(*root)));
}

absl::StatusOr<std::string> Template::Render(const nlohmann::ordered_json& context, absl::Time now,
                                             const RenderLimits& limits) const {
  try {
    Interp interp(limits, now);
    return interp.Run(*root_, context);
  } catch (const Error& e) {
    if (e.kind == Error::Kind::kRaised) return absl::InvalidArgumentError(e.what());
    if (e.kind == Error::Kind::kBudget) return absl::ResourceExhaustedError(e.what());
    return absl::InvalidArgumentError(absl::StrCat("template error: ", e.what()));
  } catch (const std::exception& e) {  // std::bad_alloc, nlohmann::json
    return absl::InternalError(absl::StrCat("template error: ", e.what()));
  }
}

}  // namespace superpose::model::jinja
