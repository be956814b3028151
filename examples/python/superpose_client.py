#!/usr/bin/python3
"""superpose Python client example: streaming Generate and GenerateRag, and health.

Needs Debian's python3-grpcio and python3-grpc-tools (scripts/setup.sh installs them);
run it with /usr/bin/python3. The Python stubs are generated from proto/ on first use
into --stubs_dir (nothing generated is committed):

  /usr/bin/python3 examples/python/superpose_client.py generate \\
      --server=127.0.0.1:50051 --prompt "Once upon a time" --max_new_tokens 32
  /usr/bin/python3 examples/python/superpose_client.py rag --server=127.0.0.1:50051 \\
      --preamble "Answer from the documents." --doc "Paris is in France." \\
      --doc "Rome is in Italy." --query "Where is Paris?"
  /usr/bin/python3 examples/python/superpose_client.py health --server=127.0.0.1:50051

The API key comes from $SUPERPOSE_API_KEY (sent as `authorization: Bearer <key>`);
--affinity sets the `x-superpose-affinity` header a balancer routes on (docs/deploy.md).
"""

import argparse
import hashlib
import importlib.util
import os
import sys

try:
    import grpc
    from grpc_tools import protoc
except ImportError as e:  # the test must fail, not skip, without them
    sys.exit(f"superpose_client: {e}: install python3-grpcio and python3-grpc-tools "
             "(scripts/setup.sh) and run with /usr/bin/python3")

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.normpath(os.path.join(HERE, "..", "..", "proto"))
PROTOS = ["superpose/v1/superpose.proto", "grpc/health/v1/health.proto"]


def generate_stubs(out_dir, proto_dir=PROTO_DIR, protos=PROTOS):
    """Runs grpc_tools.protoc over proto_dir/protos into out_dir (message and service stubs)."""
    os.makedirs(out_dir, exist_ok=True)
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}"] + [os.path.join(proto_dir, p) for p in protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {protos} in {proto_dir}")


def load_module(name, path):
    """Imports a generated module by file path. The health stubs live under grpc/health/,
    a path that the installed grpc package would shadow in a normal import."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Stubs:
    """The generated modules: pb (messages), rpc (Superpose stub), health_pb (Health)."""

    def __init__(self, stubs_dir):
        if not os.path.exists(os.path.join(stubs_dir, "superpose", "v1", "superpose_pb2.py")):
            generate_stubs(stubs_dir)
        if stubs_dir not in sys.path:
            sys.path.insert(0, stubs_dir)
        from superpose.v1 import superpose_pb2, superpose_pb2_grpc  # noqa: E402
        self.pb = superpose_pb2
        self.rpc = superpose_pb2_grpc
        self.health_pb = load_module(
            "superpose_example_health_pb2",
            os.path.join(stubs_dir, "grpc", "health", "v1", "health_pb2.py"))


def metadata(args):
    md = []
    key = os.environ.get("SUPERPOSE_API_KEY", "")
    if key:
        md.append(("authorization", f"Bearer {key}"))
    if args.affinity:
        md.append(("x-superpose-affinity", args.affinity))
    return md


def sampling(stubs, args):
    return stubs.pb.SamplingParams(max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, seed=args.seed)


def print_stream(stubs, responses):
    """Prints the streamed text deltas, then a summary line from the last response."""
    last = None
    for r in responses:
        sys.stdout.write(r.text)
        sys.stdout.flush()
        last = r
    print()
    if last is None:
        return
    u = last.usage
    reason = stubs.pb.FinishReason.Name(last.finish_reason)
    print(f"[request_id={last.request_id} finish={reason} prompt_tokens={u.prompt_tokens} "
          f"generated_tokens={u.generated_tokens} cached_prompt_tokens={u.cached_prompt_tokens} "
          f"ttft_ms={u.time_to_first_token_ms:.1f} total_ms={u.total_time_ms:.1f}]")
    if last.HasField("rag"):
        for d in last.rag.documents:
            print(f"[doc {d.index} id={d.id} kept={d.kept} cached={d.cached} "
                  f"tokens={d.tokens} score={d.score:.3f}]")


def cmd_generate(stubs, channel, args):
    req = stubs.pb.GenerateRequest(text=args.prompt, sampling=sampling(stubs, args))
    stub = stubs.rpc.SuperposeStub(channel)
    print_stream(stubs, stub.Generate(req, metadata=metadata(args), timeout=args.timeout))


def cmd_rag(stubs, channel, args):
    docs = [stubs.pb.RagDocument(text=t, id=f"doc{i}") for i, t in enumerate(args.doc)]
    mode = stubs.pb.RAG_MODE_NAIVE if args.naive else stubs.pb.RAG_MODE_SUPERPOSITION
    options = stubs.pb.RagOptions(mode=mode)
    if args.top_k > 0:
        options.top_k = args.top_k
    req = stubs.pb.GenerateRagRequest(preamble=args.preamble, documents=docs, query=args.query,
                                      rag=options, sampling=sampling(stubs, args))
    if not args.affinity:
        # Same document set, same replica: the key is a hash of the documents (ordered).
        h = hashlib.sha256("\0".join(args.doc).encode()).hexdigest()[:16]
        args.affinity = f"docs:{h}"
    stub = stubs.rpc.SuperposeStub(channel)
    print_stream(stubs, stub.GenerateRag(req, metadata=metadata(args), timeout=args.timeout))


def cmd_health(stubs, channel, args):
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=stubs.health_pb.HealthCheckRequest.SerializeToString,
        response_deserializer=stubs.health_pb.HealthCheckResponse.FromString)
    resp = check(stubs.health_pb.HealthCheckRequest(service=args.service), timeout=args.timeout)
    status = stubs.health_pb.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(status)
    return 0 if status == "SERVING" else 1


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["generate", "rag", "health"])
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--stubs_dir", default=os.path.join(HERE, "_stubs"),
                   help="where the generated stubs go (created on first use)")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    p.add_argument("--affinity", default="", help="x-superpose-affinity header value")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preamble", default="")
    p.add_argument("--doc", action="append", default=[], help="a document (repeatable)")
    p.add_argument("--query", default="")
    p.add_argument("--naive", action="store_true", help="RAG_MODE_NAIVE instead of superposition")
    p.add_argument("--top_k", type=int, default=0, help="keep the k best document paths (0: all)")
    p.add_argument("--service", default="", help="health: the service name to check")
    return p.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    stubs = Stubs(args.stubs_dir)
    commands = {"generate": cmd_generate, "rag": cmd_rag, "health": cmd_health}
    with grpc.insecure_channel(args.server) as channel:
        try:
            return commands[args.command](stubs, channel, args) or 0
        except grpc.RpcError as e:
            print(f"superpose_client: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
