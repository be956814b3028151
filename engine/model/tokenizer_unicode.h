// UTF-8 and Unicode helpers for the tokenizer: decoding, Rust-compatible lossy
// conversion, the character classes HF `tokenizers` uses (Rust's char methods), Unicode
// normalization forms (utf8proc) and GPT-2's byte-to-unicode table.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace superpose::engine::tok {

// Decodes the code point at s[*i] and advances *i. Returns false (and advances by one
// byte) on an invalid sequence.
bool NextCodePoint(std::string_view s, size_t* i, char32_t* cp);
void AppendUtf8(std::string* out, char32_t cp);
bool IsValidUtf8(std::string_view s);
// Like Rust's String::from_utf8_lossy: each maximal invalid subpart becomes U+FFFD.
std::string Utf8Lossy(std::string_view bytes);
// Length in bytes of the longest prefix of `s` that ends on a character boundary
// (assumes `s` is valid UTF-8 except possibly for a truncated last character).
size_t Utf8BoundaryPrefix(std::string_view s, size_t n);

// Rust char::is_whitespace (Unicode White_Space).
bool IsWhitespace(char32_t c);
// Rust char::is_numeric (general categories Nd, Nl, No).
bool IsNumeric(char32_t c);
// HF Punctuation pre-tokenizer: ASCII punctuation or a Unicode P* category.
bool IsPunctuation(char32_t c);
// The Rust regex crate's `\w` (HF single_word): Alphabetic, marks, Nd, Pc, Join_Control.
bool IsWordChar(char32_t c);
// General category Mark (Mn, Mc, Me): unicode-normalization's is_combining_mark, which
// HF's StripAccents removes.
bool IsCombiningMark(char32_t c);

enum class NormalForm { kNFC, kNFD, kNFKC, kNFKD };
// Returns `s` in the given normalization form (s must be valid UTF-8).
std::string UnicodeNormalize(std::string_view s, NormalForm form);
// Rust str::to_lowercase (full mapping except final-sigma context).
std::string Lowercase(std::string_view s);

// GPT-2 byte-level alphabet: each byte maps to one printable code point.
const std::string& ByteToUnicode(uint8_t b);  // UTF-8 of the mapped char
// The byte for a byte-level code point, or -1.
int UnicodeToByte(char32_t c);

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

}  // namespace superpose::engine::tok
