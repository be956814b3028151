#!/usr/bin/python3
"""ctest Python.ClientExample: starts the real superpose-server (stories260k) and runs
examples/python/superpose_client.py against it: streaming Generate and GenerateRag, the
health service, and server reflection of grpc.health.v1.Health (what grpcurl needs to call
health without the .proto). Fails, never skips, when python3-grpcio or python3-grpc-tools
is missing.

  /usr/bin/python3 tests/python/client_example_test.py <build dir> <shared dir>
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import unittest

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
EXAMPLE = os.path.join(ROOT, "examples", "python", "superpose_client.py")
API_MD = os.path.join(ROOT, "docs", "api.md")
sys.path.insert(0, os.path.dirname(EXAMPLE))

try:
    import grpc
    import superpose_client  # exits with a message without grpc / grpc_tools
except ImportError as e:
    sys.exit(f"client_example_test: {e}: install python3-grpcio and python3-grpc-tools")

BUILD_DIR = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build")
SHARED_DIR = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "..", "shared")


class Server:
    """superpose-server on a free loopback port, stopped with SIGTERM."""

    def __init__(self, tmp):
        self.port_file = os.path.join(tmp, "port")
        self.log = open(os.path.join(tmp, "server.log"), "w")
        model = os.path.join(SHARED_DIR, "fixtures", "stories260k")
        self.proc = subprocess.Popen(
            [os.path.join(BUILD_DIR, "superpose-server"), f"--model={model}",
             "--listen=127.0.0.1:0", f"--port_file={self.port_file}",
             "--metrics_listen=", "--threads=1", "--log_level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while not os.path.exists(self.port_file) or os.path.getsize(self.port_file) == 0:
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"superpose-server did not start (see {self.log.name})")
            time.sleep(0.05)
        with open(self.port_file) as f:
            self.address = f"127.0.0.1:{int(f.read().strip())}"

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        self.log.close()
        return rc


def grpcurl_examples():
    """The grpcurl commands of api.md's "Example with grpcurl" section, as argv lists."""
    with open(API_MD) as f:
        text = f.read()
    section = text[text.index("## Example with grpcurl"):text.index("## Python client")]
    commands = []
    for block in re.findall(r"```\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("grpcurl "):
                commands.append(shlex.split(line))
    return commands


def parse_grpcurl(argv):
    """(options, positional) of a grpcurl argv: -d body, -H headers, -proto files."""
    opts, pos, i = {"-H": []}, [], 1
    while i < len(argv):
        a = argv[i]
        if a in ("-d", "-import-path", "-proto"):
            opts[a] = argv[i + 1]
            i += 2
        elif a == "-H":
            opts["-H"].append(tuple(x.strip() for x in argv[i + 1].split(":", 1)))
            i += 2
        else:
            if not a.startswith("-"):
                pos.append(a)
            else:
                opts[a] = True
            i += 1
    return opts, pos


class ClientExampleTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="sp-python-")
        cls.stubs = os.path.join(cls.tmp.name, "stubs")
        superpose_client.generate_stubs(cls.stubs)  # from proto/, at test time
        cls.server = Server(cls.tmp.name)

    @classmethod
    def tearDownClass(cls):
        rc = cls.server.stop()
        cls.tmp.cleanup()
        if rc != 0:
            raise AssertionError(f"superpose-server exited with {rc} on SIGTERM")

    def run_example(self, *args, env=None):
        cmd = [sys.executable, EXAMPLE, args[0], f"--server={self.server.address}",
               f"--stubs_dir={self.stubs}"] + list(args[1:])
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, **(env or {})))

    def summary(self, out):
        m = re.search(r"finish=(\w+) prompt_tokens=(\d+) generated_tokens=(\d+)", out)
        self.assertIsNotNone(m, out)
        return m.group(1), int(m.group(2)), int(m.group(3))

    def test_generate_streams_text(self):
        r = self.run_example("generate", "--prompt", "Once upon a time", "--max_new_tokens", "12",
                             "--affinity", "tenant-a:story")
        self.assertEqual(r.returncode, 0, r.stderr)
        finish, prompt, generated = self.summary(r.stdout)
        self.assertEqual(finish, "FINISH_REASON_LENGTH")
        self.assertGreater(prompt, 0)
        self.assertEqual(generated, 12)
        self.assertGreater(len(r.stdout.splitlines()[0].strip()), 0, "no streamed text")

    def test_generate_greedy_is_deterministic(self):
        a = self.run_example("generate", "--prompt", "Lily", "--max_new_tokens", "8")
        b = self.run_example("generate", "--prompt", "Lily", "--max_new_tokens", "8")
        self.assertEqual(a.returncode, 0, a.stderr)
        self.assertEqual(a.stdout.splitlines()[0], b.stdout.splitlines()[0])

    def test_generate_rag_reports_documents(self):
        r = self.run_example("rag", "--preamble", "Read the stories.", "--doc", "Lily had a cat.",
                             "--doc", "Tom had a red ball.", "--query", "Who had a cat?",
                             "--max_new_tokens", "10")
        self.assertEqual(r.returncode, 0, r.stderr)
        _, _, generated = self.summary(r.stdout)
        self.assertEqual(generated, 10)
        self.assertRegex(r.stdout, r"\[doc 0 id=doc0 kept=\w+ cached=\w+ tokens=[1-9]")
        self.assertRegex(r.stdout, r"\[doc 1 id=doc1 ")

    def test_naive_rag(self):
        r = self.run_example("rag", "--naive", "--doc", "Lily had a cat.", "--query", "Who?",
                             "--max_new_tokens", "4")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.summary(r.stdout)[2], 4)

    def test_bad_request_gets_status_naming_the_field(self):
        r = self.run_example("rag", "--doc", "a", "--query", "q", "--top_k", "5")
        self.assertEqual(r.returncode, 2)
        self.assertIn("INVALID_ARGUMENT", r.stderr)
        self.assertIn("rag.top_k", r.stderr)

    def test_health(self):
        for service in ["", "superpose.v1.Superpose"]:
            r = self.run_example("health", "--service", service)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(r.stdout.strip(), "SERVING")

    def message_class(self, type_name):
        """The generated class of a request or response type, by full name."""
        package, name = type_name.rsplit(".", 1)
        module = {"superpose.v1": self.pb, "grpc.health.v1": self.health_pb}[package]
        return getattr(module, name)

    def grpcurl_call(self, channel, opts, method):
        """Sends what `grpcurl ... -d BODY -H ... ADDR METHOD` sends, with the stubs."""
        from google.protobuf import json_format
        service, name = method.split("/")
        package, svc = service.rsplit(".", 1)
        module = {"superpose.v1": self.pb, "grpc.health.v1": self.health_pb}[package]
        desc = module.DESCRIPTOR.services_by_name[svc].methods_by_name[name]
        request = json_format.Parse(opts.get("-d", "{}"), self.message_class(
            desc.input_type.full_name)())
        response = self.message_class(desc.output_type.full_name)
        kind = channel.unary_stream if desc.server_streaming else channel.unary_unary
        call = kind(f"/{method}", request_serializer=type(request).SerializeToString,
                    response_deserializer=response.FromString)
        # The test server has no API keys: an authorization header is ignored.
        result = call(request, metadata=opts["-H"], timeout=60)
        return list(result) if desc.server_streaming else [result]

    def test_grpcurl_examples_of_api_md(self):
        stubs = superpose_client.Stubs(self.stubs)
        self.pb, self.health_pb = stubs.pb, stubs.health_pb
        commands = grpcurl_examples()
        self.assertGreaterEqual(len(commands), 10)
        calls = 0
        with grpc.insecure_channel(self.server.address) as ch:
            for argv in commands:
                opts, pos = parse_grpcurl(argv)
                self.assertTrue(opts.get("-plaintext"), argv)
                self.assertEqual(pos[0], "localhost:50051", argv)
                if pos[1] in ("list", "describe"):
                    continue  # test_reflection_describes_health covers reflection
                if "-proto" in opts:  # the .proto the command names must exist
                    path = os.path.join(ROOT, opts["-import-path"], opts["-proto"])
                    self.assertTrue(os.path.exists(path), path)
                with self.subTest(command=" ".join(argv)):
                    responses = self.grpcurl_call(ch, opts, pos[1])
                    self.assertGreater(len(responses), 0)
                    calls += 1
        self.assertGreaterEqual(calls, 8)

    def test_reflection_describes_health(self):
        """grpcurl resolves methods through reflection: FileContainingSymbol must work for
        grpc.health.v1.Health (the server registers its descriptor) and the API."""
        refl_dir = os.path.join(self.tmp.name, "reflection")
        superpose_client.generate_stubs(refl_dir, "/usr/share/grpc-proto",
                                        ["grpc/reflection/v1alpha/reflection.proto"])
        r = superpose_client.load_module(
            "sp_test_reflection_pb2",
            os.path.join(refl_dir, "grpc", "reflection", "v1alpha", "reflection_pb2.py"))
        from google.protobuf import descriptor_pb2
        with grpc.insecure_channel(self.server.address) as ch:
            call = ch.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                request_serializer=r.ServerReflectionRequest.SerializeToString,
                response_deserializer=r.ServerReflectionResponse.FromString)
            reqs = [r.ServerReflectionRequest(list_services="")] + [
                r.ServerReflectionRequest(file_containing_symbol=s)
                for s in ["grpc.health.v1.Health", "superpose.v1.Superpose"]]
            resps = list(call(iter(reqs), timeout=30))
        names = {s.name for s in resps[0].list_services_response.service}
        self.assertIn("grpc.health.v1.Health", names)
        for resp, service, method in [(resps[1], "Health", "Check"),
                                      (resps[2], "Superpose", "GenerateRag")]:
            self.assertFalse(resp.HasField("error_response"), resp.error_response.error_message)
            files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                     for b in resp.file_descriptor_response.file_descriptor_proto]
            methods = {m.name for f in files for s in f.service if s.name == service
                       for m in s.method}
            self.assertIn(method, methods)


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])
