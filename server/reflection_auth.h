// --auth_reflection: the server reflection service (grpc.reflection.v1alpha) needs a valid
// API key like the model's methods. The reflection service comes from gRPC's plugin, so
// the check is a server interceptor on its one method: a call without a valid key gets,
// for every request on the stream, a reflection error_response with code UNAUTHENTICATED
// in place of the answer (no service or descriptor reaches it), and the final status
// UNAUTHENTICATED. The health service stays open for orchestrator probes.
#pragma once

#include <grpcpp/support/server_interceptor.h>

#include "server/auth.h"

namespace superpose::server {

class ReflectionAuthFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit ReflectionAuthFactory(const Authenticator* auth) : auth_(auth) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override;

 private:
  const Authenticator* auth_;
};

}  // namespace superpose::server
