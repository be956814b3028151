// Values of the Jinja interpreter (jinja.h), with @huggingface/jinja's semantics:
// integers and floats are distinct types (1 prints "1", 1.0 prints "1.0"), lists and
// dicts print as JSON with ", " and ": " separators, booleans as true/false, none and
// undefined as nothing. Internal to the interpreter: errors are thrown as jinja::Error
// and turned into an absl::Status by Template::Render (they never leave the module).
#ifndef SUPERPOSE_ENGINE_MODEL_JINJA_VALUE_H_
#define SUPERPOSE_ENGINE_MODEL_JINJA_VALUE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "nlohmann/json.hpp"

namespace superpose::model::jinja {

// A template error. `raised`: from the template's raise_exception(); `budget`: the step
// or size budget ran out.
struct Error : std::runtime_error {
  enum class Kind { kRuntime, kRaised, kBudget };
  Error(Kind k, const std::string& what) : std::runtime_error(what), kind(k) {}
  explicit Error(const std::string& what) : Error(Kind::kRuntime, what) {}
  Kind kind;
};

enum class Type {
  kUndefined,
  kNull,
  kBool,
  kInt,
  kFloat,
  kString,
  kArray,
  kTuple,
  kObject,
  kNamespace,
  kFunction
};

struct Value;
struct Object;
struct Args;
class Interp;
using Array = std::vector<Value>;
using Function = std::function<Value(Interp&, Args&)>;

struct Value {
  Type type = Type::kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::shared_ptr<const std::string> s;
  std::shared_ptr<Array> arr;   // kArray, kTuple
  std::shared_ptr<Object> obj;  // kObject, kNamespace
  std::shared_ptr<const Function> fn;

  static Value Null() { return Of(Type::kNull); }
  static Value Bool(bool v) {
    Value r = Of(Type::kBool);
    r.b = v;
    return r;
  }
  static Value Int(int64_t v) {
    Value r = Of(Type::kInt);
    r.i = v;
    return r;
  }
  static Value Float(double v) {
    Value r = Of(Type::kFloat);
    r.f = v;
    return r;
  }
  static Value Str(std::string v);
  static Value List(Array v, Type t = Type::kArray);
  static Value Dict(std::shared_ptr<Object> o, Type t = Type::kObject);
  static Value Func(Function fn);
  static Value Of(Type t) {
    Value r;
    r.type = t;
    return r;
  }

  bool is(Type t) const { return type == t; }
  bool IsUndefined() const { return type == Type::kUndefined; }
  bool IsNone() const { return type == Type::kNull; }
  bool IsNumber() const { return type == Type::kInt || type == Type::kFloat; }
  bool IsList() const { return type == Type::kArray || type == Type::kTuple; }
  bool IsMap() const { return type == Type::kObject || type == Type::kNamespace; }
  const std::string& str() const { return *s; }
  double num() const { return type == Type::kFloat ? f : type == Type::kBool ? b : double(i); }
  bool Truthy() const;
};

// An insertion-ordered map (JavaScript's Map: a key set again keeps its place).
struct Object {
  std::vector<std::pair<std::string, Value>> items;
  const Value* Find(std::string_view key) const;
  void Set(const std::string& key, Value v);
};

// Call arguments: positional, then keyword; `caller` is a {% call %} block's body.
struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  Value caller;
  const Value* Kw(std::string_view name) const;
  // The argument at `index`, else keyword `name`, else null.
  const Value* Get(size_t index, std::string_view name) const;
};

const char* TypeName(Type t);
// What `{{ v }}` prints (nothing for none and undefined: the caller skips those).
std::string ToPrint(const Value& v);
// JavaScript's String(value) of the underlying value (used by `~` and `+` on strings).
std::string JsString(const Value& v);
// JavaScript's Number.prototype.toString.
std::string JsNumber(double d);
struct JsonOptions {
  int indent = 0;
  bool ensure_ascii = false;
  bool sort_keys = false;
  bool has_separators = false;
  std::string item_sep, key_sep;
};
// The `tojson` filter (`undefined_as_null`) and the printed form of lists and dicts.
std::string ToJson(const Value& v, const JsonOptions& o, int depth, bool undefined_as_null);
Value FromJson(const nlohmann::ordered_json& j);
// == as JavaScript's loose equality of the underlying values; `in` as strict equality.
bool LooseEquals(const Value& a, const Value& b);
bool StrictEquals(const Value& a, const Value& b);
// Sort order of the sort filter and dictsort: numbers, or strings (case-folded unless
// `case_sensitive`); anything else is an error.
int Compare(const Value& a, const Value& b, bool case_sensitive);

// UTF-8 helpers with JavaScript's notions: whitespace as String.prototype.trim sees it,
// lengths in UTF-16 code units.
size_t WhitespaceLen(std::string_view s, size_t pos);
size_t WhitespaceLenBefore(std::string_view s, size_t end);
std::string_view TrimStart(std::string_view s);
std::string_view TrimEnd(std::string_view s);
std::vector<std::string> CodePoints(std::string_view s);
int64_t Utf16Length(std::string_view s);
std::string Upper(std::string_view s);  // Unicode simple case mapping
std::string Lower(std::string_view s);

}  // namespace superpose::model::jinja

#endif  // SUPERPOSE_ENGINE_MODEL_JINJA_VALUE_H_
