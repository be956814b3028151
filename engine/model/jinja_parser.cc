// Lexer and parser of the Jinja interpreter (jinja.h), following @huggingface/jinja's
// grammar and whitespace handling: the source is first preprocessed (one trailing
// newline dropped, lstrip_blocks, trim_blocks, {% generation %} tags removed) keeping
// each byte's offset in the original so errors name the original line:column.
#include <cstdlib>
#include <stdexcept>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "engine/model/jinja_ast.h"
#include "engine/model/jinja_value.h"

namespace superpose::model::jinja {
namespace {

struct Src {
  std::string text;
  std::vector<uint32_t> origin;  // offset in the original source, per byte
  void Add(const Src& from, size_t begin, size_t end) {
    text.append(from.text, begin, end - begin);
    origin.insert(origin.end(), from.origin.begin() + begin, from.origin.begin() + end);
  }
};

struct SyntaxError : std::runtime_error {
  SyntaxError(size_t p, const std::string& what) : std::runtime_error(what), pos(p) {}
  size_t pos;  // offset in the preprocessed text
};

bool IsLineStart(const std::string& t, size_t p) {
  return p == 0 || t[p - 1] == '\n' || t[p - 1] == '\r';
}

// lstrip_blocks: `^[ \t]*({[#%-])` loses its blanks; trim_blocks: `([#%-]})\n` its newline.
Src StripBlocks(const Src& in) {
  Src mid, out;
  const std::string& t = in.text;
  for (size_t p = 0; p < t.size();) {
    size_t q = p;
    if (IsLineStart(t, p)) {
      while (q < t.size() && (t[q] == ' ' || t[q] == '\t')) ++q;
      const bool tag = q + 1 < t.size() && t[q] == '{' &&
                       (t[q + 1] == '#' || t[q + 1] == '%' || t[q + 1] == '-');
      if (q > p && tag) {
        p = q;
        continue;
      }
    }
    q = std::max(q, p + 1);
    mid.Add(in, p, q);
    p = q;
  }
  const std::string& m = mid.text;
  for (size_t p = 0; p < m.size(); ++p) {
    const bool drop = m[p] == '\n' && p >= 2 && m[p - 1] == '}' &&
                      (m[p - 2] == '#' || m[p - 2] == '%' || m[p - 2] == '-');
    if (!drop) out.Add(mid, p, p + 1);
  }
  return out;
}

size_t SkipSpace(const std::string& t, size_t p) {
  while (size_t n = WhitespaceLen(t, p)) p += n;
  return p;
}

// `{%(-?)\s*(?:end)?generation\s*(-?)%}(\s*)` at `p`: its end, or npos.
size_t MatchGeneration(const std::string& t, size_t p, bool* lstrip, bool* rstrip, size_t* after) {
  if (t.compare(p, 2, "{%") != 0) return std::string::npos;
  size_t q = p + 2;
  *lstrip = q < t.size() && t[q] == '-';
  q = SkipSpace(t, q + (*lstrip ? 1 : 0));
  if (t.compare(q, 3, "end") == 0 && t.compare(q + 3, 10, "generation") == 0) q += 3;
  if (t.compare(q, 10, "generation") != 0) return std::string::npos;
  q = SkipSpace(t, q + 10);
  *rstrip = q < t.size() && t[q] == '-';
  if (*rstrip) ++q;
  if (t.compare(q, 2, "%}") != 0) return std::string::npos;
  *after = q + 2;
  return SkipSpace(t, q + 2);
}

// Drops {% generation %} / {% endgeneration %} (their bodies render as they are).
Src RemoveGeneration(const Src& in) {
  Src out;
  const std::string& t = in.text;
  size_t last = 0;
  for (size_t p = t.find("{%"); p != std::string::npos; p = t.find("{%", p + 1)) {
    bool lstrip, rstrip;
    size_t after;
    const size_t end = MatchGeneration(t, p, &lstrip, &rstrip, &after);
    if (end == std::string::npos) continue;
    size_t keep = p;
    while (lstrip && keep > last && WhitespaceLenBefore(t, keep))
      keep -= WhitespaceLenBefore(t, keep);
    out.Add(in, last, keep);
    if (!rstrip) out.Add(in, after, end);
    last = end;
    p = end - 1;
  }
  out.Add(in, last, t.size());
  return out;
}

Src Preprocess(const std::string& source) {
  Src src;
  src.text = source;
  if (!src.text.empty() && src.text.back() == '\n') src.text.pop_back();
  src.origin.resize(src.text.size());
  for (size_t k = 0; k < src.origin.size(); ++k) src.origin[k] = static_cast<uint32_t>(k);
  return RemoveGeneration(StripBlocks(src));
}

enum class Tok {
  kText,
  kNumber,
  kString,
  kIdent,
  kEquals,
  kOpenParen,
  kCloseParen,
  kOpenStatement,
  kCloseStatement,
  kOpenExpression,
  kCloseExpression,
  kOpenSquare,
  kCloseSquare,
  kOpenCurly,
  kCloseCurly,
  kComma,
  kDot,
  kColon,
  kPipe,
  kAdditive,
  kMultiplicative,
  kPower,
  kComparison,
  kUnary,
  kComment,
  kEnd
};

struct Token {
  Tok type;
  std::string value;
  size_t pos;
};

struct Rule {
  const char* seq;
  Tok type;
};
constexpr Rule kRules[] = {{"{%", Tok::kOpenStatement},  {"%}", Tok::kCloseStatement},
                           {"{{", Tok::kOpenExpression}, {"}}", Tok::kCloseExpression},
                           {"(", Tok::kOpenParen},       {")", Tok::kCloseParen},
                           {"{", Tok::kOpenCurly},       {"}", Tok::kCloseCurly},
                           {"[", Tok::kOpenSquare},      {"]", Tok::kCloseSquare},
                           {",", Tok::kComma},           {".", Tok::kDot},
                           {":", Tok::kColon},           {"|", Tok::kPipe},
                           {"<=", Tok::kComparison},     {">=", Tok::kComparison},
                           {"==", Tok::kComparison},     {"!=", Tok::kComparison},
                           {"<", Tok::kComparison},      {">", Tok::kComparison},
                           {"+", Tok::kAdditive},        {"-", Tok::kAdditive},
                           {"~", Tok::kAdditive},        {"**", Tok::kPower},
                           {"*", Tok::kMultiplicative},  {"//", Tok::kMultiplicative},
                           {"/", Tok::kMultiplicative},  {"%", Tok::kMultiplicative},
                           {"=", Tok::kEquals}};

bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsWord(char c) {
  return IsDigit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

class Lexer {
 public:
  explicit Lexer(const std::string& src) : s_(src) {}
  std::vector<Token> Run();

 private:
  Tok Last() const { return tokens_.empty() ? Tok::kEnd : tokens_.back().type; }
  void Push(Tok t, std::string v, size_t pos) { tokens_.push_back({t, std::move(v), pos}); }
  bool LexText();
  bool LexOpening();
  bool LexSign();
  void LexString(char quote);
  std::string Digits();
  void StripTrailingText();
  void Fail(const std::string& what) const { throw SyntaxError(p_, what); }

  const std::string& s_;
  size_t p_ = 0;
  int curly_ = 0;
  std::vector<Token> tokens_;
};

void Lexer::StripTrailingText() {
  if (Last() != Tok::kText) return;
  std::string& v = tokens_.back().value;
  v.resize(TrimEnd(v).size());
  if (v.empty()) tokens_.pop_back();
}

bool Lexer::LexText() {
  const Tok last = Last();
  if (last != Tok::kEnd && last != Tok::kCloseStatement && last != Tok::kCloseExpression &&
      last != Tok::kComment) {
    return false;
  }
  size_t end = p_;
  while (true) {
    end = s_.find('{', end);
    if (end == std::string::npos) {
      end = s_.size();
      break;
    }
    if (end + 1 < s_.size() && (s_[end + 1] == '%' || s_[end + 1] == '{' || s_[end + 1] == '#')) {
      break;
    }
    ++end;
  }
  if (end == p_) return false;
  Push(Tok::kText, s_.substr(p_, end - p_), p_);
  p_ = end;
  return true;
}

// `{#...#}` comments and the `{%-` / `{{-` openers.
bool Lexer::LexOpening() {
  if (s_[p_] != '{' || p_ + 1 >= s_.size()) return false;
  const char next = s_[p_ + 1];
  if (next == '#') {
    const size_t start = p_;
    p_ += 2;
    const bool strip_before = p_ < s_.size() && s_[p_] == '-';
    if (strip_before) ++p_;
    const size_t end = s_.find("#}", p_);
    if (end == std::string::npos) Fail("Missing end of comment tag");
    const bool strip_after = end > p_ && s_[end - 1] == '-';
    if (strip_before) StripTrailingText();
    Push(Tok::kComment, "", start);
    p_ = end + 2;
    if (strip_after) p_ = SkipSpace(s_, p_);
    return true;
  }
  if (p_ + 2 < s_.size() && s_[p_ + 2] == '-' && (next == '%' || next == '{')) {
    StripTrailingText();
    Push(next == '%' ? Tok::kOpenStatement : Tok::kOpenExpression, "", p_);
    if (next == '{') curly_ = 0;
    p_ += 3;
    return true;
  }
  return false;
}

std::string Lexer::Digits() {
  const size_t start = p_;
  while (p_ < s_.size() && IsDigit(s_[p_])) ++p_;
  if (p_ >= s_.size()) Fail("Unexpected end of input");
  return s_.substr(start, p_ - start);
}

// A '-' or '+' after an operator: a signed number literal, or a unary operator.
bool Lexer::LexSign() {
  const char c = s_[p_];
  if (c != '-' && c != '+') return false;
  const Tok last = Last();
  if (last == Tok::kText || last == Tok::kEnd) Fail(std::string("Unexpected character: ") + c);
  if (last == Tok::kIdent || last == Tok::kNumber || last == Tok::kString ||
      last == Tok::kCloseParen || last == Tok::kCloseSquare) {
    return false;
  }
  const size_t start = p_++;
  std::string num = Digits();
  if (!num.empty() && s_[p_] == '.' && p_ + 1 < s_.size() && IsDigit(s_[p_ + 1])) {
    ++p_;
    num += "." + Digits();
  }
  Push(num.empty() ? Tok::kUnary : Tok::kNumber, std::string(1, c) + num, start);
  return true;
}

void Lexer::LexString(char quote) {
  const size_t start = p_++;
  std::string out;
  while (true) {
    if (p_ >= s_.size()) Fail("Unexpected end of input");
    const char c = s_[p_++];
    if (c == quote) break;
    if (c != '\\') {
      out.push_back(c);
      continue;
    }
    if (p_ >= s_.size()) Fail("Unexpected end of input");
    const char e = s_[p_++];
    static const std::string_view kFrom = "ntrbfv'\"\\", kTo = "\n\t\r\b\f\v'\"\\";
    const size_t k = kFrom.find(e);
    if (k != std::string_view::npos) {
      out.push_back(kTo[k]);
    } else if (e == 'x' || e == 'u') {
      const size_t n = e == 'x' ? 2 : 4;
      const std::string hex = s_.substr(p_, n);
      if (hex.size() != n || hex.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos) {
        Fail("Invalid hexadecimal escape sequence");
      }
      const auto cp = static_cast<char32_t>(std::strtoul(hex.c_str(), nullptr, 16));
      if (cp < 0x80) {
        out.push_back(static_cast<char>(cp));
      } else if (cp < 0x800) {
        out.push_back(static_cast<char>(0xc0 | (cp >> 6)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
      } else {
        out.push_back(static_cast<char>(0xe0 | (cp >> 12)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
      }
      p_ += n;
    } else {
      Fail(std::string("Unexpected escaped character: ") + e);
    }
  }
  Push(Tok::kString, std::move(out), start);
}

std::vector<Token> Lexer::Run() {
  while (p_ < s_.size()) {
    if (LexText() || LexOpening()) continue;
    while (size_t n = WhitespaceLen(s_, p_)) {
      p_ += n;
      if (p_ >= s_.size()) Fail("Unexpected end of input");
    }
    const char c = s_[p_];
    if (c == '-' && p_ + 2 < s_.size() && s_[p_ + 2] == '}' &&
        (s_[p_ + 1] == '%' || s_[p_ + 1] == '}')) {
      Push(s_[p_ + 1] == '%' ? Tok::kCloseStatement : Tok::kCloseExpression, "", p_);
      p_ = SkipSpace(s_, p_ + 3);
      continue;
    }
    if (LexSign()) continue;
    bool matched = false;
    for (const Rule& r : kRules) {
      const std::string_view seq = r.seq;
      if (seq == "}}" && curly_ > 0) continue;
      if (s_.compare(p_, seq.size(), seq) != 0) continue;
      Push(r.type, std::string(seq), p_);
      if (r.type == Tok::kOpenExpression) curly_ = 0;
      if (r.type == Tok::kOpenCurly) ++curly_;
      if (r.type == Tok::kCloseCurly) --curly_;
      p_ += seq.size();
      matched = true;
      break;
    }
    if (matched) continue;
    if (c == '\'' || c == '"') {
      LexString(c);
    } else if (IsDigit(c)) {
      const size_t start = p_;
      std::string num = Digits();
      if (Last() != Tok::kDot && s_[p_] == '.' && p_ + 1 < s_.size() && IsDigit(s_[p_ + 1])) {
        ++p_;
        num += "." + Digits();
      }
      Push(Tok::kNumber, std::move(num), start);
    } else if (IsWord(c)) {
      const size_t start = p_;
      while (p_ < s_.size() && IsWord(s_[p_])) ++p_;
      Push(Tok::kIdent, s_.substr(start, p_ - start), start);
    } else {
      Fail(std::string("Unexpected character: ") + c);
    }
  }
  return tokens_;
}

NodePtr Make(NodeKind kind, size_t pos) {
  auto n = std::make_unique<Node>();
  n->kind = kind;
  n->pos = pos;
  return n;
}

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : t_(std::move(tokens)) {}
  NodePtr Program() {
    NodePtr program = Make(NodeKind::kProgram, 0);
    while (k_ < t_.size()) Any(&program->a);
    return program;
  }

 private:
  const Token& Peek(size_t ahead = 0) const {
    static const Token kEnd{Tok::kEnd, "", 0};
    return k_ + ahead < t_.size() ? t_[k_ + ahead] : kEnd;
  }
  size_t Pos() const { return k_ < t_.size() ? t_[k_].pos : t_.empty() ? 0 : t_.back().pos; }
  [[noreturn]] void Fail(const std::string& what) const { throw SyntaxError(Pos(), what); }
  bool Is(Tok t) const { return Peek().type == t; }
  bool IsIdent(std::string_view name, size_t ahead = 0) const {
    return Peek(ahead).type == Tok::kIdent && Peek(ahead).value == name;
  }
  bool IsStatement(std::initializer_list<std::string_view> names) const {
    if (!Is(Tok::kOpenStatement) || Peek(1).type != Tok::kIdent) return false;
    for (auto n : names)
      if (Peek(1).value == n) return true;
    return false;
  }
  const Token& Expect(Tok t, const char* what) {
    if (!Is(t)) Fail(Is(Tok::kEnd) ? std::string("Unexpected end of template: ") + what : what);
    return t_[k_++];
  }
  void ExpectEnd(const char* name) {
    Expect(Tok::kOpenStatement, "Expected {% token");
    if (!IsIdent(name)) Fail(std::string("Expected ") + name);
    ++k_;
    Expect(Tok::kCloseStatement, "Expected %} token");
  }
  void Body(std::vector<NodePtr>* out, std::initializer_list<std::string_view> until) {
    Enter();
    while (!IsStatement(until)) {
      if (Is(Tok::kEnd))
        Fail(std::string("Unexpected end of template, expected {% ") + std::string(*until.begin()) +
             " %}");
      Any(out);
    }
    --depth_;
  }
  void Any(std::vector<NodePtr>* out);
  NodePtr Statement();
  NodePtr Set();
  NodePtr If();
  NodePtr For();
  NodePtr Macro();
  NodePtr CallBlock();
  NodePtr FilterBlock();
  NodePtr Sequence(bool primary);
  NodePtr Expression();
  NodePtr Or() { return Binary(Tok::kIdent, &Parser::And, "or"); }
  NodePtr And() { return Binary(Tok::kIdent, &Parser::Not, "and"); }
  NodePtr Not();
  NodePtr Comparison();
  NodePtr Binary(Tok op, NodePtr (Parser::*next)(), const char* word = nullptr);
  NodePtr Additive() { return Binary(Tok::kAdditive, &Parser::Multiplicative); }
  NodePtr Multiplicative() { return Binary(Tok::kMultiplicative, &Parser::Power); }
  NodePtr Power() { return Binary(Tok::kPower, &Parser::TestExpr); }
  NodePtr TestExpr();
  NodePtr FilterExpr();
  NodePtr UnarySign();
  NodePtr CallMember();
  NodePtr Call(NodePtr callee);
  std::vector<NodePtr> ArgList(bool parameters);
  NodePtr Member(NodePtr object);
  NodePtr Subscript();
  NodePtr Primary();
  NodePtr Enter() {
    if (++depth_ > 100) Fail("Expression nested too deeply");
    return nullptr;
  }
  // A node that wraps the one before it (a op b, x|f, x.y, f(x), x is t): the chains
  // are loops here but recursion when evaluated, so one expression gets at most 256.
  NodePtr Wrap(NodeKind kind, size_t pos) {
    if (++wraps_ > 256) Fail("Expression too long");
    return Make(kind, pos);
  }

  std::vector<Token> t_;
  size_t k_ = 0;
  int depth_ = 0;
  int wraps_ = 0;  // in the current top-level expression
};

void Parser::Any(std::vector<NodePtr>* out) {
  wraps_ = 0;
  const Token& tok = Peek();
  switch (tok.type) {
    case Tok::kComment:
      ++k_;
      return;
    case Tok::kText: {
      NodePtr n = Make(NodeKind::kText, tok.pos);
      n->str = tok.value;
      ++k_;
      out->push_back(std::move(n));
      return;
    }
    case Tok::kOpenStatement:
      out->push_back(Statement());
      return;
    case Tok::kOpenExpression: {
      ++k_;
      out->push_back(Expression());
      Expect(Tok::kCloseExpression, "Expected closing expression token");
      return;
    }
    default:
      Fail("Unexpected token");
  }
}

NodePtr Parser::Statement() {
  ++k_;
  if (!Is(Tok::kIdent)) Fail("Unknown statement");
  const std::string name = Peek().value;
  const size_t pos = Pos();
  ++k_;
  if (name == "set") return Set();
  if (name == "break" || name == "continue") {
    Expect(Tok::kCloseStatement, "Expected closing statement token");
    return Make(name == "break" ? NodeKind::kBreak : NodeKind::kContinue, pos);
  }
  static const std::pair<const char*, NodePtr (Parser::*)()> kBlocks[] = {
      {"if", &Parser::If},
      {"for", &Parser::For},
      {"macro", &Parser::Macro},
      {"call", &Parser::CallBlock},
      {"filter", &Parser::FilterBlock}};
  for (const auto& [block, parse] : kBlocks) {
    if (name != block) continue;
    NodePtr n = (this->*parse)();
    ExpectEnd(("end" + name).c_str());
    return n;
  }
  k_--;
  Fail("Unknown statement type: " + name);
}

NodePtr Parser::Set() {
  NodePtr n = Make(NodeKind::kSet, Pos());
  n->x = Sequence(false);
  if (Is(Tok::kEquals)) {
    ++k_;
    n->y = Sequence(false);
    Expect(Tok::kCloseStatement, "Expected closing statement token");
    return n;
  }
  Expect(Tok::kCloseStatement, "Expected %} token");
  Body(&n->a, {"endset"});
  ExpectEnd("endset");
  return n;
}

NodePtr Parser::If() {
  NodePtr n = Make(NodeKind::kIf, Pos());
  n->x = Expression();
  Expect(Tok::kCloseStatement, "Expected closing statement token");
  Body(&n->a, {"endif", "elif", "else"});
  if (IsStatement({"elif"})) {
    k_ += 2;
    n->b.push_back(If());
  } else if (IsStatement({"else"})) {
    k_ += 2;
    Expect(Tok::kCloseStatement, "Expected closing statement token");
    Body(&n->b, {"endif"});
  }
  return n;
}

NodePtr Parser::For() {
  NodePtr n = Make(NodeKind::kFor, Pos());
  n->x = Sequence(true);
  if (n->x->kind != NodeKind::kIdent && n->x->kind != NodeKind::kTuple) {
    Fail("Expected identifier/tuple for the loop variable");
  }
  if (!IsIdent("in")) Fail("Expected `in` keyword following loop variable");
  ++k_;
  n->y = Expression();
  if (n->y->kind == NodeKind::kSelect) {
    NodePtr select = std::move(n->y);
    n->y = std::move(select->x);
    n->z = std::move(select->y);
  }
  Expect(Tok::kCloseStatement, "Expected closing statement token");
  Body(&n->a, {"endfor", "else"});
  if (IsStatement({"else"})) {
    k_ += 2;
    Expect(Tok::kCloseStatement, "Expected closing statement token");
    Body(&n->b, {"endfor"});
  }
  return n;
}

NodePtr Parser::Macro() {
  NodePtr n = Make(NodeKind::kMacro, Pos());
  NodePtr name = Primary();
  if (name->kind != NodeKind::kIdent) Fail("Expected identifier following macro statement");
  n->str = name->str;
  n->a = ArgList(true);
  Expect(Tok::kCloseStatement, "Expected closing statement token");
  Body(&n->b, {"endmacro"});
  return n;
}

NodePtr Parser::CallBlock() {
  NodePtr n = Make(NodeKind::kCallBlock, Pos());
  if (Is(Tok::kOpenParen)) n->a = ArgList(true);
  NodePtr callee = Primary();
  if (callee->kind != NodeKind::kIdent) Fail("Expected identifier following call statement");
  NodePtr call = Make(NodeKind::kCall, callee->pos);
  call->x = std::move(callee);
  call->a = ArgList(false);
  n->x = std::move(call);
  Expect(Tok::kCloseStatement, "Expected closing statement token");
  Body(&n->b, {"endcall"});
  return n;
}

NodePtr Parser::FilterBlock() {
  NodePtr n = Make(NodeKind::kFilterBlock, Pos());
  n->x = Primary();
  if (n->x->kind == NodeKind::kIdent && Is(Tok::kOpenParen)) n->x = Call(std::move(n->x));
  Expect(Tok::kCloseStatement, "Expected closing statement token");
  Body(&n->a, {"endfilter"});
  return n;
}

NodePtr Parser::Sequence(bool primary) {
  const size_t pos = Pos();
  NodePtr first = primary ? Primary() : Expression();
  if (!Is(Tok::kComma)) return first;
  NodePtr tuple = Make(NodeKind::kTuple, pos);
  tuple->a.push_back(std::move(first));
  while (Is(Tok::kComma)) {
    ++k_;
    tuple->a.push_back(primary ? Primary() : Expression());
  }
  return tuple;
}

NodePtr Parser::Expression() {
  Enter();
  NodePtr a = Or();
  if (IsIdent("if")) {
    const size_t pos = Pos();
    ++k_;
    NodePtr test = Or();
    NodePtr n = Make(NodeKind::kSelect, pos);
    if (IsIdent("else")) {
      ++k_;
      n->kind = NodeKind::kTernary;
      n->x = std::move(test);
      n->y = std::move(a);
      n->z = Expression();
    } else {
      n->x = std::move(a);
      n->y = std::move(test);
    }
    a = std::move(n);
  }
  --depth_;
  return a;
}

NodePtr Parser::Not() {
  if (!IsIdent("not")) return Comparison();
  NodePtr n = Make(NodeKind::kUnary, Pos());
  ++k_;
  n->str = "not";
  Enter();
  n->x = Not();
  --depth_;
  return n;
}

NodePtr Parser::Comparison() {
  NodePtr left = Additive();
  while (true) {
    NodePtr n = Wrap(NodeKind::kBinary, Pos());
    if (IsIdent("not") && IsIdent("in", 1)) {
      n->str = "not in";
      k_ += 2;
    } else if (IsIdent("in") || Is(Tok::kComparison)) {
      n->str = IsIdent("in") ? "in" : Peek().value;
      ++k_;
    } else {
      return left;
    }
    n->x = std::move(left);
    n->y = Additive();
    left = std::move(n);
  }
}

// Left-associative operators: tokens of type `op`, or the keyword `word` (and, or).
NodePtr Parser::Binary(Tok op, NodePtr (Parser::*next)(), const char* word) {
  NodePtr left = (this->*next)();
  while (word ? IsIdent(word) : Is(op)) {
    NodePtr n = Wrap(NodeKind::kBinary, Pos());
    n->str = t_[k_++].value;
    n->x = std::move(left);
    n->y = (this->*next)();
    left = std::move(n);
  }
  return left;
}

// `x is [not] test` and, beyond @huggingface/jinja, `x is test(args)`.
NodePtr Parser::TestExpr() {
  NodePtr operand = FilterExpr();
  while (IsIdent("is")) {
    NodePtr n = Wrap(NodeKind::kTest, Pos());
    ++k_;
    n->flag = IsIdent("not");
    if (n->flag) ++k_;
    NodePtr test = Primary();
    if (test->kind != NodeKind::kIdent) Fail("Expected identifier for the test");
    n->str = test->str;
    if (Is(Tok::kOpenParen)) n->a = ArgList(false);
    n->x = std::move(operand);
    operand = std::move(n);
  }
  return operand;
}

NodePtr Parser::FilterExpr() {
  NodePtr operand = UnarySign();
  while (Is(Tok::kPipe)) {
    NodePtr n = Wrap(NodeKind::kFilter, Pos());
    ++k_;
    NodePtr filter = Primary();
    if (filter->kind != NodeKind::kIdent) Fail("Expected identifier for the filter");
    if (Is(Tok::kOpenParen)) filter = Call(std::move(filter));
    n->x = std::move(operand);
    n->y = std::move(filter);
    operand = std::move(n);
  }
  return operand;
}

NodePtr Parser::UnarySign() {
  const Token& tok = Peek();
  if ((tok.type == Tok::kUnary || tok.type == Tok::kAdditive) &&
      (tok.value == "-" || tok.value == "+")) {
    NodePtr n = Make(NodeKind::kUnary, tok.pos);
    n->str = tok.value;
    ++k_;
    Enter();
    n->x = UnarySign();
    --depth_;
    return n;
  }
  return CallMember();
}

NodePtr Parser::CallMember() {
  NodePtr member = Member(Primary());
  return Is(Tok::kOpenParen) ? Call(std::move(member)) : std::move(member);
}

NodePtr Parser::Call(NodePtr callee) {
  NodePtr n = Wrap(NodeKind::kCall, Pos());
  n->x = std::move(callee);
  n->a = ArgList(false);
  n = Member(std::move(n));
  return Is(Tok::kOpenParen) ? Call(std::move(n)) : std::move(n);
}

std::vector<NodePtr> Parser::ArgList(bool parameters) {
  Expect(Tok::kOpenParen, "Expected opening parenthesis for arguments list");
  std::vector<NodePtr> args;
  bool keyword_seen = false;
  while (!Is(Tok::kCloseParen)) {
    if (Is(Tok::kEnd)) Fail("Unexpected end of template in an argument list");
    const bool kw_spread = Is(Tok::kPower);
    const bool spread = Is(Tok::kMultiplicative) && Peek().value == "*";
    if (parameters && (kw_spread || spread)) Fail("Argument unpacking is not allowed here");
    NodePtr arg;
    if (kw_spread || spread) {
      arg = Make(kw_spread ? NodeKind::kKwSpread : NodeKind::kSpread, Pos());
      ++k_;
      arg->x = Expression();
    } else {
      arg = Expression();
      if (Is(Tok::kEquals)) {
        ++k_;
        if (arg->kind != NodeKind::kIdent) Fail("Expected identifier for keyword argument");
        NodePtr kw = Make(NodeKind::kKwArg, arg->pos);
        kw->str = arg->str;
        kw->x = Expression();
        arg = std::move(kw);
      }
      if (parameters && arg->kind != NodeKind::kIdent && arg->kind != NodeKind::kKwArg) {
        Fail("Expected identifier for parameter declaration");
      }
      if (arg->kind == NodeKind::kKwArg) {
        keyword_seen = true;
      } else if (keyword_seen) {
        Fail("Positional arguments must come before keyword arguments");
      }
    }
    args.push_back(std::move(arg));
    if (Is(Tok::kComma)) ++k_;
  }
  ++k_;
  return args;
}

NodePtr Parser::Member(NodePtr object) {
  while (Is(Tok::kDot) || Is(Tok::kOpenSquare)) {
    NodePtr n = Wrap(NodeKind::kMember, Pos());
    n->flag = Is(Tok::kOpenSquare);
    ++k_;
    if (n->flag) {
      n->y = Subscript();
      Expect(Tok::kCloseSquare, "Expected closing square bracket");
    } else {
      n->y = Primary();
      if (n->y->kind != NodeKind::kIdent && n->y->kind != NodeKind::kInt) {
        Fail("Expected identifier or integer following dot operator");
      }
    }
    n->x = std::move(object);
    object = std::move(n);
  }
  return object;
}

NodePtr Parser::Subscript() {
  const size_t pos = Pos();
  std::vector<NodePtr> parts;
  bool slice = false;
  while (!Is(Tok::kCloseSquare)) {
    if (Is(Tok::kEnd)) Fail("Unexpected end of template in a subscript");
    if (Is(Tok::kColon)) {
      parts.push_back(nullptr);
      ++k_;
      slice = true;
      continue;
    }
    parts.push_back(Expression());
    if (Is(Tok::kColon)) {
      ++k_;
      slice = true;
    }
  }
  if (parts.empty()) Fail("Expected at least one argument for member/slice expression");
  if (!slice) return std::move(parts[0]);
  if (parts.size() > 3) Fail("Expected 0-3 arguments for slice expression");
  NodePtr n = Make(NodeKind::kSlice, pos);
  parts.resize(3);
  n->x = std::move(parts[0]);
  n->y = std::move(parts[1]);
  n->z = std::move(parts[2]);
  return n;
}

NodePtr Parser::Primary() {
  if (Is(Tok::kEnd)) Fail("Unexpected end of template");
  const Token& tok = t_[k_++];
  NodePtr n = Make(NodeKind::kIdent, tok.pos);
  switch (tok.type) {
    case Tok::kNumber:
      if (tok.value.find('.') != std::string::npos) {
        n->kind = NodeKind::kFloat;
        n->f = std::strtod(tok.value.c_str(), nullptr);
      } else {
        n->kind = NodeKind::kInt;
        n->i = std::strtoll(tok.value.c_str(), nullptr, 10);
      }
      return n;
    case Tok::kString:
      n->kind = NodeKind::kString;
      n->str = tok.value;
      while (Is(Tok::kString)) n->str += t_[k_++].value;
      return n;
    case Tok::kIdent:
      n->str = tok.value;
      return n;
    case Tok::kOpenParen:
      Enter();
      n = Sequence(false);
      --depth_;
      Expect(Tok::kCloseParen, "Expected closing parenthesis");
      return n;
    case Tok::kOpenSquare:
    case Tok::kOpenCurly: {
      const bool list = tok.type == Tok::kOpenSquare;
      n->kind = list ? NodeKind::kList : NodeKind::kDict;
      const Tok close = list ? Tok::kCloseSquare : Tok::kCloseCurly;
      Enter();
      while (!Is(close)) {
        if (Is(Tok::kEnd)) Fail("Unexpected end of template in a literal");
        n->a.push_back(Expression());
        if (!list) {
          Expect(Tok::kColon, "Expected colon between key and value in object literal");
          n->b.push_back(Expression());
        }
        if (Is(Tok::kComma)) ++k_;
      }
      --depth_;
      ++k_;
      return n;
    }
    default:
      k_--;
      Fail("Unexpected token");
  }
}

std::string Where(const std::string& source, size_t offset) {
  int line = 1, col = 1;
  for (size_t k = 0; k < offset && k < source.size(); ++k) {
    if (source[k] == '\n') {
      ++line;
      col = 1;
    } else if ((static_cast<unsigned char>(source[k]) & 0xc0) != 0x80) {
      ++col;
    }
  }
  return absl::StrCat("line ", line, ", column ", col);
}

}  // namespace

absl::StatusOr<NodePtr> ParseTemplate(const std::string& source) {
  const Src src = Preprocess(source);
  try {
    return Parser(Lexer(src.text).Run()).Program();
  } catch (const SyntaxError& e) {
    const size_t offset = e.pos < src.origin.size() ? src.origin[e.pos] : source.size();
    return absl::InvalidArgumentError(
        absl::StrCat("template syntax error at ", Where(source, offset), ": ", e.what()));
  }
}

}  // namespace superpose::model::jinja
