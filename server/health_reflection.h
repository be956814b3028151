// Server reflection for the standard health service.
#pragma once

namespace superpose::server {

// gRPC's default health service (grpc::EnableDefaultHealthCheckService) encodes its
// messages without protobuf descriptors, so reflection lists grpc.health.v1.Health but
// cannot describe it ("Symbol not found"): grpcurl then needs the .proto for health
// calls. This links the generated grpc/health/v1/health.proto (proto/) into the server and
// loads its descriptor into the generated pool that reflection serves. Call before the
// server starts; idempotent.
void RegisterHealthForReflection();

}  // namespace superpose::server
