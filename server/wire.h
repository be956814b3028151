// Requests and responses as bytes. The service's methods are registered as raw
// (ByteBuffer) callback methods: gRPC 1.51's typed callback handlers answer a request
// that fails to parse with UNIMPLEMENTED and an empty message (the handler drops the
// deserialization status), so the service parses requests itself and answers
// INVALID_ARGUMENT naming the request type.
#pragma once

#include <string>

#include <google/protobuf/message.h>
#include <grpcpp/support/byte_buffer.h>

#include "absl/status/status.h"

namespace superpose::server {

// Parses `bytes` into `msg`, then checks that it carries no field this server does
// not know: an unknown enum value (proto2 keeps it aside and reads the field as unset,
// which would silently mean the default) is INVALID_ARGUMENT naming the field (e.g.
// "rag.mode"), and so is an unknown field number or a field with the wrong wire type.
// Messages name the request type and field, never carry request bytes.
absl::Status ParseRequest(const grpc::ByteBuffer& bytes, google::protobuf::Message* msg);

// The fields `msg` carries that its descriptor does not know (see ParseRequest),
// checked recursively; `path` prefixes the field names.
absl::Status CheckKnownFields(const google::protobuf::Message& msg, const std::string& path = "");

// The wire form of a response.
grpc::ByteBuffer Serialize(const google::protobuf::Message& msg);

}  // namespace superpose::server
