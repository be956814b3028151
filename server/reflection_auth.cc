#include "server/reflection_auth.h"

#include <cstring>
#include <string>

namespace superpose::server {
namespace {

namespace gx = grpc::experimental;

constexpr char kReflectionMethod[] =
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
constexpr char kDenied[] = "reflection needs 'authorization: Bearer <key>' (--auth_reflection)";

// ServerReflectionResponse{error_response (7): ErrorResponse{error_code (1):
// UNAUTHENTICATED, error_message (2): kDenied}}, in protobuf wire format.
std::string DeniedResponse() {
  std::string error = {0x08, static_cast<char>(grpc::StatusCode::UNAUTHENTICATED), 0x12,
                       static_cast<char>(sizeof(kDenied) - 1)};
  error += kDenied;
  return std::string{0x3a, static_cast<char>(error.size())} + error;
}

class ReflectionAuthInterceptor final : public gx::Interceptor {
 public:
  explicit ReflectionAuthInterceptor(const Authenticator* auth) : auth_(auth) {}

  void Intercept(gx::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            gx::InterceptionHookPoints::POST_RECV_INITIAL_METADATA)) {
      const auto* md = methods->GetRecvInitialMetadata();
      auto it = md->find("authorization");
      denied_ =
          it == md->end() ||
          !auth_->TenantOfAuthorization(absl::string_view(it->second.data(), it->second.size()))
               .ok();
    }
    if (denied_ &&
        methods->QueryInterceptionHookPoint(gx::InterceptionHookPoints::PRE_SEND_MESSAGE)) {
      static const std::string denied = DeniedResponse();
      grpc::Slice slice(denied);
      *methods->GetSerializedSendMessage() = grpc::ByteBuffer(&slice, 1);
    }
    if (denied_ &&
        methods->QueryInterceptionHookPoint(gx::InterceptionHookPoints::PRE_SEND_STATUS)) {
      methods->ModifySendStatus(grpc::Status(grpc::StatusCode::UNAUTHENTICATED, kDenied));
    }
    methods->Proceed();
  }

 private:
  const Authenticator* auth_;
  bool denied_ = false;
};

}  // namespace

gx::Interceptor* ReflectionAuthFactory::CreateServerInterceptor(gx::ServerRpcInfo* info) {
  if (std::strcmp(info->method(), kReflectionMethod) != 0) return nullptr;
  return new ReflectionAuthInterceptor(auth_);
}

}  // namespace superpose::server
