# Tests of examples/python and deploy/ (included from the top-level CMakeLists.txt).

# The Python client example (Debian python3-grpcio + python3-grpc-tools, /usr/bin/python3:
# a python3 earlier on PATH may lack them) against the real server. It fails, never
# skips, when those packages are missing.
add_test(NAME Python.ClientExample
  COMMAND /usr/bin/python3 ${CMAKE_SOURCE_DIR}/tests/python/client_example_test.py
    ${CMAKE_BINARY_DIR} ${SP_SHARED_DIR})
set_tests_properties(Python.ClientExample PROPERTIES LABELS server TIMEOUT 300)

# deploy/: the compose file through `docker compose config -q` (or docker-compose), the
# Kubernetes manifests through `kubectl kustomize`, plus structural checks of both
# (scripts/check-deploy.py). Each skips (exit 77, with a message) where its tool is missing.
foreach(what compose kubernetes)
  add_test(NAME Deploy.${what}
    COMMAND /usr/bin/python3 ${CMAKE_SOURCE_DIR}/scripts/check-deploy.py ${what}
      --version=${PROJECT_VERSION})
  set_tests_properties(Deploy.${what} PROPERTIES LABELS unit SKIP_RETURN_CODE 77 TIMEOUT 120)
endforeach()
