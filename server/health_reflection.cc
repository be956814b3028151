#include "server/health_reflection.h"

#include <google/protobuf/descriptor.h>

#include "grpc/health/v1/health.pb.h"

namespace superpose::server {

void RegisterHealthForReflection() {
  // descriptor() builds the file's descriptors into DescriptorPool::generated_pool(), and
  // the reference keeps the linker from dropping health.pb.o out of the static library.
  const google::protobuf::Descriptor* d = ::grpc::health::v1::HealthCheckRequest::descriptor();
  (void)d->file()->FindServiceByName("Health");
}

}  // namespace superpose::server
