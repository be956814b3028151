// Chat templates: the Jinja interpreter on its own (syntax, values, statements, errors,
// budgets), ChatTemplate::FromTokenizerConfig, and the reference comparison: every
// (template, input) of tests/chat_templates/corpus.json rendered by @huggingface/jinja
// (tests/node/render_reference.mjs, run here with node) and by us, byte for byte.
// Without node or the package (`npm ci --prefix tests/node`) the comparison fails;
// SUPERPOSE_SKIP_NODE_REFERENCE=1 skips it.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "engine/model/chat_template.h"
#include "engine/model/jinja.h"
#include "nlohmann/json.hpp"

namespace superpose::model {
namespace {

using nlohmann::json;

std::string EnvOr(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' ? v : fallback;
}
std::string SharedDir() { return EnvOr("SUPERPOSE_SHARED_DIR", SP_SHARED_DIR); }
std::string SourceDir() { return EnvOr("SUPERPOSE_SOURCE_DIR", SP_SOURCE_DIR); }

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

const absl::Time kNow = absl::FromUnixMillis(1770091506000);  // 2026-02-03T04:05:06Z

absl::StatusOr<std::string> Render(
    const std::string& source,
    const nlohmann::ordered_json& context = nlohmann::ordered_json::object(),
    const jinja::RenderLimits& limits = {}) {
  absl::StatusOr<jinja::Template> t = jinja::Template::Parse(source);
  if (!t.ok()) return t.status();
  return t->Render(context, kNow, limits);
}

std::string Ok(const std::string& source,
               const nlohmann::ordered_json& context = nlohmann::ordered_json::object()) {
  absl::StatusOr<std::string> out = Render(source, context);
  EXPECT_TRUE(out.ok()) << source << "\n" << out.status();
  return out.ok() ? *out : "<error>";
}

TEST(Jinja, TextExpressionsAndComments) {
  EXPECT_EQ(Ok("Hello {{ name }}!{# a comment #}", {{"name", "world"}}), "Hello world!");
  EXPECT_EQ(Ok("{{ 'a' ~ 1 ~ 2.5 }}|{{ \"q\\\"\\n\" }}|{{ 'x' 'y' }}"), "a12.5|q\"\n|xy");
  EXPECT_EQ(Ok("{{ 7 // 2 }} {{ 7 / 2 }} {{ 7 % 3 }} {{ 2 ** 10 }} {{ -3 + 1 }} {{ 1.0 }}"),
            "3 3.5 1 1024 -2 1.0");
  EXPECT_EQ(Ok("{{ 'b' in 'abc' }} {{ 3 not in [1, 2] }} {{ 'k' in {'k': 1} }}"), "true true true");
  EXPECT_EQ(Ok("{{ x if x else 'none' }}|{{ 'yes' if 1 < 2 else 'no' }}", {{"x", ""}}), "none|yes");
}

TEST(Jinja, PrintsValuesAsHuggingFaceJinja) {
  EXPECT_EQ(Ok("{{ [1, 'a', true, none, 2.0] }}"), "[1, \"a\", true, null, 2]");
  EXPECT_EQ(Ok("{{ {'b': 1, 'a': [1, 2]} }}"), "{\"b\": 1, \"a\": [1, 2]}");
  EXPECT_EQ(Ok("{{ true }} {{ none }}{{ undefined_thing }}|{{ 3.25 }} {{ 10 / 4 }}"),
            "true |3.25 2.5");
  EXPECT_EQ(Ok("{{ x }}", {{"x", 2.0}}), "2");  // JSON numbers: an integral one is an integer
}

TEST(Jinja, WhitespaceControlAndBlockTrimming) {
  EXPECT_EQ(Ok("a  {{- ' b ' -}}  c"), "a b c");
  EXPECT_EQ(Ok("a\n  {%- if true %} b {% endif -%}\n  c"), "a b c");
  // trim_blocks (the newline after a block) and lstrip_blocks (blanks before one).
  EXPECT_EQ(Ok("{% if true %}\n  x\n  {% endif %}\ny\n"), "  x\ny");
  EXPECT_EQ(Ok("{% for i in [1, 2] %}\n{{ i }}\n{% endfor %}"), "1\n2\n");
  EXPECT_EQ(Ok("a {#- c -#} b"), "ab");
  EXPECT_EQ(Ok("{% generation %}body{% endgeneration %}"), "body");
}

TEST(Jinja, ForLoops) {
  EXPECT_EQ(Ok("{% for x in xs %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}"
               "{{ loop.first }}{{ loop.last }}{{ loop.length }}{% endfor %}",
               {{"xs", {"a", "b"}}}),
            "102truefalse2211falsetrue2");
  EXPECT_EQ(Ok("{% for x in xs %}{{ loop.previtem }}>{{ x }}>{{ loop.nextitem }};{% endfor %}",
               {{"xs", {1, 2, 3}}}),
            ">1>2;1>2>3;2>3>;");
  EXPECT_EQ(Ok("{% for k, v in d.items() %}{{ k }}={{ v }},{% endfor %}", {{"d", {{"a", 1}}}}),
            "a=1,");
  EXPECT_EQ(Ok("{% for x in [1, 2, 3, 4] if x is even %}{{ x }}{% endfor %}"), "24");
  EXPECT_EQ(Ok("{% for x in [] %}x{% else %}empty{% endfor %}"), "empty");
  // As Python Jinja: output before a continue stays; `else` only when there was no item.
  EXPECT_EQ(Ok("{% for x in [1, 2] %}<{{ x }}{% continue %}>{% else %}E{% endfor %}"), "<1<2");
  EXPECT_EQ(Ok("{% for x in [1, 2, 3] %}{% if x == 2 %}{% continue %}{% endif %}{{ x }}"
               "{% if x == 3 %}{% break %}{% endif %}{% endfor %}"),
            "13");
  EXPECT_EQ(Ok("{% set ns = namespace(n=0) %}{% for x in range(5) %}{% set ns.n = ns.n + x %}"
               "{% endfor %}{{ ns.n }}"),
            "10");
  EXPECT_EQ(Ok("{% set x = 1 %}{% for i in [1] %}{% set x = 2 %}{% endfor %}{{ x }}"), "1");
}

TEST(Jinja, SetMacrosAndCalls) {
  EXPECT_EQ(Ok("{% set a, b = [1, 2] %}{{ b }}{{ a }}"), "21");
  EXPECT_EQ(Ok("{% set block %}x{{ 1 + 1 }}{% endset %}[{{ block }}]"), "[x2]");
  EXPECT_EQ(Ok("{% macro greet(name, greeting='Hi') %}{{ greeting }} {{ name }}{% endmacro %}"
               "{{ greet('Ann') }}/{{ greet('Bo', greeting='Yo') }}"),
            "Hi Ann/Yo Bo");
  EXPECT_EQ(Ok("{% macro wrap() %}<{{ caller() }}>{% endmacro %}{% call wrap() %}in{% endcall %}"),
            "<in>");
  EXPECT_EQ(Ok("{% filter upper %}abc{% endfilter %}"), "ABC");
}

TEST(Jinja, FiltersAndMethods) {
  EXPECT_EQ(Ok("{{ '  hi  ' | trim }}|{{ 'ab' | upper }}|{{ 'hello world' | title }}|"
               "{{ 'abc' | capitalize }}|{{ [3, 1, 2] | sort | join(',') }}|{{ 'abc' | length }}"),
            "hi|AB|Hello World|Abc|1,2,3|3");
  EXPECT_EQ(Ok("{{ [1, 2, 2, 3] | unique | list | reverse | join }}|{{ [1, 2] | first }}"
               "{{ [1, 2] | last }}|{{ -5 | abs }}|{{ '12' | int + 1 }}|{{ '1.5' | float }}"),
            "321|12|5|13|1.5");
  EXPECT_EQ(
      Ok("{{ missing | default('d') }}|{{ '' | default('e', true) }}|{{ 'a\\nb' | indent(2) }}"),
      "d|e|a\n  b");
  EXPECT_EQ(Ok("{{ xs | selectattr('on') | map(attribute='n') | join(',') }}|"
               "{{ xs | rejectattr('on') | map(attribute='n') | list }}",
               {{"xs", {{{"n", "a"}, {"on", true}}, {{"n", "b"}, {"on", false}}}}}),
            "a|[\"b\"]");
  EXPECT_EQ(Ok("{{ ' x '.strip() }}|{{ 'a,b'.split(',') }}|{{ 'abc'.startswith('a') }}|"
               "{{ 'aXa'.replace('a', 'b') }}|{{ 'xxhixx'.strip('x') }}|{{ 'hello'.find('l') }}"),
            "x|[\"a\", \"b\"]|true|bXb|hi|2");
  EXPECT_EQ(Ok("{{ d.get('a') }}|{{ d.get('z', 'dflt') }}|{{ d.keys() | list }}|{{ d | length }}",
               {{"d", {{"a", 1}}}}),
            "1|dflt|[\"a\"]|1");
  EXPECT_EQ(Ok("{{ 'abcdef'[::-1] }}|{{ [1, 2, 3][1:] }}|{{ 'abc'[-1] }}"), "fedcba|[2, 3]|c");
}

TEST(Jinja, ToJsonKeepsKeyOrderAndEscapesAsJsonDumps) {
  const nlohmann::ordered_json ctx = {
      {"v", nlohmann::ordered_json::parse(R"({"z": 1, "a": [true, null, "é\"\n"], "f": 1.5})")}};
  EXPECT_EQ(Ok("{{ v | tojson }}", ctx), R"({"z": 1, "a": [true, null, "é\"\n"], "f": 1.5})");
  EXPECT_EQ(Ok("{{ v.a | tojson(indent=2) }}", ctx), "[\n  true,\n  null,\n  \"é\\\"\\n\"\n]");
  EXPECT_EQ(Ok("{{ {'k': 'ü'} | tojson(ensure_ascii=true) }}"), R"({"k": "\u00fc"})");
}

TEST(Jinja, Tests) {
  EXPECT_EQ(Ok("{{ x is defined }}{{ y is undefined }}{{ none is none }}{{ 'a' is string }}"
               "{{ 1 is number }}{{ 1.5 is float }}{{ {} is mapping }}{{ [] is iterable }}"
               "{{ 3 is odd }}{{ 9 is divisibleby(3) }}{{ 'ab' is lower }}{{ true is boolean }}",
               {{"x", 1}}),
            "truetruetruetruetruetruetruetruetruetruetruetrue");
}

TEST(Jinja, UndefinedBehavesAsHuggingFaceJinja) {
  EXPECT_EQ(Ok("[{{ nothing }}][{{ nothing.attr }}][{{ nothing is defined }}]"), "[][][false]");
  EXPECT_EQ(Ok("{% if not nothing %}falsy{% endif %}"), "falsy");
  EXPECT_EQ(Ok("{{ 'a' ~ nothing ~ 'b' }}"), "ab");
  const auto r = Render("{{ nothing + 1 }}");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(Render("{% for x in nothing %}{% endfor %}").ok());
}

TEST(Jinja, RaiseExceptionIsInvalidArgumentWithTheMessage) {
  const auto r = Render("a{{ raise_exception('Roles must alternate!') }}");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.status().message(), "Roles must alternate!");
}

TEST(Jinja, SyntaxErrorsNameLineAndColumn) {
  auto r = Render("line one\n{% if x %}\n  {{ x + }}\n{% endif %}");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("line 3, column 10"), std::string::npos) << r.status();
  r = Render("{% for x in xs %}never closed");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("syntax error at line 1"), std::string::npos) << r.status();
  r = Render("{% frobnicate %}");
  EXPECT_NE(r.status().message().find("Unknown statement type: frobnicate"), std::string::npos);
  EXPECT_FALSE(Render("{{ 'unterminated }}").ok());
  EXPECT_FALSE(Render("{# no end").ok());
  // Nesting and operator chains are bounded: no stack overflow.
  EXPECT_FALSE(Render("{{ " + std::string(5000, '(')).ok());
  std::string chain = "{{ 1";
  for (int k = 0; k < 100000; ++k) chain += " + 1";
  EXPECT_FALSE(Render(chain + " }}").ok());
  EXPECT_EQ(Ok("{{ 1 ~ 1 ~ 1 }}"), "111");
}

TEST(Jinja, BudgetsStopRunawayTemplates) {
  jinja::RenderLimits limits;
  limits.max_steps = 100000;
  auto r =
      Render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
             json::object(), limits);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  limits = jinja::RenderLimits();
  limits.max_output_bytes = 1 << 20;
  r = Render(
      "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
      "{% endfor %}{{ ns.s }}",
      json::object(), limits);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  r = Render("{% for i in range(1000000) %}{{ 'abcdefgh' * 1 }}{% endfor %}", json::object(),
             limits);
  EXPECT_FALSE(r.ok());
  r = Render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  // A namespace that holds itself is released after the render (no leak under ASan).
  EXPECT_EQ(Ok("{% set ns = namespace(me=none) %}{% set ns.me = ns %}ok"), "ok");
}

TEST(Jinja, StrftimeNowUsesTheInjectedClock) {
  EXPECT_EQ(Ok("{{ strftime_now('%d %b %Y %H:%M %B %%') }}"), "03 Feb 2026 04:05 February %");
}

// Every prefix of the real templates (cut at ~80 points each) parses or fails cleanly,
// and renders or fails cleanly: no crash, no hang (run under ASan in CI).
TEST(Jinja, TruncatedTemplatesFailCleanly) {
  const nlohmann::ordered_json corpus =
      nlohmann::ordered_json::parse(ReadFile(SourceDir() + "/tests/chat_templates/corpus.json"));
  const nlohmann::ordered_json& input = corpus["inputs"]["tools"];
  nlohmann::ordered_json context = input["extra_context"];
  context["messages"] = input["messages"];
  int parsed = 0, failed = 0;
  for (const auto& entry : corpus["templates"]) {
    if (!entry.contains("file")) continue;
    const std::string source =
        ReadFile(SourceDir() + "/tests/chat_templates/" + entry["file"].get<std::string>());
    for (size_t cut = 0; cut < source.size(); cut += 1 + source.size() / 80) {
      absl::StatusOr<jinja::Template> t = jinja::Template::Parse(source.substr(0, cut));
      if (!t.ok()) {
        EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
        ++failed;
        continue;
      }
      ++parsed;
      absl::StatusOr<std::string> out = t->Render(context, kNow);
      EXPECT_TRUE(out.ok() || out.status().code() == absl::StatusCode::kInvalidArgument);
    }
  }
  EXPECT_GT(parsed, 100);
  EXPECT_GT(failed, 100);
}

// ---- ChatTemplate ----

std::string WriteTemp(const std::string& name, const std::string& text) {
  const std::string path = absl::StrCat(SP_BINARY_DIR, "/", name);
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

TEST(ChatTemplate, FromTokenizerConfigOfTheFixtures) {
  auto t = ChatTemplate::FromTokenizerConfig(SharedDir() +
                                             "/fixtures/tokenizers/phi-3/tokenizer_config.json");
  ASSERT_TRUE(t.ok()) << t.status();
  ChatRenderOptions options;
  const json messages = json::parse(R"([{"role": "user", "content": "Hi"}])");
  EXPECT_EQ(*t->Render(messages, options), "<|user|>\nHi<|end|>\n<|assistant|>\n");
  options.add_generation_prompt = false;
  EXPECT_EQ(*t->Render(messages, options), "<|user|>\nHi<|end|>\n<|endoftext|>");
}

TEST(ChatTemplate, FromTokenizerConfigVariants) {
  const std::string path = WriteTemp("chat_template_test_config.json", R"({
    "bos_token": {"content": "<B>", "lstrip": false}, "eos_token": "<E>",
    "chat_template": [{"name": "tool_use", "template": "tools"},
                      {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}]})");
  auto t = ChatTemplate::FromTokenizerConfig(path);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t->Render(json::parse(R"([{"role": "user", "content": "x"}])"), {}), "<B>x<E>");
  const std::string none = WriteTemp("chat_template_test_none.json", R"({"eos_token": "</s>"})");
  EXPECT_EQ(ChatTemplate::FromTokenizerConfig(none).status().code(), absl::StatusCode::kNotFound);
  const std::string bad =
      WriteTemp("chat_template_test_bad.json", R"({"chat_template": "{% if %}"})");
  EXPECT_EQ(ChatTemplate::FromTokenizerConfig(bad).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(ChatTemplate::FromTokenizerConfig(SP_BINARY_DIR "/no_such_file.json").ok());
}

TEST(ChatTemplate, ExtraContextAndErrors) {
  auto t = ChatTemplate::Parse(
      "{% if enable_thinking is false %}no-think {% endif %}{{ messages | length }}"
      "{% if add_generation_prompt %}>{% endif %}",
      "", "");
  ASSERT_TRUE(t.ok());
  ChatRenderOptions options;
  options.extra_context = {{"enable_thinking", false}};
  EXPECT_EQ(*t->Render(json::array({json::object()}), options), "no-think 1>");
  EXPECT_FALSE(t->Render(json::object(), options).ok());  // messages must be an array
  EXPECT_EQ(ChatTemplate::Parse("{{ x", "", "").status().code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- The reference comparison ----

struct Case {
  std::string template_name, input_name;
};

std::string FirstDifference(const std::string& want, const std::string& got) {
  size_t k = 0;
  while (k < want.size() && k < got.size() && want[k] == got[k]) ++k;
  const size_t from = k > 40 ? k - 40 : 0;
  return absl::StrCat("first difference at byte ", k,
                      ":\n  want: ", json(want.substr(from, 120)).dump(),
                      "\n  got:  ", json(got.substr(from, 120)).dump());
}

TEST(ChatTemplateReference, MatchesHuggingFaceJinjaByteForByte) {
  const std::string out = absl::StrCat(SP_BINARY_DIR, "/chat_template_reference.json");
  std::remove(out.c_str());
  const std::string cmd =
      absl::StrCat("cd '", SourceDir(), "' && TZ=UTC node tests/node/render_reference.mjs ",
                   "tests/chat_templates '", SharedDir(), "' '", out, "' 2>&1");
  const int rc = std::system(cmd.c_str());
  if (rc != 0 && EnvOr("SUPERPOSE_SKIP_NODE_REFERENCE", "") == "1") {
    GTEST_SKIP() << "node reference unavailable and SUPERPOSE_SKIP_NODE_REFERENCE=1";
  }
  ASSERT_EQ(rc, 0)
      << "running the reference renderer failed: " << cmd
      << "\n(install node and run `npm ci --prefix tests/node`, as scripts/setup.sh does)";
  const json ref = json::parse(ReadFile(out));
  // ordered_json: the inputs' keys keep their order, as in the reference.
  const nlohmann::ordered_json corpus =
      nlohmann::ordered_json::parse(ReadFile(SourceDir() + "/tests/chat_templates/corpus.json"));
  ChatRenderOptions base;
  const absl::Time now = absl::FromUnixMillis(ref["now_ms"].get<int64_t>());
  base.clock = [now] { return now; };
  std::map<std::string, absl::StatusOr<ChatTemplate>> templates;
  std::map<std::string, nlohmann::ordered_json> inputs_of;
  for (const nlohmann::ordered_json& entry : corpus["templates"]) {
    const std::string name = entry["name"];
    nlohmann::ordered_json inputs = corpus["inputs"];
    if (entry.contains("inputs")) inputs.update(entry["inputs"]);
    inputs_of[name] = inputs;
    if (entry.contains("tokenizer_config")) {
      templates.emplace(
          name, ChatTemplate::FromTokenizerConfig(SharedDir() + "/fixtures/tokenizers/" +
                                                  entry["tokenizer_config"].get<std::string>() +
                                                  "/tokenizer_config.json"));
    } else {
      const std::string source =
          entry.contains("source")
              ? entry["source"].get<std::string>()
              : ReadFile(SourceDir() + "/tests/chat_templates/" + entry["file"].get<std::string>());
      templates.emplace(name, ChatTemplate::Parse(source, entry["bos_token"], entry["eos_token"]));
    }
  }
  // Where we follow Python Jinja (transformers) and the reference does not: we must
  // render, and differ from it (else the entry is stale).
  std::map<std::pair<std::string, std::string>, std::string> beyond;
  for (const auto& b : corpus["beyond_reference"]) beyond[{b["template"], b["input"]}] = b["why"];
  auto is_beyond = [&](const std::string& t, const std::string& i) {
    return beyond.count({t, i}) || beyond.count({t, "*"});
  };
  int matched_ok = 0, matched_error = 0, diverged = 0;
  for (const json& c : ref["cases"]) {
    const std::string name = c["template"];
    ASSERT_TRUE(templates.count(name)) << name;
    const absl::StatusOr<ChatTemplate>& t = templates.at(name);
    if (c.contains("parse_error")) {
      EXPECT_FALSE(t.ok()) << name << ": the reference cannot parse it: " << c["parse_error"];
      continue;
    }
    ASSERT_TRUE(t.ok()) << name << ": " << t.status();
    const std::string input_name = c["input"];
    const nlohmann::ordered_json& input = inputs_of[name][input_name];
    ChatRenderOptions options = base;
    options.add_generation_prompt = input["add_generation_prompt"].get<bool>();
    const nlohmann::ordered_json extra =
        input.contains("extra_context") ? input["extra_context"] : nlohmann::ordered_json();
    const absl::StatusOr<std::string> got = t->Render(input["messages"], extra, options);
    const std::string what = absl::StrCat(name, " x ", input_name);
    if (is_beyond(name, input_name)) {
      EXPECT_TRUE(got.ok()) << what << ": " << got.status();
      // A case listed by name must differ (else the entry is stale); "*" covers the
      // inputs where the template's difference shows.
      EXPECT_FALSE(beyond.count({name, input_name}) && c["ok"].get<bool>() && got.ok() &&
                   c["output"] == *got)
          << what << " is listed in beyond_reference but matches the reference";
      ++diverged;
      continue;
    }
    if (!c["ok"].get<bool>()) {
      EXPECT_FALSE(got.ok()) << what << ": the reference fails (" << c["error"]
                             << ") but we render";
      matched_error += !got.ok();
      continue;
    }
    if (!got.ok()) {
      ADD_FAILURE() << what << ": " << got.status();
      continue;
    }
    const std::string want = c["output"];
    EXPECT_EQ(want, *got) << what << ": " << FirstDifference(want, *got);
    matched_ok += want == *got;
  }
  std::printf("chat templates: %d renders match the reference, %d fail in both, %d beyond it\n",
              matched_ok, matched_error, diverged);
  EXPECT_GE(diverged, static_cast<int>(beyond.size()));
  EXPECT_GT(matched_ok, 700);  // the corpus is all there
}

}  // namespace
}  // namespace superpose::model
