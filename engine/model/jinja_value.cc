#include "engine/model/jinja_value.h"

#include <utf8proc.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace superpose::model::jinja {
namespace {

// Decodes the UTF-8 sequence at `pos` (a stray byte reads as itself); sets `len`.
char32_t Decode(std::string_view s, size_t pos, size_t* len) {
  const auto c = static_cast<unsigned char>(s[pos]);
  int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
  if (pos + n > s.size()) n = 1;
  char32_t cp = n == 1 ? c : n == 2 ? (c & 0x1f) : n == 3 ? (c & 0x0f) : (c & 0x07);
  for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[pos + k]) & 0x3f);
  *len = n;
  return cp;
}

void Encode(char32_t cp, std::string* out) {
  utf8proc_uint8_t buf[4];
  const auto n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf);
  out->append(reinterpret_cast<const char*>(buf), n);
}

bool IsSpace(char32_t c) {
  if (c <= 32) return c == 32 || (c >= 9 && c <= 13);
  return c == 160 || c == 5760 || (c >= 8192 && c <= 8202) || c == 8232 || c == 8233 || c == 8239 ||
         c == 8287 || c == 12288 || c == 65279;
}

std::string FloatPrint(double f) {
  if (f == 0 && std::signbit(f)) return "-0.0";
  if (std::isfinite(f) && std::fmod(f, 1.0) == 0 && std::fabs(f) < 1e21) {
    return absl::StrFormat("%.1f", f);
  }
  return JsNumber(f);
}

void JsonQuote(std::string_view s, bool ensure_ascii, std::string* out) {
  out->push_back('"');
  for (size_t p = 0; p < s.size();) {
    size_t len;
    const char32_t c = Decode(s, p, &len);
    switch (c) {
      case '"':
        *out += "\\\"";
        break;
      case '\\':
        *out += "\\\\";
        break;
      case '\b':
        *out += "\\b";
        break;
      case '\f':
        *out += "\\f";
        break;
      case '\n':
        *out += "\\n";
        break;
      case '\r':
        *out += "\\r";
        break;
      case '\t':
        *out += "\\t";
        break;
      default:
        if (c < 0x20) {
          *out += absl::StrFormat("\\u%04x", static_cast<unsigned>(c));
        } else if (ensure_ascii && c >= 0x7f && c >= 0x10000) {
          const char32_t v = c - 0x10000;
          *out += absl::StrFormat("\\u%04x\\u%04x", 0xd800 + (v >> 10), 0xdc00 + (v & 0x3ff));
        } else if (ensure_ascii && c >= 0x7f) {
          *out += absl::StrFormat("\\u%04x", static_cast<unsigned>(c));
        } else {
          out->append(s.substr(p, len));
        }
    }
    p += len;
  }
  out->push_back('"');
}

// JavaScript's Number(string) (NaN as nullopt-like NAN).
double JsToNumber(const std::string& s) {
  const std::string t(TrimEnd(TrimStart(s)));
  if (t.empty()) return 0;
  char* end = nullptr;
  const double d = std::strtod(t.c_str(), &end);
  return *end == '\0' ? d : NAN;
}

bool IsObjectLike(const Value& v) { return v.IsList() || v.IsMap() || v.is(Type::kFunction); }

bool SameObject(const Value& a, const Value& b) {
  if (a.IsList() && b.IsList()) return a.arr == b.arr;
  if (a.IsMap() && b.IsMap()) return a.obj == b.obj;
  return a.is(Type::kFunction) && b.is(Type::kFunction) && a.fn == b.fn;
}

}  // namespace

Value Value::Str(std::string v) {
  Value r = Of(Type::kString);
  r.s = std::make_shared<const std::string>(std::move(v));
  return r;
}
Value Value::List(Array v, Type t) {
  Value r = Of(t);
  r.arr = std::make_shared<Array>(std::move(v));
  return r;
}
Value Value::Dict(std::shared_ptr<Object> o, Type t) {
  Value r = Of(t);
  r.obj = o ? std::move(o) : std::make_shared<Object>();
  return r;
}
Value Value::Func(Function fn) {
  Value r = Of(Type::kFunction);
  r.fn = std::make_shared<const Function>(std::move(fn));
  return r;
}

bool Value::Truthy() const {
  switch (type) {
    case Type::kBool:
      return b;
    case Type::kInt:
      return i != 0;
    case Type::kFloat:
      return f != 0 && !std::isnan(f);
    case Type::kString:
      return !s->empty();
    case Type::kArray:
    case Type::kTuple:
      return !arr->empty();
    case Type::kObject:
      return !obj->items.empty();
    case Type::kNamespace:
    case Type::kFunction:
      return true;
    default:
      return false;
  }
}

const Value* Object::Find(std::string_view key) const {
  for (const auto& [k, v] : items) {
    if (k == key) return &v;
  }
  return nullptr;
}

void Object::Set(const std::string& key, Value v) {
  for (auto& [k, old] : items) {
    if (k == key) {
      old = std::move(v);
      return;
    }
  }
  items.emplace_back(key, std::move(v));
}

const Value* Args::Kw(std::string_view name) const {
  for (const auto& [k, v] : kw) {
    if (k == name) return &v;
  }
  return nullptr;
}

const Value* Args::Get(size_t index, std::string_view name) const {
  return index < pos.size() ? &pos[index] : Kw(name);
}

const char* TypeName(Type t) {
  static const char* const kNames[] = {"UndefinedValue", "NullValue",    "BooleanValue",
                                       "IntegerValue",   "FloatValue",   "StringValue",
                                       "ArrayValue",     "TupleValue",   "ObjectValue",
                                       "NamespaceValue", "FunctionValue"};
  return kNames[static_cast<int>(t)];
}

std::string JsNumber(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  if (d == 0) return "0";
  char buf[48];
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*e", prec - 1, d);
    if (std::strtod(buf, nullptr) == d) break;
  }
  std::string s(buf);
  const bool neg = s[0] == '-';
  if (neg) s.erase(0, 1);
  const size_t e = s.find('e');
  const int n = std::atoi(s.c_str() + e + 1) + 1;  // digits before the point
  std::string digits = s.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  const int k = static_cast<int>(digits.size());
  std::string out;
  if (k <= n && n <= 21) {
    out = digits + std::string(n - k, '0');
  } else if (0 < n && n <= 21) {
    out = digits.substr(0, n) + "." + digits.substr(n);
  } else if (-6 < n && n <= 0) {
    out = "0." + std::string(-n, '0') + digits;
  } else {
    out = digits.substr(0, 1) + (k > 1 ? "." + digits.substr(1) : "") + "e" +
          (n - 1 >= 0 ? "+" : "-") + std::to_string(std::abs(n - 1));
  }
  return neg ? "-" + out : out;
}

std::string ToPrint(const Value& v) {
  switch (v.type) {
    case Type::kBool:
      return v.b ? "true" : "false";
    case Type::kInt:
      return std::to_string(v.i);
    case Type::kFloat:
      return FloatPrint(v.f);
    case Type::kString:
      return v.str();
    case Type::kArray:
    case Type::kTuple:
    case Type::kObject:
    case Type::kNamespace:
      return ToJson(v, JsonOptions(), 0, false);
    case Type::kUndefined:
    case Type::kNull:
      return "undefined";
    default:
      return "";
  }
}

std::string JsString(const Value& v) {
  switch (v.type) {
    case Type::kUndefined:
    case Type::kNull:
      throw Error("Cannot convert undefined or null to a string");
    case Type::kFloat:
      return JsNumber(v.f);
    case Type::kArray:
    case Type::kTuple: {
      std::string out;
      for (size_t k = 0; k < v.arr->size(); ++k) {
        if (k) out += ",";
        out += ToPrint((*v.arr)[k]);
      }
      return out;
    }
    case Type::kObject:
    case Type::kNamespace:
      return "[object Map]";
    default:
      return ToPrint(v);
  }
}

std::string ToJson(const Value& v, const JsonOptions& o, int depth, bool undefined_as_null) {
  const std::string item_sep = o.has_separators ? o.item_sep : o.indent ? "," : ", ";
  const std::string key_sep = o.has_separators ? o.key_sep : ": ";
  switch (v.type) {
    case Type::kNull:
      return "null";
    case Type::kUndefined:
      return undefined_as_null ? "null" : "undefined";
    case Type::kInt:
      return std::to_string(v.i);
    case Type::kFloat:
      return std::isfinite(v.f) ? JsNumber(v.f) : "null";
    case Type::kBool:
      return v.b ? "true" : "false";
    case Type::kString: {
      std::string out;
      JsonQuote(v.str(), o.ensure_ascii, &out);
      return out;
    }
    case Type::kFunction:
      throw Error("Cannot convert to JSON: FunctionValue");
    default:
      break;
  }
  const std::string pad = o.indent ? std::string(o.indent, ' ') : "";
  std::string base = "\n";
  for (int d = 0; d < depth; ++d) base += pad;
  const std::string child = base + pad;
  std::vector<std::string> core;
  if (v.IsList()) {
    for (const Value& x : *v.arr) core.push_back(ToJson(x, o, depth + 1, undefined_as_null));
    if (o.indent && !core.empty()) {
      std::string out = "[" + child;
      for (size_t k = 0; k < core.size(); ++k) out += (k ? item_sep + child : "") + core[k];
      return out + base + "]";
    }
  } else {
    auto entries = v.obj->items;
    if (o.sort_keys) {
      std::stable_sort(entries.begin(), entries.end(),
                       [](const auto& a, const auto& b) { return a.first < b.first; });
    }
    for (const auto& [key, val] : entries) {
      std::string item = o.indent ? child : "";
      JsonQuote(key, o.ensure_ascii, &item);
      core.push_back(item + key_sep + ToJson(val, o, depth + 1, undefined_as_null));
    }
  }
  const bool list = v.IsList();
  std::string out = list ? "[" : "{";
  for (size_t k = 0; k < core.size(); ++k) out += (k ? item_sep : "") + core[k];
  if (!list && o.indent && !core.empty()) out += base;
  return out + (list ? "]" : "}");
}

Value FromJson(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null:
      return Value::Null();
    case nlohmann::ordered_json::value_t::boolean:
      return Value::Bool(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer:
    case nlohmann::ordered_json::value_t::number_unsigned:
      return Value::Int(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_float: {
      // JSON numbers are JavaScript numbers: an integral one is an integer.
      const double d = j.get<double>();
      if (std::fmod(d, 1.0) == 0 && std::fabs(d) <= 9007199254740992.0) {
        return Value::Int(static_cast<int64_t>(d));
      }
      return Value::Float(d);
    }
    case nlohmann::ordered_json::value_t::string:
      return Value::Str(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      Array items;
      for (const auto& x : j) items.push_back(FromJson(x));
      return Value::List(std::move(items));
    }
    case nlohmann::ordered_json::value_t::object: {
      auto obj = std::make_shared<Object>();
      for (const auto& [k, x] : j.items()) obj->Set(k, FromJson(x));
      return Value::Dict(std::move(obj));
    }
    default:
      return Value();
  }
}

bool LooseEquals(const Value& a, const Value& b) {
  const bool a_nil = a.IsNone() || a.IsUndefined(), b_nil = b.IsNone() || b.IsUndefined();
  if (a_nil || b_nil) return a_nil && b_nil;
  if (IsObjectLike(a) || IsObjectLike(b)) return SameObject(a, b);
  if (a.is(Type::kString) && b.is(Type::kString)) return a.str() == b.str();
  const double x = a.is(Type::kString) ? JsToNumber(a.str()) : a.num();
  const double y = b.is(Type::kString) ? JsToNumber(b.str()) : b.num();
  return x == y;
}

bool StrictEquals(const Value& a, const Value& b) {
  const bool a_nil = a.IsNone() || a.IsUndefined(), b_nil = b.IsNone() || b.IsUndefined();
  if (a_nil || b_nil) return a_nil && b_nil;
  if (a.IsNumber() && b.IsNumber()) return a.num() == b.num();
  if (a.type != b.type) return SameObject(a, b);
  if (a.is(Type::kString)) return a.str() == b.str();
  if (a.is(Type::kBool)) return a.b == b.b;
  return SameObject(a, b);
}

int Compare(const Value& a, const Value& b, bool case_sensitive) {
  auto name = [](const Value& v) { return std::string(TypeName(v.type)); };
  if (a.IsNone() || b.IsNone() || a.IsUndefined() || b.IsUndefined()) {
    if (a.type == b.type) return 0;
    throw Error("Cannot compare " + name(a) + " with " + name(b));
  }
  const bool a_num = a.IsNumber() || a.is(Type::kBool), b_num = b.IsNumber() || b.is(Type::kBool);
  if (a_num && b_num) return a.num() < b.num() ? -1 : a.num() > b.num() ? 1 : 0;
  if (a.type != b.type)
    throw Error("Cannot compare different types: " + name(a) + " and " + name(b));
  if (!a.is(Type::kString)) throw Error("Cannot compare type: " + name(a));
  const std::string x = case_sensitive ? a.str() : Lower(a.str());
  const std::string y = case_sensitive ? b.str() : Lower(b.str());
  return x < y ? -1 : x > y ? 1 : 0;
}

size_t WhitespaceLen(std::string_view s, size_t pos) {
  if (pos >= s.size()) return 0;
  size_t len;
  return IsSpace(Decode(s, pos, &len)) ? len : 0;
}

size_t WhitespaceLenBefore(std::string_view s, size_t end) {
  size_t start = end;
  while (start > 0 && end - start < 4) {
    --start;
    if ((static_cast<unsigned char>(s[start]) & 0xc0) != 0x80) break;
  }
  return start < end && WhitespaceLen(s, start) == end - start ? end - start : 0;
}

std::string_view TrimStart(std::string_view s) {
  size_t p = 0;
  while (size_t n = WhitespaceLen(s, p)) p += n;
  return s.substr(p);
}

std::string_view TrimEnd(std::string_view s) {
  size_t e = s.size();
  while (size_t n = WhitespaceLenBefore(s, e)) e -= n;
  return s.substr(0, e);
}

std::vector<std::string> CodePoints(std::string_view s) {
  std::vector<std::string> out;
  for (size_t p = 0, len; p < s.size(); p += len) {
    Decode(s, p, &len);
    out.emplace_back(s.substr(p, len));
  }
  return out;
}

int64_t Utf16Length(std::string_view s) {
  int64_t n = 0;
  for (size_t p = 0, len; p < s.size(); p += len) n += Decode(s, p, &len) >= 0x10000 ? 2 : 1;
  return n;
}

namespace {
std::string MapCase(std::string_view s, bool upper) {
  std::string out;
  out.reserve(s.size());
  for (size_t p = 0, len; p < s.size(); p += len) {
    const auto c = static_cast<utf8proc_int32_t>(Decode(s, p, &len));
    if (c < 0x80 || len == 1) {
      out.push_back(c < 0x80 ? static_cast<char>(upper ? std::toupper(c) : std::tolower(c)) : s[p]);
    } else {
      Encode(upper ? utf8proc_toupper(c) : utf8proc_tolower(c), &out);
    }
  }
  return out;
}
}  // namespace

std::string Upper(std::string_view s) { return MapCase(s, true); }
std::string Lower(std::string_view s) { return MapCase(s, false); }

}  // namespace superpose::model::jinja
