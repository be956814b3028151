#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets from the shared fixtures (at fuzz time:
nothing from the fixtures is copied into the repository).

  fuzz/make_seeds.py SHARED_DIR PROTO_DIR OUT_DIR

OUT_DIR/{tokenizer,config,safetensors,request,openai_request}/: one file per seed. Request seeds are
encoded with protoc --encode from text-format messages built here.
"""
import json
import os
import struct
import subprocess
import sys

# Same order as LLVMFuzzerInitialize in tokenizer_fuzz.cc.
TOKENIZERS = ["stories260k", "tokenizers/llama-spm", "tokenizers/phi-3", "tokenizers/gpt-2",
              "tokenizers/gpt-neox", "tokenizers/falcon"]
PER_TOKENIZER = 40


def write(out_dir, name, data):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name), "wb") as f:
        f.write(data)


def cases(fixtures, tok):
    """(text, ids) pairs of a tokenizer's reference vectors."""
    out = []
    for fname in ("cases.json", "extra_cases.json"):
        path = os.path.join(fixtures, tok, fname)
        if os.path.exists(path):
            out += [(c["text"], c["ids"]) for c in json.load(open(path, encoding="utf-8"))]
    if tok == "stories260k":
        golden = json.load(open(os.path.join(fixtures, tok, "golden.json"), encoding="utf-8"))
        for g in golden["generation"]:
            out.append((g["prompt"], g["prompt_ids"] + g["completion_ids"]))
    return out


def sample_texts(fixtures):
    texts = []
    for tok in TOKENIZERS:
        texts += [t for t, _ in cases(fixtures, tok)[:PER_TOKENIZER] if t]
    return texts


def tokenizer_seeds(fixtures, out):
    for i, tok in enumerate(TOKENIZERS):
        for k, (text, ids) in enumerate(cases(fixtures, tok)[:PER_TOKENIZER]):
            text_bytes = text.encode("utf-8")[:4000]
            write(out, f"{i}-text-{k}", bytes([i]) + text_bytes)
            id_bytes = b"".join(struct.pack("<H", (x + 4) & 0xFFFF) for x in ids[:1000])
            write(out, f"{i}-ids-{k}", bytes([i + len(TOKENIZERS)]) + id_bytes)


def tokenizer_json_seeds(fixtures, out):
    """stories260k's tokenizer.json (15 KB) and small files built from each fixture's
    settings (normalizer, pre-tokenizer, decoder, post-processor, added tokens) with a
    cut-down vocabulary: the real files are 2 MB, too big to mutate usefully."""
    for tok in TOKENIZERS:
        j = json.load(open(os.path.join(fixtures, tok, "tokenizer.json"), encoding="utf-8"))
        model = j["model"]
        vocab = dict(list(model["vocab"].items())[:300])
        merges = []
        for m in model.get("merges", []):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            if a in vocab and b in vocab and a + b in vocab:
                merges.append(m)
        small = dict(j)
        small["model"] = dict(model, vocab=vocab, merges=merges[:200])
        small["added_tokens"] = [a for a in j.get("added_tokens", []) if a["id"] < 300][:8]
        name = os.path.basename(tok)
        write(out, name + "-small.json", json.dumps(small, ensure_ascii=False).encode())
    stories = os.path.join(fixtures, "stories260k", "tokenizer.json")
    write(out, "stories260k.json", open(stories, "rb").read())


def config_seeds(fixtures, out):
    stories = os.path.join(fixtures, "stories260k")
    base = json.load(open(os.path.join(stories, "config.json")))
    for name in ("config.json", "generation_config.json"):
        write(out, name, open(os.path.join(stories, name), "rb").read())
    variants = {
        "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                  "sliding_window": 4096, "use_sliding_window": False},
        "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 16},
        "mistral": {"architectures": ["MistralForCausalLM"], "sliding_window": None},
        "llama3-rope": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192},
                        "eos_token_id": [2, 3], "torch_dtype": "bfloat16"},
        "linear-rope": {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 500000.0}, "torch_dtype": "float16"},
        # Boundaries (the first two were accepted before the fixes in docs/reliability.md).
        "rope-factor-beyond-float": {"rope_scaling": {"rope_type": "linear", "factor": 1e300}},
        "sizes-near-int32-max": {"hidden_size": 2147483640, "num_attention_heads": 4,
                                 "num_key_value_heads": 4, "intermediate_size": 2147483647},
        "odd-values": {"rms_norm_eps": 1e-300, "rope_theta": 3.4e38, "eos_token_id": [2, 2, -1],
                       "pad_token_id": None, "num_hidden_layers": 1.0},
    }
    for name, patch in variants.items():
        j = dict(base)
        j.update(patch)
        write(out, name + ".json", json.dumps(j, indent=1).encode())


def safetensors_file(header, data):
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + data


def safetensors_seeds(fixtures, out):
    raw = open(os.path.join(fixtures, "stories260k", "model.safetensors"), "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    write(out, "first-4k", raw[:4096])  # the real header, then truncated data
    # Small valid files: real tensors (norms, one 64x64 matrix) re-packed.
    picks = [k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 1][:3]
    picks += [k for k, v in header.items() if k.endswith("layers.0.self_attn.q_proj.weight")]
    for dtype in ("F32", "BF16", "F16"):
        new, data = {"__metadata__": {"format": "pt"}}, b""
        for k in picks:
            b, e = header[k]["data_offsets"]
            t = raw[base + b:base + e]
            if dtype != "F32":  # the high halves (bf16-like bits; any bits are valid input)
                t = b"".join(t[i + 2:i + 4] for i in range(0, len(t), 4))
            new[k] = {"dtype": dtype, "shape": header[k]["shape"],
                      "data_offsets": [len(data), len(data) + len(t)]}
            data += t
        write(out, f"small-{dtype}", safetensors_file(new, data))
    write(out, "empty", safetensors_file({}, b""))
    # Boundaries of the header checks.
    def one(name, entry, data=bytes(16)):
        write(out, name, safetensors_file({"__metadata__": {"k": "v"}, "x": entry}, data))
    one("shape-overflow", {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 16]})
    one("shape-u64", {"dtype": "F32", "shape": [2**64 - 1], "data_offsets": [0, 16]})
    one("shape-float", {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]})
    one("offsets-u64", {"dtype": "F32", "shape": [4], "data_offsets": [0, 2**64 - 1]})
    one("offsets-reversed", {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]})
    one("zero-dim", {"dtype": "BF16", "shape": [0, 7], "data_offsets": [16, 16]})
    one("scalar", {"dtype": "F16", "shape": [], "data_offsets": [2, 4]})
    one("odd-offset", {"dtype": "F32", "shape": [2, 2], "data_offsets": [1, 17]}, bytes(17))
    write(out, "header-len-huge", b"\xff" * 8 + b"{}")
    h = b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    write(out, "duplicate-key", struct.pack("<Q", len(h)) + h + bytes(8))
    write(out, "i32", safetensors_file({"x": {"dtype": "I32", "shape": [2],
                                              "data_offsets": [0, 8]}}, bytes(8)))


def text_string(s):
    """A text-format string literal (octal escapes for everything not plain ASCII)."""
    out = []
    for b in s.encode("utf-8"):
        c = chr(b)
        out.append(c if 32 <= b < 127 and c not in "\"\\'" else "\\%03o" % b)
    return '"' + "".join(out) + '"'


def request_seeds(fixtures, proto_dir, out):
    texts = sample_texts(fixtures)[:60]
    msgs = []  # (selector byte, message type, text format)
    sampling = ("sampling { max_new_tokens: 16 temperature: 0.7 top_k: 40 top_p: 0.9 "
                "min_p: 0.05 repetition_penalty: 1.1 presence_penalty: 0.5 "
                "frequency_penalty: -0.5 seed: 7 }")
    for i, t in enumerate(texts):
        msgs.append((0, "GenerateRequest", f"text: {text_string(t)} {sampling if i % 2 else ''} "
                     f"stop: {text_string(t[:8] or 'x')} request_id: \"req-{i}\" priority: 3 "
                     f"logprobs: true top_logprobs: 5"))
        msgs.append((2, "TokenizeRequest", f"text: {text_string(t)} add_special_tokens: {i % 2 == 0}"))
    msgs.append((0, "GenerateRequest", "token_ids { ids: [1, 400, 300, 2] } stop_token_ids: [2] "
                 "add_special_tokens: false skip_special_tokens: false ignore_eos: true"))
    golden = json.load(open(os.path.join(fixtures, "stories260k", "golden.json"), encoding="utf-8"))
    for g in golden["generation"]:
        ids = ", ".join(str(x) for x in g["prompt_ids"] + g["completion_ids"])
        msgs.append((3, "DetokenizeRequest", f"token_ids: [{ids}] skip_special_tokens: false"))
        msgs.append((3, "DetokenizeRequest", f"token_ids: [{ids}]"))
    for i in range(0, min(len(texts), 30), 3):
        docs = " ".join(f"documents {{ text: {text_string(t)} id: \"d{k}\" }}"
                        for k, t in enumerate(texts[i:i + 3]))
        mode = ["", "rag { mode: RAG_MODE_NAIVE }",
                "rag { mode: RAG_MODE_SUPERPOSITION top_k: 2 positions: RAG_POSITIONS_LEFT_ALIGNED "
                "doc_weight: 0.5 path_cache: false canonical_span: 32 }"][i % 3]
        msgs.append((1, "GenerateRagRequest",
                     f"preamble: \"Answer from the documents.\" {docs} "
                     f"query: {text_string(texts[i + 1])} postamble: \"Answer:\" {mode} {sampling}"))
    # Boundaries: limits of every checked field, just inside and just outside.
    msgs.append((0, "GenerateRequest", "text: \"Once\" sampling { max_new_tokens: 4294967295 "
                 "temperature: nan top_k: 4294967295 top_p: 0 min_p: -0 repetition_penalty: inf "
                 "presence_penalty: -2 frequency_penalty: 2.0001 seed: 18446744073709551615 } "
                 "priority: -2147483648 top_logprobs: 4294967295 request_id: \"a b\""))
    msgs.append((0, "GenerateRequest", "text: \"Once\" sampling { max_new_tokens: 511 } "
                 "priority: 100 top_logprobs: 20 logprobs: true request_id: \"" + "r" * 128 + "\" "
                 + " ".join(f"stop: \"s{k}\"" for k in range(17))))
    msgs.append((0, "GenerateRequest", "text: \"\\377\\376 Once\" stop: \"\\300\\200\""))
    docs = " ".join(f"documents {{ text: \"d{k}\" }}" for k in range(65))
    msgs.append((1, "GenerateRagRequest", f"query: \"q\" {docs}"))
    msgs.append((1, "GenerateRagRequest", "query: \"Who?\" documents { text: \"Tim.\" } "
                 "documents { text: \"Sue.\" } rag { top_k: 0 doc_weight: 10 "
                 "canonical_span: 511.9 } sampling { max_new_tokens: 100 }"))
    msgs.append((3, "DetokenizeRequest", "token_ids: [0, 511, 512, 4294967295]"))
    proto = os.path.join(proto_dir, "superpose", "v1", "superpose.proto")
    for k, (sel, typ, txt) in enumerate(msgs):
        wire = subprocess.run(["protoc", f"-I{proto_dir}", f"--encode=superpose.v1.{typ}", proto],
                              input=txt.encode(), capture_output=True, check=True).stdout
        write(out, f"{typ}-{k}", bytes([sel]) + wire)


def openai_seeds(fixtures, out):
    """HTTP API bodies: byte 0 picks the endpoint (0 completions, 1 chat), then JSON."""
    texts = sample_texts(fixtures)[:6] or ["Once upon a time"]
    chat = [{"role": "system", "content": "You tell stories."},
            {"role": "user", "content": texts[0]}]
    bodies = [
        (0, {"model": "stories260k", "prompt": texts[0], "max_tokens": 8}),
        (0, {"model": "stories260k", "prompt": [1, 2, 3, 300], "temperature": 0.7, "top_p": 0.9,
             "top_k": 40, "min_p": 0.05, "seed": 7, "n": 2, "stop": ["\n", "The"],
             "logprobs": 3, "presence_penalty": 0.5, "frequency_penalty": 0.1,
             "repetition_penalty": 1.1, "user": "u1"}),
        (0, {"model": "stories260k", "prompt": [texts[1 % len(texts)], texts[-1]], "stream": True,
             "stream_options": {"include_usage": True}, "max_tokens": 4}),
        (0, {"model": "other", "prompt": "x"}),
        (1, {"model": "stories260k", "messages": chat, "max_completion_tokens": 16,
             "logprobs": True, "top_logprobs": 2, "stop": "."}),
        (1, {"model": "stories260k", "messages": [{"role": "user", "content": [
            {"type": "text", "text": texts[2 % len(texts)]}]}], "stream": True}),
        (1, {"model": "stories260k", "messages": chat,
             "documents": [{"id": "a", "text": t} for t in texts[:3]],
             "rag": {"top_k": 2, "mode": "superposition"}}),
        (1, {"model": "stories260k", "messages": [], "temperature": -1, "n": 99}),
    ]
    for k, (sel, body) in enumerate(bodies):
        write(out, f"body-{k}", bytes([sel]) + json.dumps(body).encode())


def main():
    shared, proto_dir, out = sys.argv[1:4]
    fixtures = os.path.join(shared, "fixtures")
    tokenizer_seeds(fixtures, os.path.join(out, "tokenizer"))
    tokenizer_json_seeds(fixtures, os.path.join(out, "tokenizer_json"))
    config_seeds(fixtures, os.path.join(out, "config"))
    safetensors_seeds(fixtures, os.path.join(out, "safetensors"))
    request_seeds(fixtures, proto_dir, os.path.join(out, "request"))
    openai_seeds(fixtures, os.path.join(out, "openai_request"))


if __name__ == "__main__":
    main()
