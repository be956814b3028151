// Built-in globals, filters, tests and methods of the Jinja interpreter, with
// @huggingface/jinja's behaviour; a few that it lacks (marked "beyond") follow Python
// Jinja.
#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "engine/model/jinja_interp.h"

namespace superpose::model::jinja {
namespace {

Value Range(Interp& in, Args& args) {
  if (args.pos.empty() || args.pos.size() > 3) throw Error("range() takes 1 to 3 arguments");
  for (const Value& v : args.pos) {
    if (!v.is(Type::kInt)) throw Error("range() arguments must be integers");
  }
  int64_t start = 0, stop = args.pos[0].i, step = 1;
  if (args.pos.size() >= 2) start = args.pos[0].i, stop = args.pos[1].i;
  if (args.pos.size() == 3) step = args.pos[2].i;
  if (step == 0) throw Error("range() step must not be zero");
  Array out;
  for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
    in.Step();
    out.push_back(Value::Int(k));
  }
  return Value::List(std::move(out));
}

Value Namespace(Interp& in, Args& args) {
  Value ns = in.MakeNamespace();
  if (args.pos.size() > 1) throw Error("namespace expected at most 1 argument");
  if (!args.pos.empty()) {
    const Value& src = args.pos[0];
    if (src.is(Type::kObject)) {
      for (const auto& item : src.obj->items) ns.obj->Set(item.first, item.second);
    } else if (src.IsList()) {
      for (const Value& pair : *src.arr) {
        if (!pair.IsList() || pair.arr->size() != 2 || !(*pair.arr)[0].is(Type::kString)) {
          throw Error("namespace expected an object or an iterable of [key, value] pairs");
        }
        ns.obj->Set((*pair.arr)[0].str(), (*pair.arr)[1]);
      }
    } else {
      throw Error("namespace expected an object or a list of pairs");
    }
  }
  for (const auto& [key, value] : args.kw) ns.obj->Set(key, value);
  return ns;
}

// strftime_now(format): %Y %m %d %b %B %H %M %% of the render's clock (UTC), as
// @huggingface/jinja (other directives stay as they are).
Value StrftimeNow(Interp& in, Args& args) {
  if (args.pos.empty() || !args.pos[0].is(Type::kString))
    throw Error("strftime_now expects a format");
  static const char* const kMonths[] = {"January",   "February", "March",    "April",
                                        "May",       "June",     "July",     "August",
                                        "September", "October",  "November", "December"};
  const absl::CivilSecond t = absl::ToCivilSecond(in.now(), absl::UTCTimeZone());
  auto pad2 = [](int v) { return absl::StrCat(v < 10 ? "0" : "", v); };
  const std::string& f = args.pos[0].str();
  std::string out;
  for (size_t k = 0; k < f.size(); ++k) {
    const char d = k + 1 < f.size() && f[k] == '%' ? f[k + 1] : 0;
    const std::string month = kMonths[t.month() - 1];
    std::string piece;
    switch (d) {
      case 'Y':
        piece = absl::StrCat(t.year());
        break;
      case 'm':
        piece = pad2(t.month());
        break;
      case 'd':
        piece = pad2(t.day());
        break;
      case 'b':
        piece = month.substr(0, 3);
        break;
      case 'B':
        piece = month;
        break;
      case 'H':
        piece = pad2(t.hour());
        break;
      case 'M':
        piece = pad2(t.minute());
        break;
      case '%':
        piece = "%";
        break;
      default:
        out.push_back(f[k]);
        continue;
    }
    out += piece;
    ++k;
  }
  return Value::Str(std::move(out));
}

Value Bound(std::function<Value(Args&)> fn) {
  return Value::Func([fn = std::move(fn)](Interp&, Args& args) { return fn(args); });
}

const std::string& StrArg(const Args& args, size_t k, const char* what) {
  if (k >= args.pos.size() || !args.pos[k].is(Type::kString)) {
    throw Error(absl::StrCat(what, "() argument must be a string"));
  }
  return args.pos[k].str();
}

bool StartsOrEnds(const std::string& s, const Value& pattern, bool start) {
  auto match = [&](const std::string& p) {
    return p.size() <= s.size() && s.compare(start ? 0 : s.size() - p.size(), p.size(), p) == 0;
  };
  if (pattern.is(Type::kString)) return match(pattern.str());
  if (!pattern.IsList()) throw Error("startswith()/endswith() argument must be a string or tuple");
  for (const Value& p : *pattern.arr) {
    if (!p.is(Type::kString)) throw Error("startswith()/endswith() tuple elements must be strings");
    if (match(p.str())) return true;
  }
  return false;
}

// strip/lstrip/rstrip: whitespace, or (beyond) the characters given.
std::string Strip(const std::string& s, const Args& args, bool left, bool right) {
  std::string_view v = s;
  if (args.pos.empty() || args.pos[0].IsNone()) {
    if (left) v = TrimStart(v);
    if (right) v = TrimEnd(v);
    return std::string(v);
  }
  const std::string& chars = StrArg(args, 0, "strip");
  const size_t b = left ? v.find_first_not_of(chars) : 0;
  if (b == std::string_view::npos) return "";
  const size_t e = right ? v.find_last_not_of(chars) : v.size() - 1;
  return std::string(v.substr(b, e + 1 - b));
}

Value Split(const std::string& s, const Args& args) {
  const Value* sep = args.Get(0, "sep");
  const Value* max = args.Get(1, "maxsplit");
  const int64_t maxsplit = max && max->is(Type::kInt) ? max->i : -1;
  Array out;
  if (!sep || sep->IsNone()) {
    std::string_view rest = TrimStart(s);
    while (!rest.empty()) {
      if (maxsplit >= 0 && static_cast<int64_t>(out.size()) >= maxsplit) {
        out.push_back(Value::Str(std::string(rest)));
        break;
      }
      size_t e = 0;
      while (e < rest.size() && !WhitespaceLen(rest, e)) ++e;
      out.push_back(Value::Str(std::string(rest.substr(0, e))));
      rest = TrimStart(rest.substr(e));
    }
    return Value::List(std::move(out));
  }
  if (!sep->is(Type::kString)) throw Error("sep argument must be a string or null");
  if (sep->str().empty()) throw Error("empty separator");
  size_t p = 0;
  while (true) {
    const size_t q = s.find(sep->str(), p);
    if (q == std::string::npos || (maxsplit >= 0 && static_cast<int64_t>(out.size()) >= maxsplit)) {
      out.push_back(Value::Str(s.substr(p)));
      break;
    }
    out.push_back(Value::Str(s.substr(p, q - p)));
    p = q + sep->str().size();
  }
  return Value::List(std::move(out));
}

// JavaScript's /\b\w/g upper-cased: the first letter of each ASCII word.
std::string Title(std::string s) {
  auto word = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  for (size_t k = 0; k < s.size(); ++k) {
    if (word(s[k]) && (k == 0 || !word(s[k - 1]))) s[k] = static_cast<char>(std::toupper(s[k]));
  }
  return s;
}

std::string Capitalize(const std::string& s) {
  const std::vector<std::string> chars = CodePoints(s);
  return chars.empty() ? s : Upper(chars[0]) + s.substr(chars[0].size());
}

Value ReplaceMethod(const std::string& s, const Args& args) {
  if (args.pos.size() < 2 || !args.pos[0].is(Type::kString) || !args.pos[1].is(Type::kString)) {
    throw Error("replace() requires two string arguments");
  }
  const Value* count = args.Get(2, "count");
  if (count && !count->is(Type::kInt) && !count->IsNone())
    throw Error("replace() count must be a number");
  const int64_t n = count && count->is(Type::kInt) ? count->i : -1;
  return Value::Str(ReplaceAll(s, args.pos[0].str(), args.pos[1].str(), n));
}

int64_t Count(const std::string& s, const std::string& sub) {
  if (sub.empty()) return Utf16Length(s) + 1;
  int64_t n = 0;
  for (size_t p = s.find(sub); p != std::string::npos; p = s.find(sub, p + sub.size())) ++n;
  return n;
}

Value Attr(const Value& item, const std::string& path) {
  Value v = item;
  for (const std::string& part : std::vector<std::string>(absl::StrSplit(path, '.'))) {
    if (v.IsMap()) {
      const Value* found = v.obj->Find(part);
      v = found ? *found : Value();
    } else if (v.IsList()) {
      char* end = nullptr;
      const std::string p(part);
      const long k = std::strtol(p.c_str(), &end, 10);
      if (end == p.c_str() || k < 0 || k >= static_cast<long>(v.arr->size())) return Value();
      v = (*v.arr)[k];
    } else {
      return Value();
    }
  }
  return v;
}

std::string Indent(const std::string& s, const std::string& pad, bool first, bool blank) {
  std::vector<std::string> lines = absl::StrSplit(s, '\n');
  for (size_t k = 0; k < lines.size(); ++k) {
    if ((k == 0 && !first) || (lines[k].empty() && !blank)) continue;
    lines[k] = pad + lines[k];
  }
  return absl::StrJoin(lines, "\n");
}

std::string HtmlEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&#34;";
        break;
      case '\'':
        out += "&#39;";
        break;
      default:
        out.push_back(c);
    }
  }
  return out;
}

// JavaScript's parseInt(s, 10) / parseFloat(s): a leading number, else NaN (nullopt).
bool ParseLeading(const std::string& s, bool integer, double* out) {
  const std::string t(TrimStart(s));
  char* end = nullptr;
  *out = integer ? static_cast<double>(std::strtoll(t.c_str(), &end, 10))
                 : std::strtod(t.c_str(), &end);
  if (!integer && t.compare(0, 3, "inf") == 0) return false;
  return end != t.c_str();
}

std::string JoinValues(const Array& items, const std::string& sep) {
  std::string out;
  for (size_t k = 0; k < items.size(); ++k) {
    if (k) out += sep;
    if (!items[k].IsNone() && !items[k].IsUndefined()) out += JsString(items[k]);
  }
  return out;
}

bool BoolArg(const Value* v, const char* name) {
  if (!v) return false;
  if (!v->is(Type::kBool)) throw Error(absl::StrCat(name, " must be a boolean"));
  return v->b;
}

}  // namespace

std::string ReplaceAll(const std::string& s, const std::string& from, const std::string& to,
                       int64_t count) {
  if (count == 0) return s;
  std::string out;
  int64_t left = count < 0 ? INT64_MAX : count;
  if (from.empty()) {
    for (const std::string& c : CodePoints(s)) {
      if (left > 0) out += to, --left;
      out += c;
    }
    if (left > 0) out += to;
    return out;
  }
  size_t p = 0;
  for (size_t q = s.find(from); q != std::string::npos && left > 0; q = s.find(from, p), --left) {
    out.append(s, p, q - p);
    out += to;
    p = q + from.size();
  }
  out.append(s, p);
  return out;
}

void Interp::AddGlobals(Scope* scope) {
  scope->Set("namespace", Value::Func(Namespace));
  for (const char* name : {"false", "False"}) scope->Set(name, Value::Bool(false));
  for (const char* name : {"true", "True"}) scope->Set(name, Value::Bool(true));
  for (const char* name : {"none", "None"}) scope->Set(name, Value::Null());
  scope->Set("raise_exception", Value::Func([](Interp&, Args& args) -> Value {
               const Value msg = args.pos.empty() ? Value() : args.pos[0];
               throw Error(Error::Kind::kRaised, msg.IsUndefined() ? "undefined" : ToPrint(msg));
             }));
  scope->Set("range", Value::Func(Range));
  scope->Set("strftime_now", Value::Func(StrftimeNow));
}

Value StringMethod(const Value& sv, const std::string& name) {
  const std::string& s = sv.str();
  if (name == "length") return Value::Int(Utf16Length(s));
  using A = Args&;
  if (name == "upper") return Bound([s](A) { return Value::Str(Upper(s)); });
  if (name == "lower") return Bound([s](A) { return Value::Str(Lower(s)); });
  if (name == "title") return Bound([s](A) { return Value::Str(Title(s)); });
  if (name == "capitalize") return Bound([s](A) { return Value::Str(Capitalize(s)); });
  if (name == "strip") return Bound([s](A a) { return Value::Str(Strip(s, a, true, true)); });
  if (name == "lstrip") return Bound([s](A a) { return Value::Str(Strip(s, a, true, false)); });
  if (name == "rstrip") return Bound([s](A a) { return Value::Str(Strip(s, a, false, true)); });
  if (name == "split") return Bound([s](A a) { return Split(s, a); });
  if (name == "replace") return Bound([s](A a) { return ReplaceMethod(s, a); });
  if (name == "startswith" || name == "endswith") {
    const bool start = name == "startswith";
    return Bound([s, start](A a) {
      if (a.pos.empty()) throw Error("startswith()/endswith() requires an argument");
      return Value::Bool(StartsOrEnds(s, a.pos[0], start));
    });
  }
  // Beyond @huggingface/jinja: find and count (Python's, in UTF-16 units for find).
  if (name == "find") {
    return Bound([s](A a) {
      const size_t p = s.find(StrArg(a, 0, "find"));
      return Value::Int(p == std::string::npos ? -1 : Utf16Length(s.substr(0, p)));
    });
  }
  if (name == "count")
    return Bound([s](A a) { return Value::Int(Count(s, StrArg(a, 0, "count"))); });
  return Value();
}

Value DictMethod(const Value& d, const std::string& name) {
  using A = Args&;
  auto pairs = [d]() {
    Array out;
    for (const auto& [k, v] : d.obj->items) out.push_back(Value::List({Value::Str(k), v}));
    return out;
  };
  if (name == "get") {
    return Bound([d](A a) {
      if (a.pos.empty() || !a.pos[0].is(Type::kString)) throw Error("Object key must be a string");
      const Value* v = d.obj->Find(a.pos[0].str());
      return v ? *v : a.pos.size() > 1 ? a.pos[1] : Value::Null();
    });
  }
  if (name == "items") return Bound([pairs](A) { return Value::List(pairs()); });
  if (name == "keys" || name == "values") {
    const bool keys = name == "keys";
    return Bound([d, keys](A) {
      Array out;
      for (const auto& [k, v] : d.obj->items) out.push_back(keys ? Value::Str(k) : v);
      return Value::List(std::move(out));
    });
  }
  if (name == "dictsort") {
    return Bound([pairs](A a) {
      const bool cs = BoolArg(a.Get(0, "case_sensitive"), "case_sensitive");
      const Value* by = a.Get(1, "by");
      const int index = by && by->is(Type::kString) && by->str() == "value" ? 1 : 0;
      const bool reverse = BoolArg(a.Get(2, "reverse"), "reverse");
      Array items = pairs();
      std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) {
        const int c = Compare((*x.arr)[index], (*y.arr)[index], cs);
        return reverse ? c > 0 : c < 0;
      });
      return Value::List(std::move(items));
    });
  }
  return Value();
}

Value Interp::Attribute(const Value& object, const Value& property) {
  if (object.IsMap()) {
    if (!property.is(Type::kString)) {
      throw Error(
          absl::StrCat("Cannot access property with non-string: got ", TypeName(property.type)));
    }
    if (const Value* v = object.obj->Find(property.str())) return *v;
    return object.is(Type::kObject) ? DictMethod(object, property.str()) : Value();
  }
  if (object.IsList() || object.is(Type::kString)) {
    if (property.is(Type::kInt)) {
      if (object.IsList()) {
        const int64_t n = object.arr->size(), k = property.i < 0 ? n + property.i : property.i;
        return k >= 0 && k < n ? (*object.arr)[k] : Value();
      }
      const std::vector<std::string> chars = CodePoints(object.str());
      const int64_t n = chars.size(), k = property.i < 0 ? n + property.i : property.i;
      return k >= 0 && k < n ? Value::Str(chars[k]) : Value();
    }
    if (!property.is(Type::kString))
      throw Error("Cannot access property with non-string/non-number");
    if (object.IsList()) {
      return property.str() == "length" ? Value::Int(object.arr->size()) : Value();
    }
    return StringMethod(object, property.str());
  }
  if (!property.is(Type::kString)) {
    throw Error(
        absl::StrCat("Cannot access property with non-string: got ", TypeName(property.type)));
  }
  return Value();
}

bool Interp::Test(const std::string& name, const Value& v, const Args& args) const {
  const Type t = v.type;
  auto arg = [&]() -> const Value& {
    if (args.pos.empty()) throw Error("test " + name + " needs an argument");
    return args.pos[0];
  };
  if (name == "defined") return t != Type::kUndefined;
  if (name == "undefined") return t == Type::kUndefined;
  if (name == "none") return t == Type::kNull;
  if (name == "boolean") return t == Type::kBool;
  if (name == "true" || name == "false") return t == Type::kBool && v.b == (name == "true");
  if (name == "string") return t == Type::kString;
  if (name == "number") return v.IsNumber();
  if (name == "integer") return t == Type::kInt;
  if (name == "float") return t == Type::kFloat;  // beyond
  if (name == "callable") return t == Type::kFunction;
  if (name == "iterable") return t == Type::kArray || t == Type::kString;
  if (name == "mapping") return t == Type::kObject;
  if (name == "sequence") return v.IsList() || t == Type::kObject || t == Type::kString;
  if (name == "lower") return t == Type::kString && Lower(v.str()) == v.str();
  if (name == "upper") return t == Type::kString && Upper(v.str()) == v.str();
  if (name == "odd" || name == "even") {
    if (t != Type::kInt) throw Error(absl::StrCat("cannot ", name, " on ", TypeName(t)));
    return (v.i % 2 != 0) == (name == "odd");
  }
  if (name == "eq" || name == "equalto" || name == "sameas") return StrictEquals(v, arg());
  if (name == "ne") return !StrictEquals(v, arg());  // beyond
  if (name == "divisibleby") {                       // beyond
    if (t != Type::kInt || !arg().is(Type::kInt) || arg().i == 0)
      throw Error("divisibleby needs integers");
    return v.i % arg().i == 0;
  }
  throw Error("Unknown test: " + name);
}

Value Interp::Filter(const Value& v, const Node& filter, Scope* scope) {
  if (filter.kind == NodeKind::kIdent) return SimpleFilter(v, filter.str);
  Args args = EvalArgs(filter.a, scope);
  return CallFilter(v, filter.x->str, args, filter);
}

Value Interp::SimpleFilter(const Value& v, const std::string& name) {
  const Type t = v.type;
  if (name == "safe") return v;
  if (name == "tojson") return Value::Str(ToJson(v, JsonOptions(), 0, true));
  if (name == "default" || name == "d") {  // beyond: no parentheses
    return v.IsUndefined() ? Value::Str("") : v;
  }
  if (name == "e" || name == "escape") return Value::Str(HtmlEscape(ToPrint(v)));  // beyond
  const std::string f = name == "count" ? "length" : name;
  if (v.IsList()) {
    Array items = *v.arr;
    Step(items.size());
    if (f == "list") return v;
    if (f == "first") return items.empty() ? Value() : items.front();
    if (f == "last") return items.empty() ? Value() : items.back();
    if (f == "length") return Value::Int(items.size());
    if (f == "reverse") return Value::List(Array(items.rbegin(), items.rend()));
    if (f == "sort") {
      std::stable_sort(items.begin(), items.end(),
                       [](const Value& a, const Value& b) { return Compare(a, b, false) < 0; });
      return Value::List(std::move(items));
    }
    if (f == "join") return Value::Str(JoinValues(items, ""));
    if (f == "string") return Value::Str(ToJson(v, JsonOptions(), 0, false));
    if (f == "unique") {
      Array out;
      for (const Value& x : items) {
        if (std::none_of(out.begin(), out.end(),
                         [&](const Value& y) { return StrictEquals(x, y); })) {
          out.push_back(x);
        }
      }
      return Value::List(std::move(out));
    }
    throw Error("Unknown ArrayValue filter: " + name);
  }
  if (t == Type::kString) {
    const std::string& s = v.str();
    if (f == "length") return Value::Int(Utf16Length(s));
    if (f == "upper") return Value::Str(Upper(s));
    if (f == "lower") return Value::Str(Lower(s));
    if (f == "title") return Value::Str(Title(s));
    if (f == "capitalize") return Value::Str(Capitalize(s));
    if (f == "trim") return Value::Str(std::string(TrimEnd(TrimStart(s))));
    if (f == "indent") return Value::Str(Indent(s, "    ", false, false));
    if (f == "join" || f == "string") return v;
    if (f == "list") {  // beyond
      Array chars;
      for (std::string& c : CodePoints(s)) chars.push_back(Value::Str(std::move(c)));
      return Value::List(std::move(chars));
    }
    double d;
    if (f == "int") return Value::Int(ParseLeading(s, true, &d) ? static_cast<int64_t>(d) : 0);
    if (f == "float") return Value::Float(ParseLeading(s, false, &d) ? d : 0);
    throw Error("Unknown StringValue filter: " + name);
  }
  if (v.IsNumber()) {
    if (f == "abs")
      return t == Type::kInt ? Value::Int(std::llabs(v.i)) : Value::Float(std::fabs(v.f));
    if (f == "int") return Value::Int(static_cast<int64_t>(std::trunc(v.num())));
    if (f == "float") return Value::Float(v.num());
    if (f == "string") return Value::Str(ToPrint(v));
    if (f == "round") return Value::Float(std::round(v.num()));  // beyond
    throw Error("Unknown NumericValue filter: " + name);
  }
  if (t == Type::kObject) {
    if (f == "length") return Value::Int(v.obj->items.size());
    Value method = DictMethod(v, f);
    if (method.IsUndefined() || f == "get") throw Error("Unknown ObjectValue filter: " + name);
    Args none;
    return Call(method, none);
  }
  if (t == Type::kBool) {
    if (f == "bool") return v;
    if (f == "int") return Value::Int(v.b);
    if (f == "float") return Value::Float(v.b);
    if (f == "string") return Value::Str(v.b ? "true" : "false");
    throw Error("Unknown BooleanValue filter: " + name);
  }
  throw Error(absl::StrCat("Cannot apply filter \"", name, "\" to type: ", TypeName(t)));
}

Value Interp::CallFilter(const Value& v, const std::string& name, Args& args, const Node& call) {
  if (name == "tojson") {
    JsonOptions o;
    const Value* indent = args.Kw("indent");
    if (indent && !indent->is(Type::kInt) && !indent->IsNone())
      throw Error("indent must be a number");
    o.indent = indent && indent->is(Type::kInt)
                   ? static_cast<int>(std::clamp<int64_t>(indent->i, 0, 64))
                   : 0;
    o.ensure_ascii = BoolArg(args.Kw("ensure_ascii"), "ensure_ascii");
    o.sort_keys = BoolArg(args.Kw("sort_keys"), "sort_keys");
    if (const Value* sep = args.Kw("separators"); sep && !sep->IsNone()) {
      if (!sep->IsList() || sep->arr->size() != 2 || !(*sep->arr)[0].is(Type::kString) ||
          !(*sep->arr)[1].is(Type::kString)) {
        throw Error("separators must be a tuple of two strings");
      }
      o.has_separators = true;
      o.item_sep = (*sep->arr)[0].str();
      o.key_sep = (*sep->arr)[1].str();
    }
    std::string out = ToJson(v, o, 0, true);
    CheckSize(out.size());
    return Value::Str(std::move(out));
  }
  if (name == "join") {
    const Value* sep = args.Get(0, "separator");
    if (sep && !sep->is(Type::kString)) throw Error("separator must be a string");
    const std::string s = sep ? sep->str() : "";
    if (v.is(Type::kString)) return Value::Str(absl::StrJoin(CodePoints(v.str()), s));
    if (!v.IsList()) throw Error("Cannot apply filter \"join\" to this type");
    std::string out = JoinValues(*v.arr, s);
    CheckSize(out.size());
    return Value::Str(std::move(out));
  }
  if (name == "int" || name == "float") {
    const bool integer = name == "int";
    const Value* dflt = args.Get(0, "default");
    const Value fallback = dflt ? *dflt : integer ? Value::Int(0) : Value::Float(0);
    double d;
    if (v.is(Type::kString)) {
      if (!ParseLeading(v.str(), integer, &d)) return fallback;
      return integer ? Value::Int(static_cast<int64_t>(d)) : Value::Float(d);
    }
    if (v.IsNumber() || v.is(Type::kBool)) {
      return integer ? Value::Int(static_cast<int64_t>(std::trunc(v.num())))
                     : Value::Float(v.num());
    }
    throw Error("Cannot apply filter \"" + name + "\" to this type");
  }
  if (name == "default" || name == "d") {
    const Value dflt = args.pos.empty() ? Value::Str("") : args.pos[0];
    const bool boolean = BoolArg(args.Get(1, "boolean"), "boolean");
    return v.IsUndefined() || (boolean && !v.Truthy()) ? dflt : v;
  }
  if (v.IsList()) return ListFilter(v, name, args, call);
  if (v.is(Type::kString) && name == "indent") {
    const Value* width = args.Get(0, "width");
    std::string pad(4, ' ');
    if (width && width->is(Type::kString)) pad = width->str();
    if (width && width->is(Type::kInt))
      pad = std::string(std::clamp<int64_t>(width->i, 0, 1024), ' ');
    const Value* first = args.Get(1, "first");
    const Value* blank = args.Get(2, "blank");
    return Value::Str(Indent(v.str(), pad, first && first->Truthy(), blank && blank->Truthy()));
  }
  if (v.is(Type::kString) && name == "replace") return ReplaceMethod(v.str(), args);
  if (v.IsNumber() && name == "round") {  // beyond
    const Value* digits = args.Get(0, "precision");
    const double scale = std::pow(10.0, digits && digits->is(Type::kInt) ? digits->i : 0);
    return Value::Float(std::round(v.num() * scale) / scale);
  }
  if (v.is(Type::kObject)) {
    Value method = DictMethod(v, name);
    if (!method.IsUndefined()) return Call(method, args);
  }
  throw Error(absl::StrCat("Cannot apply filter \"", name, "\" to type: ", TypeName(v.type)));
}

Value Interp::ListFilter(const Value& v, const std::string& name, Args& args, const Node& call) {
  Array items = *v.arr;
  Step(items.size());
  if (name == "sort") {
    const bool reverse = BoolArg(args.Get(0, "reverse"), "reverse");
    const bool cs = BoolArg(args.Get(1, "case_sensitive"), "case_sensitive");
    const Value* attr = args.Get(2, "attribute");
    auto key = [&](const Value& x) {
      if (!attr || attr->IsNone()) return x;
      return Attr(x, attr->is(Type::kInt) ? std::to_string(attr->i) : attr->str());
    };
    std::stable_sort(items.begin(), items.end(), [&](const Value& a, const Value& b) {
      const int c = Compare(key(a), key(b), cs);
      return reverse ? c > 0 : c < 0;
    });
    return Value::List(std::move(items));
  }
  const bool by_attr = name == "selectattr" || name == "rejectattr";
  if (by_attr || name == "select" || name == "reject") {
    const bool keep = name == "selectattr" || name == "select";
    if (by_attr &&
        std::any_of(items.begin(), items.end(), [](const Value& x) { return !x.IsMap(); })) {
      throw Error("`" + name + "` can only be applied to array of objects");
    }
    for (const NodePtr& a : call.a) {
      if (by_attr && a->kind != NodeKind::kString)
        throw Error("arguments of `" + name + "` must be strings");
    }
    const size_t first = by_attr ? 1 : 0;
    if (by_attr && args.pos.empty()) throw Error("`" + name + "` needs an attribute");
    Args test_args;
    for (size_t k = first + 1; k < args.pos.size(); ++k) test_args.pos.push_back(args.pos[k]);
    Array out;
    for (const Value& x : items) {
      const Value* found = by_attr ? x.obj->Find(args.pos[0].str()) : &x;
      bool pass = false;
      if (found && args.pos.size() > first) {
        pass =
            Test(args.pos[first].is(Type::kString) ? args.pos[first].str() : "", *found, test_args);
      } else if (found) {
        pass = found->Truthy();
      }
      if (pass == keep) out.push_back(x);
    }
    return Value::List(std::move(out));
  }
  if (name == "map") {
    const Value* attr = args.Kw("attribute");
    Array out;
    if (!attr && !args.pos.empty() && args.pos[0].is(Type::kString)) {  // beyond: map('filter')
      for (const Value& x : items) out.push_back(SimpleFilter(x, args.pos[0].str()));
      return Value::List(std::move(out));
    }
    if (!attr || !attr->is(Type::kString)) throw Error("`map` needs attribute= (a string)");
    const Value* dflt = args.Kw("default");
    for (const Value& x : items) {
      if (!x.IsMap()) throw Error("items in map must be an object");
      Value a = Attr(x, attr->str());
      out.push_back(a.IsUndefined() && dflt ? *dflt : a);
    }
    return Value::List(std::move(out));
  }
  throw Error("Unknown ArrayValue filter: " + name);
}

}  // namespace superpose::model::jinja
