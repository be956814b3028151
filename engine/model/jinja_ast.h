// The Jinja AST (jinja.h): one node type; which fields a kind uses is listed by kind.
#ifndef SUPERPOSE_ENGINE_MODEL_JINJA_AST_H_
#define SUPERPOSE_ENGINE_MODEL_JINJA_AST_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace superpose::model::jinja {

enum class NodeKind {
  // Statements.
  kProgram,  // a: body
  kText,     // str
  kIf,       // x: test, a: body, b: else (an elif is one kIf there)
  kFor,      // x: target (kIdent or kTuple), y: iterable, z: filter or null, a: body, b: else
  kBreak,
  kContinue,
  kSet,          // x: target, y: value or null (block set: a: body)
  kMacro,        // str: name, a: parameters (kIdent or kKwArg), b: body
  kCallBlock,    // x: the kCall, a: caller parameters, b: body
  kFilterBlock,  // x: filter (kIdent or kCall), a: body
  // Expressions.
  kIdent,     // str
  kInt,       // i
  kFloat,     // f
  kString,    // str
  kList,      // a
  kTuple,     // a
  kDict,      // a: keys, b: values
  kMember,    // x: object, y: property, flag: computed ([...])
  kSlice,     // x, y, z: start, stop, step (each may be null)
  kCall,      // x: callee, a: arguments
  kKwArg,     // str: name, x: value
  kSpread,    // x (*args)
  kKwSpread,  // x (**kwargs)
  kBinary,    // str: operator, x, y
  kUnary,     // str: operator, x
  kFilter,    // x: operand, y: filter (kIdent or kCall)
  kTest,      // x: operand, str: test, flag: negated, a: arguments
  kSelect,    // x: value, y: condition (`a if c` with no else)
  kTernary,   // x: condition, y: if true, z: if false
};

struct Node;
using NodePtr = std::unique_ptr<Node>;

struct Node {
  NodeKind kind;
  size_t pos = 0;  // byte offset in the template source
  std::string str;
  int64_t i = 0;
  double f = 0;
  bool flag = false;
  NodePtr x, y, z;
  std::vector<NodePtr> a, b;
};

// Lexes and parses a template (trim_blocks and lstrip_blocks on). Errors name
// line:column of the source.
absl::StatusOr<NodePtr> ParseTemplate(const std::string& source);

}  // namespace superpose::model::jinja

#endif  // SUPERPOSE_ENGINE_MODEL_JINJA_AST_H_
